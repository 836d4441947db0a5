"""The fast merge path: MetaDB.insert_new (one executemany for new rows) and _merge's large
transactions give the rows, ids and labels the row-by-row write gives."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.errors import StoreWriteError
from lookalike.index.meta import ImageRecord, MetaDB


def records(n: int, start: int = 0) -> list[tuple[ImageRecord, np.ndarray]]:
    rng = np.random.default_rng(start)
    return [
        (
            ImageRecord(0, f"d/{i:05d}.jpg", 100 + i, 1.5, f"{i:064x}", 64, 48, phash=-i),
            rng.standard_normal(8).astype(np.float32),
        )
        for i in range(start, start + n)
    ]


def table(db: MetaDB) -> list[tuple]:
    return db.conn.execute(
        "SELECT id, path, size, mtime, sha256, width, height, embedding, labels, model, phash"
        " FROM images ORDER BY id"
    ).fetchall()


def test_insert_new_equals_write(tmp_path):
    fast, slow = MetaDB(tmp_path / "fast.sqlite"), MetaDB(tmp_path / "slow.sqlite")
    for db in (fast, slow):
        db.write(records(3), model=2)
        db.set_labels([("d/00001.jpg", ("cat",))])
        db.write(deletes=[2])  # its labels are kept by sha256 for a photo that comes back
    back = [(ImageRecord(0, "e/again.jpg", 5, 2.0, f"{1:064x}", 64, 48), np.ones(8, "f4"))]
    rows = records(500, start=10) + back
    ids = fast.insert_new(rows, touches=[(1, 9.0, 7)], model=3)
    assert ids == slow.write(rows, touches=[(1, 9.0, 7)], model=3)
    assert ids == list(range(4, 4 + len(rows)))  # ids are never reused: 2 stays gone
    assert table(fast) == table(slow)
    assert fast.by_path("e/again.jpg").labels == ("cat",)
    assert fast.generation == slow.generation


def test_insert_new_of_a_known_path_writes_nothing(tmp_path):
    db = MetaDB(tmp_path / "t.sqlite")
    db.write(records(2), model=1)
    before, generation = table(db), db.generation
    with pytest.raises(Exception) as err:
        db.insert_new(records(3), model=1)  # d/00000.jpg is there already
    assert "UNIQUE" in str(err.value) or isinstance(err.value, StoreWriteError)
    assert table(db) == before and db.generation == generation
