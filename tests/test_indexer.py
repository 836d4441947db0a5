"""Tests for lookalike.indexer (and the search path through lookalike.engine).

Bad files, exact copies, incremental re-indexing, and recovery from interrupted runs. Tests that
change photos or a store work on a private copy (the ``store_copy`` fixture).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTO_SEEDS, TINY, photo_name, png_header_only, trust_mtimes, write_photo

import lookalike.indexer as indexer_module
from lookalike.config import IndexOptions
from lookalike.engine import Engine
from lookalike.errors import ImageDecodeError, InvalidArgumentError
from lookalike.indexer import index_folder
from lookalike.store import Store

N = len(PHOTO_SEEDS)
ONE_EPOCH = TINY.replace(epochs=1)


def _ids(store_path: Path) -> dict[str, int]:
    with Store.open(store_path) as store:
        return {r.path: r.id for r in store.db.records()}


def _bump_mtime(path: Path, seconds: float = 100.0) -> float:
    st = path.stat()
    new = st.st_mtime + seconds
    os.utime(path, (st.st_atime, new))
    return path.stat().st_mtime


def _all_hits(engine: Engine, data: bytes):
    return engine.search_bytes(data, k=len(engine.store.db) + 5)


# --------------------------------------------------------------------------- exact copies


def test_every_photo_finds_itself_first(engine, photos_dir):
    ids = {r.path: r.id for r in engine.store.db.records()}
    assert len(ids) == N
    for seed in PHOTO_SEEDS:
        rel = photo_name(seed)
        hits = engine.search_bytes((photos_dir / rel).read_bytes(), k=5)
        assert len(hits) == 5
        assert hits[0].path == rel and hits[0].id == ids[rel], [h.path for h in hits]
        assert hits[0].score >= 0.99
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert len({h.id for h in hits}) == 5


def test_search_id_excludes_the_image_itself(engine):
    first = next(engine.store.db.records())
    hits = engine.search_id(first.id, k=3)
    assert len(hits) == 3 and first.id not in {h.id for h in hits}


def test_search_rejects_bad_k_and_non_images(engine, photos_dir):
    data = (photos_dir / photo_name(1)).read_bytes()
    with pytest.raises(InvalidArgumentError, match="k must be"):
        engine.search_bytes(data, k=0)
    with pytest.raises(ImageDecodeError):
        engine.search_bytes(b"this is not an image")
    with pytest.raises(ImageDecodeError):
        engine.search_bytes(b"")


def test_renamed_exact_copy_is_found(store_copy):
    photos, store = store_copy
    original = photo_name(4)
    copy = "b/renamed copy of four.jpg"
    shutil.copyfile(photos / original, photos / copy)
    report = index_folder(photos, store)
    assert (report.added, report.unchanged, report.removed, report.trained) == (1, N, 0, False)
    eng = Engine.open(store)
    try:
        hits = eng.search_bytes((photos / copy).read_bytes(), k=3)
        assert {h.path for h in hits[:2]} == {original, copy}
        assert all(h.score >= 0.99 for h in hits[:2])
        assert hits[2].score < hits[1].score
    finally:
        eng.close()


# --------------------------------------------------------------------------- bad files


def _write_bad_files(folder: Path, good_jpeg: Path) -> dict[str, str]:
    """Bad files under folder; returns relative path -> a word their reason must contain."""
    (folder / "bad").mkdir(parents=True, exist_ok=True)
    (folder / "bad" / "empty.jpg").write_bytes(b"")
    data = good_jpeg.read_bytes()
    (folder / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "bad" / "text.jpg").write_text("this is a text file, not a photo\n" * 20)
    (folder / "bad" / "bomb.png").write_bytes(png_header_only(20000, 20000))
    return {
        "bad/empty.jpg": "empty",
        "bad/truncated.jpg": "",
        "bad/text.jpg": "not an image",
        "bad/bomb.png": "pixels",
    }


def test_bad_files_are_reported_and_the_run_completes(tmp_path):
    photos = tmp_path / "photos"
    good = [f"g/{i:02d}.jpg" if i % 2 else f"g/{i:02d}.png" for i in range(10)]
    for i, rel in enumerate(good):
        write_photo(photos / rel, 500 + i)
    bad = _write_bad_files(photos, photos / good[1])
    write_photo(photos / "g" / ".hidden.jpg", 600)  # hidden: skipped
    (photos / "g" / "notes.txt").write_text("not an image suffix: skipped")

    report = index_folder(photos, tmp_path / "store", model=ONE_EPOCH)
    assert report.trained
    assert report.added == report.images == len(good)
    failed = {Path(f.path).relative_to(photos).as_posix(): f.error for f in report.failed}
    assert set(failed) == set(bad), failed
    for rel, word in bad.items():
        assert failed[rel] and word in failed[rel].lower(), (rel, failed[rel])
    assert all(Path(f.path).is_absolute() for f in report.failed)
    as_json = report.to_dict()["failed"]
    assert {Path(f["path"]).name for f in as_json} == {Path(p).name for p in bad}
    assert all(f["error"] for f in as_json)
    assert set(_ids(tmp_path / "store")) == set(good)

    again = index_folder(photos, tmp_path / "store")
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, len(good))
    assert len(again.failed) == len(bad)  # still reported, still not indexed
    assert again.images == len(good)


def test_bad_files_added_to_an_indexed_folder(store_copy):
    photos, store = store_copy
    bad = _write_bad_files(photos, photos / photo_name(1))
    report = index_folder(photos, store)
    assert not report.trained
    assert report.added == 0 and report.unchanged == N and report.images == N
    assert {Path(f.path).relative_to(photos).as_posix() for f in report.failed} == set(bad)


def test_indexed_file_that_becomes_unreadable_is_dropped(store_copy):
    photos, store = store_copy
    rel = photo_name(7)
    gone_id = _ids(store)[rel]
    (photos / rel).write_bytes(b"garbage" * 100)
    report = index_folder(photos, store)
    assert [Path(f.path).name for f in report.failed] == [Path(rel).name]
    assert report.images == N - 1
    assert rel not in _ids(store)
    eng = Engine.open(store)
    try:
        hits = _all_hits(eng, (photos / photo_name(8)).read_bytes())
        assert gone_id not in {h.id for h in hits} and len(hits) == N - 1
    finally:
        eng.close()


def test_missing_folder_and_too_few_images(tmp_path):
    with pytest.raises(InvalidArgumentError, match="not found"):
        index_folder(tmp_path / "missing", tmp_path / "store")
    assert not (tmp_path / "store").exists()
    write_photo(tmp_path / "one" / "only.jpg", 1)
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        index_folder(tmp_path / "one", tmp_path / "store2", model=ONE_EPOCH)


# --------------------------------------------------------------------------- incremental


def test_incremental_reindex(store_copy):
    photos, store = store_copy
    before = _ids(store)
    added = ["a/new_1.jpg", "b/new_2.png", "c/new_3.jpg"]  # c/ is a new folder
    for i, rel in enumerate(added):
        write_photo(photos / rel, 1000 + i)
    changed = photo_name(5)
    write_photo(photos / changed, 2000)  # different picture, same path
    _bump_mtime(photos / changed)
    deleted = [photo_name(2), photo_name(11)]
    deleted_bytes = [(photos / rel).read_bytes() for rel in deleted]
    for rel in deleted:
        (photos / rel).unlink()

    report = index_folder(photos, store)
    assert report.trained is False
    assert (report.added, report.updated, report.removed) == (3, 1, 2)
    assert report.unchanged == N - 1 - 2
    assert report.reembedded == 0 and report.failed == []
    assert report.images == N + 3 - 2

    again = index_folder(photos, store)
    assert (again.added, again.updated, again.removed, again.reembedded) == (0, 0, 0, 0)
    assert again.unchanged == again.images == N + 1
    assert not again.trained and again.failed == []

    after = _ids(store)
    for rel, image_id in before.items():
        if rel not in deleted:
            assert after[rel] == image_id, rel  # unchanged and updated files keep their id
    deleted_ids = {before[rel] for rel in deleted}
    new_ids = {after[rel] for rel in added}
    assert not new_ids & set(before.values())  # fresh ids, never reused
    assert set(after) == (set(before) - set(deleted)) | set(added)

    eng = Engine.open(store)
    try:
        assert len(eng.store.index) == N + 1
        for data in deleted_bytes:
            hits = _all_hits(eng, data)
            assert len(hits) == N + 1
            assert not {h.id for h in hits} & deleted_ids
        for rel in added + [changed]:
            hits = eng.search_bytes((photos / rel).read_bytes(), k=1)
            assert hits[0].path == rel and hits[0].score >= 0.99
    finally:
        eng.close()


def test_touching_mtime_without_changing_bytes_is_unchanged(store_copy):
    photos, store = store_copy
    rels = [photo_name(3), photo_name(6)]
    ids = _ids(store)
    with Store.open(store) as st:
        sha = {rel: st.db.by_path(rel).sha256 for rel in rels}
    new_mtimes = {rel: _bump_mtime(photos / rel) for rel in rels}
    report = index_folder(photos, store)
    assert (report.added, report.updated, report.removed, report.reembedded) == (0, 0, 0, 0)
    assert report.unchanged == N
    with Store.open(store) as st:
        for rel in rels:
            rec = st.db.by_path(rel)
            assert rec.id == ids[rel] and rec.sha256 == sha[rel]
            assert rec.mtime == new_mtimes[rel]  # recorded: the next run need not hash it
    assert _ids(store) == ids


def _rewrite_same_size_and_mtime(path: Path, seed: int) -> None:
    """Another picture in the same bytes' length (an uncompressed BMP), under the old mtime: what a
    file system with whole-second (FAT: 2 s) timestamps, or S3's LastModified, shows of a rewrite
    within the same second."""
    st = path.stat()
    write_photo(path, seed)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_rewrite_hidden_by_a_coarse_mtime_is_seen_when_the_mtime_was_recent(store_copy):
    """As git's "racy clean" check: a file whose mtime was within racy_seconds of the run that
    indexed it is read again by the next run, so a same-size rewrite in the same timestamp tick
    is found; an mtime well before that run is trusted."""
    photos, store = store_copy
    recent, old = photos / "new" / "recent.bmp", photos / "new" / "old.bmp"
    write_photo(recent, 500)
    write_photo(old, 501)
    os.utime(old, (1_000_000_000, 1_000_000_000))  # 2001: long before any run
    first = index_folder(photos, store)
    assert first.added == 2
    with Store.open(store) as st:
        sha = {p.name: st.db.by_path(f"new/{p.name}").sha256 for p in (recent, old)}
        assert st.info["last_scan"] <= recent.stat().st_mtime + 5  # it is racy

    _rewrite_same_size_and_mtime(recent, 600)
    _rewrite_same_size_and_mtime(old, 601)
    report = index_folder(photos, store)
    assert (report.updated, report.added, report.removed) == (1, 0, 0)
    with Store.open(store) as st:
        assert st.db.by_path("new/recent.bmp").sha256 != sha["recent.bmp"]  # seen
        assert st.db.by_path("new/old.bmp").sha256 == sha["old.bmp"]  # trusted: the limit
    again = index_folder(photos, store)  # the racy file is checked once more, then settled
    assert (again.updated, again.reembedded, again.unchanged) == (0, 0, again.images)


def test_ivf_requested_on_a_small_collection_stays_exact(store_copy):
    photos, store = store_copy
    report = index_folder(photos, store, options=IndexOptions(index_type="ivf"))
    assert report.unchanged == N
    with Store.open(store) as st:
        assert st.info["index_type"] == "flat"  # too few vectors to train IVF lists
        assert len(st.index) == N


def test_unknown_index_type_is_refused_before_any_work(store_copy):
    photos, store = store_copy
    write_photo(photos / "a" / "extra.jpg", 3000)
    with Store.open(store) as st:
        generation = st.db.generation
    with pytest.raises(InvalidArgumentError, match="index type"):
        index_folder(photos, store, options=IndexOptions(index_type="bogus"))
    with Store.open(store) as st:
        assert st.db.generation == generation, "the table was written before the bad option"
        assert st.db.by_path("a/extra.jpg") is None


# --------------------------------------------------------------------------- interrupted runs


def test_run_interrupted_before_the_index_is_saved(store_copy, monkeypatch):
    photos, store = store_copy
    for i in range(3):
        write_photo(photos / "new" / f"{i}.jpg", 4000 + i)
    (photos / photo_name(9)).unlink()

    def interrupted(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Store, "save_index", interrupted)
        with pytest.raises(KeyboardInterrupt):
            index_folder(photos, store)

    with Store.open(store) as st:
        assert len(st.db) == N + 3 - 1  # the table has the work
        assert not (store / f"index-{st.db.generation}.faiss").exists()  # the index is stale
    eng = Engine.open(store)
    try:
        assert len(eng.store.index) == N + 2  # rebuilt from the table
        assert eng.store.index_path.name == f"index-{eng.store.db.generation}.faiss"
        hits = eng.search_bytes((photos / "new" / "1.jpg").read_bytes(), k=1)
        assert hits[0].path == "new/1.jpg" and hits[0].score >= 0.99
    finally:
        eng.close()
    report = index_folder(photos, store)
    assert (report.added, report.updated, report.removed) == (0, 0, 0)
    assert report.unchanged == report.images == N + 2


def test_run_interrupted_between_batches_is_continued(store_copy, monkeypatch):
    photos, store = store_copy
    added = [f"new/{i}.jpg" for i in range(5)]
    for i, rel in enumerate(added):
        write_photo(photos / rel, 5000 + i)
    (photos / photo_name(10)).unlink()
    trust_mtimes(store)  # only the new files are to do
    real_iter_batches = indexer_module.iter_batches

    def one_batch_then_interrupt(*args, **kwargs):
        batches = real_iter_batches(*args, **kwargs)
        yield next(batches)
        batches.close()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(indexer_module, "iter_batches", one_batch_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            index_folder(photos, store, options=IndexOptions(batch_size=2))

    with Store.open(store) as st:
        assert len(st.db) == N - 1 + 2  # the removal and the first batch were committed
    eng = Engine.open(store)
    try:
        assert len(eng.store.index) == N + 1
        assert eng.store.index_path.name == f"index-{eng.store.db.generation}.faiss"
    finally:
        eng.close()

    report = index_folder(photos, store, options=IndexOptions(batch_size=2))
    assert (report.added, report.updated, report.removed) == (3, 0, 0)
    assert report.unchanged == N - 1 + 2
    assert report.images == N + 4
    eng = Engine.open(store)
    try:
        assert len(eng.store.index) == N + 4
        for rel in added:
            hits = eng.search_bytes((photos / rel).read_bytes(), k=1)
            assert hits[0].path == rel and hits[0].score >= 0.99
    finally:
        eng.close()


def test_deleted_index_file_then_an_index_run(store_copy):
    photos, store = store_copy
    for path in store.glob("index-*.faiss"):
        os.remove(path)
    write_photo(photos / "a" / "late.png", 6000)
    report = index_folder(photos, store)
    assert (report.added, report.unchanged, report.images) == (1, N, N + 1)
    with Store.open(store) as st:
        assert st.index_path.exists()
        assert st.index_path.name == f"index-{st.db.generation}.faiss"
        assert len(st.index) == N + 1
        ids = np.array(sorted(r.id for r in st.db.records()))
        vecs = st.index.reconstruct(ids)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_rows_without_a_phash_get_one_at_the_next_run(store_copy):
    photos, store = store_copy
    with Store.open(store) as st:
        hashes = {r.path: r.phash for r in st.db.records()}
        assert None not in hashes.values()
        st.db.conn.execute("UPDATE images SET phash = NULL")  # as an older version left them
    ids = _ids(store)
    report = index_folder(photos, store)
    assert report.reembedded == report.unchanged == N and report.added == report.updated == 0
    with Store.open(store) as st:
        assert {r.path: r.phash for r in st.db.records()} == hashes
        assert st.db.without_phash() == set()
    assert _ids(store) == ids
    assert index_folder(photos, store).reembedded == 0
