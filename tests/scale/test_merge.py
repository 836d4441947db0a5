"""The fast merge path: MetaDB.insert_new (one executemany for new rows) and _merge's large
transactions give the rows, ids and labels the row-by-row write gives."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

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


def test_insert_columns_equals_insert_new(tmp_path):
    from lookalike.index.meta import NewRows

    rows = records(300, start=5)
    a, b = MetaDB(tmp_path / "a.sqlite"), MetaDB(tmp_path / "b.sqlite")
    for db in (a, b):
        db.write(records(2), model=1)
    cols = NewRows(
        *([getattr(r, name) for r, _ in rows] for name in NewRows.__dataclass_fields__
          if name != "embedding"),
        embedding=np.stack([v for _, v in rows]),
    )  # fmt: skip
    assert a.insert_columns(cols, touches=[(1, 3.0, 9)], model=4) == b.insert_new(
        rows, touches=[(1, 3.0, 9)], model=4
    )
    assert table(a) == table(b)


def index_names(db: MetaDB) -> set[str]:
    return {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}


def uses_sha256_index(db: MetaDB) -> bool:
    plan = db.conn.execute("EXPLAIN QUERY PLAN SELECT id FROM images WHERE sha256 = 'x'")
    return any("images_sha256" in str(row) for row in plan)


def test_bulk_load_drops_the_secondary_indexes_and_builds_them_again(tmp_path):
    db = MetaDB(tmp_path / "t.sqlite")
    with pytest.raises(RuntimeError):
        with db.bulk_load():
            assert not {"images_sha256", "images_mtime"} & index_names(db)
            db.insert_new(records(10), model=1)
            raise RuntimeError("interrupted")
    assert {"images_sha256", "images_mtime"} <= index_names(db) and uses_sha256_index(db)
    assert [r.path for r in db.by_sha256(f"{3:064x}")] == ["d/00003.jpg"]


def test_a_bulk_load_killed_midway_leaves_a_table_that_gets_its_indexes_back(tmp_path):
    db = MetaDB(tmp_path / "t.sqlite")
    db.insert_new(records(5), model=1)
    db.close()
    killed = (
        "import os, sys\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from pathlib import Path\n"
        "from test_merge import records\n"
        "from lookalike.index.meta import MetaDB\n"
        "db = MetaDB(Path(sys.argv[1]))\n"
        "with db.bulk_load():\n"
        "    db.insert_new(records(5, start=5), model=1)\n"
        "    os._exit(9)  # killed: the indexes are not built again\n"
    )
    here = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", killed, str(tmp_path / "t.sqlite"), here])
    assert done.returncode == 9
    raw = sqlite3.connect(tmp_path / "t.sqlite")
    assert not {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='index'")} & {
        "images_sha256", "images_mtime"
    }  # fmt: skip
    raw.close()
    again = MetaDB(tmp_path / "t.sqlite")
    assert {"images_sha256", "images_mtime"} <= index_names(again) and uses_sha256_index(again)
    assert [r.id for r in again.by_sha256(f"{7:064x}")] == [8] and len(again) == 10


def merge_store(root: Path, bulk: bool, monkeypatch) -> tuple:
    """A store of 4 rows, and shards of 8 to-do files merged into it: new files, a changed
    one, one rewritten with its old bytes, a stale one, an unreadable indexed one, a file
    changed after it was embedded, and a row found in two shards."""
    from lookalike.index.listing import Listing
    from lookalike.indexer import Committer, IndexReport, Plan, Todo
    from lookalike.scale import ray_index
    from lookalike.scale.shards import ShardDir
    from lookalike.store import Store

    monkeypatch.setattr(ray_index, "BULK_ROWS", 0 if bulk else 10**9)
    store = Store.open(root, create=True, photos=root.parent / "photos")
    store.update_state({"model_serial": 2, "embedding_dim": 8, "image_size": 64}, bump=True)
    store.db.write(records(4), model=1)  # ids 1-4: d/00000.jpg .. d/00003.jpg
    sha = [f"{i:064x}" for i in range(12)]
    todo = [  # pos, rel, location, size, mtime, kind, id, sha256, model
        Todo(0, "d/00000.jpg", "x", 7, 2.0, "maybe", 1, sha[0], 1),  # same bytes: touched
        Todo(1, "d/00001.jpg", "x", 7, 2.0, "maybe", 2, sha[1], 1),  # new bytes: updated
        Todo(2, "d/00002.jpg", "x", 102, 1.5, "stale", 3, sha[2], 1),
        Todo(3, "d/00003.jpg", "x", 7, 2.0, "maybe", 4, sha[3], 1),  # unreadable now
        *(Todo(p, f"n/{p}.jpg", "x", p, 1.0, "added") for p in range(4, 9)),
    ]
    listing = Listing(root, store.db.path)
    listing.add((t.rel, None, None) for t in todo)
    listing.indexed()
    listing.add_todo([(*t[:2], *t[3:9], int(t.no_phash)) for t in todo])
    plan = Plan(listing, lambda rel: "x", np.zeros(0, np.int64))
    shards = ShardDir(store.root / "shards", 2, 8)
    rng = np.random.default_rng(1)

    def shard(pos, size, shas, errors):
        n = len(pos)
        shards.write(
            {
                "pos": np.array(pos), "rel": np.array([todo[p].rel for p in pos]),
                "size": np.array(size), "mtime": np.array([todo[p].mtime for p in pos]),
                "sha256": np.array(shas), "width": np.full(n, 64), "height": np.full(n, 48),
                "phash": np.array(pos) * -3, "error": np.array(errors),
                "embedding": rng.standard_normal((n, 8)).astype(np.float32),
            }
        )  # fmt: skip

    shard([2, 0, 1, 3], [102, 7, 7, 7], [sha[2], sha[0], "f" * 64, ""], ["", "", "", "bad"])
    shard([4, 5, 6], [4, 5, 99], ["a" * 64, "b" * 64, "c" * 64], ["", "", ""])  # 6 changed
    shard([5, 7, 8], [5, 7, 8], ["b" * 64, "d" * 64, "e" * 64], ["", "", ""])  # 5 again
    report = IndexReport()
    committer = Committer(store, None, report)
    ray_index._merge(shards, plan, committer, lambda *a: None)
    names = {r[0] for r in store.db.conn.execute("SELECT name FROM sqlite_master")}
    listing.close()
    store.close()
    return report, sorted(committer.failed), names


def test_a_bulk_merge_writes_what_a_merge_into_a_big_table_writes(tmp_path, monkeypatch):
    bulk = merge_store(tmp_path / "bulk", True, monkeypatch)
    plain = merge_store(tmp_path / "plain", False, monkeypatch)
    assert bulk == plain
    report, failed, names = bulk
    assert {"images_sha256", "images_mtime"} <= names
    assert (report.added, report.updated, report.reembedded, report.unchanged) == (4, 1, 2, 2)
    assert [p.name for p in failed] == ["00003.jpg"]
    rows = table(MetaDB(tmp_path / "bulk" / "images.sqlite"))
    assert rows == table(MetaDB(tmp_path / "plain" / "images.sqlite"))
    by_path = {r[1]: r for r in rows}
    assert [by_path[p][0] for p in ("n/4.jpg", "n/5.jpg", "n/7.jpg", "n/8.jpg")] == [5, 6, 7, 8]
    assert "n/6.jpg" not in by_path and "d/00003.jpg" not in by_path
    assert by_path["d/00000.jpg"][2:4] == (7, 2.0) and by_path["d/00000.jpg"][9] == 2  # same bytes
    assert by_path["d/00001.jpg"][4] == "f" * 64 and by_path["d/00002.jpg"][9] == 2


def test_a_failed_index_build_does_not_hide_the_error_of_the_load(tmp_path, monkeypatch):
    db = MetaDB(tmp_path / "t.sqlite")

    def disk_full(self):
        raise StoreWriteError("disk full")

    monkeypatch.setattr(MetaDB, "_create_indexes", disk_full)
    with pytest.raises(RuntimeError, match="the load's own"):
        with db.bulk_load():
            raise RuntimeError("the load's own")
    monkeypatch.undo()
    assert {"images_sha256", "images_mtime"} <= index_names(MetaDB(tmp_path / "t.sqlite"))
