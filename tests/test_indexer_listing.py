"""The run's listing and plan stream through a scratch table a chunk at a time: the results do
not depend on the chunk size, the whole table is never read into a dict, and an interrupted
run leaves nothing behind that the next run trips on."""

from __future__ import annotations

import os

import pytest
from conftest import PHOTO_SEEDS, assert_same_tables, copy_store, photo_name, write_photo
from s3server import s3_server  # noqa: F401  (a fixture)

from lookalike.index import listing as listing_module
from lookalike.index.listing import LISTING_FILE, Listing
from lookalike.index.meta import MetaDB
from lookalike.indexer import index_folder
from lookalike.store import Store

N = len(PHOTO_SEEDS)


def changed_copy(photos_dir, tiny_store, dst):
    """A copy of the photos and the store, then: 3 new files, a rewritten one, one touched
    (same bytes), one unreadable, two deleted, and an upload waiting in the store."""
    photos, store = copy_store(photos_dir, tiny_store, dst)
    for i, rel in enumerate(["a/new_1.jpg", "b/new_2.png", "c/new_3.jpg"]):
        write_photo(photos / rel, 1000 + i)
    write_photo(photos / photo_name(5), 2000)
    st = (photos / photo_name(5)).stat()
    os.utime(photos / photo_name(5), (st.st_atime, st.st_mtime + 100))
    st = (photos / photo_name(6)).stat()
    os.utime(photos / photo_name(6), (st.st_atime, st.st_mtime + 100))
    (photos / photo_name(7)).write_bytes(b"not an image any more")
    for rel in (photo_name(2), photo_name(11)):
        (photos / rel).unlink()
    write_photo(store / "uploads" / "up.jpg", 3000)
    return photos, store


def summary(report) -> dict:
    out = report.to_dict()
    for key in ("seconds", "train_seconds", "embed_seconds"):
        out.pop(key)
    out["failed"] = [f["error"] for f in out["failed"]]
    return out


def test_a_run_in_chunks_of_three_equals_a_run_in_one_chunk(
    tmp_path, photos_dir, tiny_store, monkeypatch
):
    one = changed_copy(photos_dir, tiny_store, tmp_path / "one")
    many = changed_copy(photos_dir, tiny_store, tmp_path / "many")
    expected = index_folder(*one)
    monkeypatch.setattr(listing_module, "CHUNK", 3)
    got = index_folder(*many)
    assert summary(got) == summary(expected)
    assert (got.added, got.updated, got.removed, len(got.failed)) == (
        4,
        1,
        2,
        1,
    )  # the unreadable one is dropped, not "removed"
    assert got.unchanged == N - 4 and got.images == N + 4 - 3
    assert_same_tables(one[1], many[1])
    with Store.open(many[1]) as st:
        assert st.db.by_path("@uploads/up.jpg") is not None
    assert not (many[1] / LISTING_FILE).exists()


def test_a_run_never_reads_the_whole_table_into_memory(store_copy, monkeypatch):
    photos, store = store_copy
    write_photo(photos / "a" / "new.jpg", 1234)
    (photos / photo_name(3)).unlink()

    def whole_table(self):
        raise AssertionError("the table was read into a dict")

    monkeypatch.setattr(MetaDB, "file_states", whole_table)
    monkeypatch.setattr(MetaDB, "without_phash", whole_table)
    report = index_folder(photos, store)
    assert (report.added, report.removed, report.unchanged) == (1, 1, N - 1)


def test_an_interrupted_plan_leaves_a_store_the_next_run_completes(store_copy, monkeypatch):
    photos, store = store_copy
    for i in range(7):
        write_photo(photos / "new" / f"{i}.jpg", 4000 + i)
    monkeypatch.setattr(listing_module, "CHUNK", 3)
    real = Listing.add_todo
    calls = []

    def fail_second_chunk(self, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self, rows)

    with monkeypatch.context() as m:
        m.setattr(Listing, "add_todo", fail_second_chunk)
        with pytest.raises(KeyboardInterrupt):
            index_folder(photos, store)
    assert not (store / LISTING_FILE).exists()
    with Store.open(store) as st:
        assert len(st.db) == N  # nothing was changed yet
    report = index_folder(photos, store)
    assert (report.added, report.unchanged, report.images) == (7, N, N + 7)


@pytest.mark.usefixtures("s3_server")
def test_a_bucket_run_takes_every_object_fact_from_its_listing(
    tmp_path, photos_dir, tiny_store, monkeypatch
):
    """No request per object: sizes and LastModified travel with the listing on disk."""
    from s3server import s3_client, upload_folder

    from lookalike.photos import BucketPhotos
    from lookalike.store import copy_model

    url = upload_folder(photos_dir, "facts-listed", "p")
    store = copy_model(tiny_store, tmp_path / "store")
    asked = []
    stat = BucketPhotos.stat
    monkeypatch.setattr(
        BucketPhotos, "stat", lambda self, loc: asked.append(loc) or stat(self, loc)
    )
    assert index_folder(url, store).added == N
    s3_client().put_object(
        Bucket="facts-listed",
        Key=f"p/{photo_name(4)}",
        Body=(photos_dir / photo_name(9)).read_bytes(),
    )
    again = index_folder(url, store)
    assert (again.added, again.updated, again.unchanged) == (0, 1, N - 1)
    assert asked == []
