"""Tests for lookalike.index.meta: the SQLite table of images."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import numpy as np
import pytest

from lookalike.index.meta import ImageRecord, MetaDB

DIM = 4


def rec(path: str, sha: str | None = None, labels: tuple[str, ...] = (), size: int = 10):
    return ImageRecord(0, path, size, 1000.5, sha or f"sha-{path}", 64, 48, labels)


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
def db(tmp_path):
    d = MetaDB(tmp_path / "images.sqlite")
    yield d
    d.close()


def test_empty(db):
    assert len(db) == 0
    assert db.generation == 0
    assert db.get(1) is None
    assert db.by_path("x.jpg") is None
    assert db.by_sha256("nope") == []
    assert db.file_states() == {}
    assert list(db.embeddings(DIM)) == []
    assert list(db.records()) == []


def test_write_and_read_back(db):
    ids = db.write([(rec("a/1.jpg", labels=("cat", "dog")), vec(1)), (rec("b/2.png"), vec(2))])
    assert len(ids) == 2 and ids[0] < ids[1]
    assert len(db) == 2
    r = db.get(ids[0])
    assert r == ImageRecord(ids[0], "a/1.jpg", 10, 1000.5, "sha-a/1.jpg", 64, 48, ("cat", "dog"))
    assert db.get(np.int64(ids[1])).path == "b/2.png"  # numpy ints are fine
    assert db.get(ids[1]).labels == ()
    assert db.by_path("b/2.png").id == ids[1]
    assert [x.path for x in db.records()] == ["a/1.jpg", "b/2.png"]
    assert set(db.get_many(ids + [999])) == set(ids)
    states = db.file_states()
    assert states["a/1.jpg"] == (ids[0], 10, 1000.5, "sha-a/1.jpg", 0)


def test_by_sha256_finds_every_copy(db):
    db.write([(rec("x.jpg", sha="same"), vec(1)), (rec("y.jpg", sha="same"), vec(2))])
    db.write([(rec("z.jpg", sha="other"), vec(3))])
    assert sorted(r.path for r in db.by_sha256("same")) == ["x.jpg", "y.jpg"]
    assert [r.path for r in db.by_sha256("other")] == ["z.jpg"]


def test_get_many_over_the_parameter_limit(db):
    ids = db.write([(rec(f"{i}.jpg"), vec(i)) for i in range(2000)])
    got = db.get_many(ids)
    assert len(got) == 2000 and got[ids[1500]].path == "1500.jpg"


def test_embeddings_round_trip_in_chunks(db):
    vectors = [vec(i) for i in range(25)]
    ids = db.write([(rec(f"{i:02d}.jpg"), v) for i, v in enumerate(vectors)])
    db.write(deletes=[ids[3]])
    chunks = list(db.embeddings(DIM, chunk=10))
    assert [len(c[0]) for c in chunks] == [10, 10, 4]
    all_ids = np.concatenate([c[0] for c in chunks])
    all_vecs = np.concatenate([c[1] for c in chunks])
    assert all_ids.dtype == np.int64 and all_vecs.dtype == np.float32
    assert all_vecs.shape == (24, DIM)
    np.testing.assert_array_equal(all_ids, [i for i in ids if i != ids[3]])
    want = np.stack([v for i, v in enumerate(vectors) if i != 3])
    np.testing.assert_array_equal(all_vecs, want)
    np.testing.assert_allclose(np.linalg.norm(all_vecs, axis=1), 1.0, atol=1e-6)


def test_generation_increments_with_every_write(db):
    assert db.generation == 0
    db.write([(rec("a.jpg"), vec(1))])
    assert db.generation == 1
    (i,) = db.write([(rec("b.jpg"), vec(2))])
    db.write(deletes=[i])
    assert db.generation == 3
    db.write(touches=[(1, 5.0, 11)])
    assert db.generation == 4
    db.write()
    assert db.generation == 5


def test_generation_persists(tmp_path):
    path = tmp_path / "images.sqlite"
    d = MetaDB(path)
    d.write([(rec("a.jpg"), vec(1))])
    d.write([(rec("b.jpg"), vec(2))])
    d.close()
    d = MetaDB(path)
    assert d.generation == 2 and len(d) == 2
    d.close()


def test_replacing_a_path_keeps_its_id_and_labels(db):
    (first,) = db.write([(rec("a.jpg", labels=("x",)), vec(1))])
    (other,) = db.write([(rec("b.jpg"), vec(2))])
    (again,) = db.write([(rec("a.jpg", sha="new", size=99), vec(3))], model=4)
    assert again == first
    r = db.get(first)
    assert r.sha256 == "new" and r.size == 99
    assert r.labels == ("x",)  # no labels given: the old ones stay
    assert db.file_states()["a.jpg"][4] == 4
    vecs = dict(zip(*[np.concatenate(c) for c in zip(*db.embeddings(DIM))]))
    np.testing.assert_array_equal(vecs[first], vec(3))
    assert len(db) == 2 and other != first


def test_ids_never_reused_after_delete(tmp_path):
    path = tmp_path / "images.sqlite"
    d = MetaDB(path)
    ids = d.write([(rec(f"{i}.jpg"), vec(i)) for i in range(3)])
    d.write(deletes=[ids[-1]])
    (new,) = d.write([(rec("new.jpg"), vec(9))])
    assert new > ids[-1]
    d.write(deletes=[new])
    d.close()
    d = MetaDB(path)  # the sequence survives a reopen
    (newer,) = d.write([(rec("newer.jpg"), vec(10))])
    assert newer > new
    # the same path re-added after a delete gets a fresh id
    d.write(deletes=[ids[0]])
    (back,) = d.write([(rec("0.jpg"), vec(0))])
    assert back > newer
    d.close()


def test_touches_update_mtime_and_size_only(db):
    (i,) = db.write([(rec("a.jpg"), vec(1))])
    db.write(touches=[(i, 2000.25, 12)])
    r = db.get(i)
    assert r.mtime == 2000.25 and r.size == 12 and r.sha256 == "sha-a.jpg"


def test_failed_write_rolls_back_everything(db):
    (i,) = db.write([(rec("a.jpg"), vec(1))])
    gen = db.generation
    bad = ImageRecord(0, None, 1, 1.0, "s", 1, 1)  # path NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        db.write([(rec("b.jpg"), vec(2)), (bad, vec(3))], deletes=[i])
    assert db.generation == gen
    assert len(db) == 1 and db.by_path("b.jpg") is None and db.get(i) is not None
    db.write([(rec("c.jpg"), vec(4))])  # the connection is usable afterwards
    assert len(db) == 2


def test_set_labels(db):
    db.write([(rec("a.jpg"), vec(1)), (rec("b.jpg", labels=("old",)), vec(2))])
    gen = db.generation
    assert db.set_labels([("a.jpg", ("p", "q")), ("b.jpg", ()), ("missing.jpg", ("z",))]) == 2
    assert db.by_path("a.jpg").labels == ("p", "q")
    assert db.by_path("b.jpg").labels == ()
    assert db.generation == gen  # labels are not in the vector index


def test_meta_key_values(db):
    assert db.get_meta("k") is None and db.get_meta("k", "d") == "d"
    db.set_meta("k", "v")
    db.set_meta("k", "w")
    assert db.get_meta("k") == "w"


def test_wal_mode(db):
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"


# -- pHash column ----------------------------------------------------------------------------
def test_phash_round_trips_over_the_whole_int64_range(db):
    values = [0, -1, -(2**63), 2**63 - 1, 0x0123_4567_89AB_CDEF]
    ids = db.write(
        [(replace(rec(f"{i}.jpg"), phash=v), vec(i)) for i, v in enumerate(values)]
        + [(rec("none.jpg"), vec(9))]
    )
    assert [db.get(i).phash for i in ids] == values + [None]
    assert db.without_phash() == {"none.jpg"}
    hash_ids, hashes = db.phashes()
    assert hash_ids.tolist() == ids[:-1] and hashes.dtype == np.uint64
    assert hashes.view(np.int64).tolist() == values
    (again,) = db.write([(replace(rec("0.jpg"), phash=42), vec(1))])  # a changed file: new hash
    assert again == ids[0] and db.get(again).phash == 42


def test_migration_adds_the_phash_column_to_an_old_table(tmp_path):
    path = tmp_path / "images.sqlite"
    old = sqlite3.connect(path)
    old.executescript(  # the table as versions before the pHash column made it
        """
        CREATE TABLE images (
            id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL, mtime REAL NOT NULL, sha256 TEXT NOT NULL,
            width INTEGER NOT NULL, height INTEGER NOT NULL, embedding BLOB NOT NULL,
            labels TEXT, model INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """
    )
    old.execute(
        "INSERT INTO images (path, size, mtime, sha256, width, height, embedding)"
        " VALUES ('old.jpg', 1, 1.0, 's', 2, 2, ?)",
        (vec(1).astype("<f4").tobytes(),),
    )
    old.commit()
    old.close()
    d = MetaDB(path)
    assert d.by_path("old.jpg").phash is None
    assert d.without_phash() == {"old.jpg"}
    d.write([(replace(rec("new.jpg"), phash=-5), vec(2))])
    assert d.by_path("new.jpg").phash == -5
    d.close()
    d = MetaDB(path)  # opening again does not add it twice
    columns = [r[1] for r in d.conn.execute("PRAGMA table_info(images)")]
    assert columns.count("phash") == 1
    d.close()


def test_newest_first_pages_read_the_mtime_index_not_a_sort(db):
    """GET /images?order=newest pages by mtime: an index, or every page sorts the whole table."""
    plan = db.conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM images ORDER BY mtime DESC, id DESC LIMIT 48"
    ).fetchall()
    details = " ".join(str(row[-1]) for row in plan)
    assert "images_mtime" in details and "TEMP B-TREE" not in details


def test_the_pair_cache_prunes_old_versions_and_gone_contents_only(db):
    db.write([(rec("a.jpg", "sa"), vec(1)), (rec("b.jpg", "sb"), vec(2))])
    db.put_verified([("sa", "sb", 55)], "orb-old")
    db.put_verified([("sb", "sa", 1)], "crop")  # ordered pairs: b is a crop of a
    db.put_verified([("sa", "sgone", 70)], "orb")
    db.put_verified([("sa", "sb", 60)], "orb", prune=True, current=("crop",))
    assert db.verified_inliers([("sa", "sb")], "orb") == {("sa", "sb"): 60}
    assert db.verified_inliers([("sb", "sa")], "crop") == {("sb", "sa"): 1}  # kept
    assert db.verified_inliers([("sa", "sb")], "orb-old") == {}  # another version
    assert db.verified_inliers([("sa", "sgone")], "orb") == {}  # a content no row has
