"""The run's listing on disk: the removal guard, the removed rows, the plan's join and the
to-do lookups are queries against the store's table."""

from __future__ import annotations

import numpy as np

from lookalike.index import listing as listing_module
from lookalike.index.listing import LISTING_FILE, Listing
from lookalike.index.meta import ImageRecord, MetaDB


def table(tmp_path, paths: list[str]) -> MetaDB:
    db = MetaDB(tmp_path / "images.sqlite")
    db.write(
        [
            (ImageRecord(0, p, 10 + i, 1.0, f"{i:064x}", 4, 4, phash=None if i == 1 else i),
             np.zeros(4, "f4"))
            for i, p in enumerate(paths)
        ],
        model=3,
    )  # fmt: skip
    return db


def test_guard_removals_and_the_join(tmp_path, monkeypatch):
    monkeypatch.setattr(listing_module, "CHUNK", 2)  # several chunks out of a few rows
    db = table(tmp_path, ["a.jpg", "b.jpg", "c.jpg", "@uploads/u.jpg", "gone.jpg"])
    with Listing(tmp_path, db.path) as listing:
        assert (tmp_path / LISTING_FILE).exists()
        assert listing.add([("b.jpg", None, None), ("new.jpg", 5, 2.5), ("a.jpg", 10, 1.0)]) == 3
        listing.indexed()
        assert listing.gone(keep_prefix="@uploads/") == (2, 5)  # c.jpg, gone.jpg; u stays
        assert listing.gone() == (3, 5)
        assert listing.removed_ids().tolist() == [3, 4, 5]
        rows = [r for chunk in listing.joined() for r in chunk]
        assert rows == [
            (0, "b.jpg", None, None, 2, 11, 1.0, f"{1:064x}", 3, 1),  # no pHash
            (1, "new.jpg", 5, 2.5, None, None, None, None, None, 1),  # not in the table
            (2, "a.jpg", 10, 1.0, 1, 10, 1.0, f"{0:064x}", 3, 0),
        ]
        assert listing.sample(np.array([2, 0])) == [(0, "b.jpg", None, None), (2, "a.jpg", 10, 1.0)]
    assert not (tmp_path / LISTING_FILE).exists()


def test_todo_lookups_by_position_and_by_path(tmp_path, monkeypatch):
    monkeypatch.setattr(listing_module, "CHUNK", 3)
    db = table(tmp_path, [])
    with Listing(tmp_path, db.path) as listing:
        listing.add((f"p/{i}.jpg", i, 1.0) for i in range(10))
        listing.indexed()
        rows = [(i, f"p/{i}.jpg", i, 1.0, "added", None, None, None, 0) for i in (1, 4, 5, 8)]
        listing.add_todo(rows)
        assert list(listing.todo()) == rows and listing.todo_count == 4
        assert listing.todo_of(["p/4.jpg", "p/5.jpg"], [4, 5]) == {
            "p/4.jpg": rows[1], "p/5.jpg": rows[2]
        }  # fmt: skip
        # positions of another run: found by path; files with no to-do row: left out
        assert listing.todo_of(["p/8.jpg", "p/1.jpg", "p/2.jpg"], [0, 1, 2]) == {
            "p/8.jpg": rows[3], "p/1.jpg": rows[0]
        }  # fmt: skip
        listing.cover([("p/4.jpg", 4, 1.0), ("p/8.jpg", 9, 1.0)])  # p/8 changed since
        assert [r[0] for r in listing.todo(uncovered=True)] == [1, 5, 8]
        assert listing.todo_count_uncovered() == 3


def test_a_leftover_listing_is_replaced(tmp_path):
    db = table(tmp_path, ["a.jpg"])
    (tmp_path / LISTING_FILE).write_bytes(b"not a database: a killed run's")
    with Listing(tmp_path, db.path) as listing:
        listing.add([("a.jpg", None, None)])
        listing.indexed()
        assert listing.gone() == (0, 1)
