"""One store, many users: guard rails, model changes, locks, all-or-nothing writes (issue 13).

Each test works on a private copy of the tiny store (``store_copy``).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTO_SEEDS, TINY, photo_name
from typer.testing import CliRunner

from lookalike.cli import app
from lookalike.config import IndexOptions
from lookalike.engine import Engine
from lookalike.errors import (
    InvalidArgumentError,
    StoreBusyError,
    StoreIncompleteError,
    StoreWriteError,
)
from lookalike.index.knn import KnnIndex
from lookalike.indexer import index_folder
from lookalike.store import Store

N = len(PHOTO_SEEDS)
ONE_EPOCH = TINY.replace(epochs=1)


def _rows(store: Path) -> dict[str, tuple]:
    with Store.open(store) as st:
        return {r.path: (r.id, r.sha256, r.labels) for r in st.db.records()}


# --------------------------------------------------------------------------- guard rails


def test_an_empty_folder_does_not_wipe_the_store(store_copy, tmp_path):
    photos, store = store_copy
    with Store.open(store) as st:
        st.db.set_labels([(photo_name(PHOTO_SEEDS[0]), ("keep me",))])
        root = st.info["photos_root"]
    before = _rows(store)
    empty = tmp_path / "unmounted"
    empty.mkdir()
    with pytest.raises(InvalidArgumentError, match=r"would remove 30 of .*--prune"):
        index_folder(empty, store)
    assert _rows(store) == before  # nothing changed: rows, ids, labels
    with Store.open(store) as st:
        assert st.info["photos_root"] == root


def test_the_cli_refuses_with_one_line_and_a_non_zero_exit(store_copy, tmp_path):
    _, store = store_copy
    (tmp_path / "typo").mkdir()
    result = CliRunner().invoke(app, ["index", str(tmp_path / "typo"), "--store", str(store)])
    assert result.exit_code == 1
    assert "would remove" in result.output and "Traceback" not in result.output
    assert len(_rows(store)) == N


def test_prune_removes_and_labels_come_back_with_their_photos(store_copy, tmp_path):
    photos, store = store_copy
    rel = photo_name(PHOTO_SEEDS[0])
    with Store.open(store) as st:
        st.db.set_labels([(rel, ("beach", "holiday"))])
    half = tmp_path / "half"
    half.mkdir()
    report = index_folder(half, store, options=IndexOptions(prune=True))
    assert report.removed == N and report.images == 0
    report = index_folder(photos, store)  # the right folder again: same photos come back
    assert report.added == N
    assert _rows(store)[rel][2] == ("beach", "holiday")


def test_removing_less_than_half_needs_no_prune(store_copy):
    photos, store = store_copy
    for seed in PHOTO_SEEDS[:3]:
        (photos / photo_name(seed)).unlink()
    assert index_folder(photos, store).removed == 3


def test_a_store_path_that_is_a_file_is_one_clear_error(tmp_path, photos_dir):
    target = tmp_path / "notes.txt"
    target.write_text("not a store")
    result = CliRunner().invoke(app, ["index", str(photos_dir), "--store", str(target)])
    assert result.exit_code == 1 and "is a file, not a lookalike store" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- models


def test_a_running_engine_follows_a_retrain_by_another_process(store_copy):
    photos, store = store_copy
    engine = Engine.open(store)
    try:
        old_serial = engine.serial
        data = (photos / photo_name(PHOTO_SEEDS[3])).read_bytes()
        index_folder(
            photos, store, model=ONE_EPOCH.replace(seed=7), options=IndexOptions(retrain=True)
        )
        hits = engine.search_bytes(data, k=3)
        assert engine.serial == old_serial + 1  # the new model was loaded before embedding
        assert hits[0].path == photo_name(PHOTO_SEEDS[3]) and hits[0].score >= 0.99
        ids = engine.add_images([("new.png", (photos / photo_name(PHOTO_SEEDS[5])).read_bytes())])
        with Store.open(store) as st:
            assert st.db.file_states()["@uploads/" + st.db.get(ids[0]).path.split("/")[-1]][4] == (
                old_serial + 1
            )
    finally:
        engine.close()


def _retrain_cut_off(photos: Path, store: Path, monkeypatch, **model) -> None:
    """A retrain killed right after its new model was saved, before any row is re-embedded."""
    import lookalike.indexer as indexer_module

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(indexer_module, "_embed_here", killed)
    with pytest.raises(KeyboardInterrupt):
        index_folder(
            photos, store, model=ONE_EPOCH.replace(**model), options=IndexOptions(retrain=True)
        )
    monkeypatch.undo()


def _top(engine: Engine, photos: Path, seed: int):
    return engine.search_bytes((photos / photo_name(seed)).read_bytes(), k=3)[0]


def test_a_retrain_cut_off_after_training_opens_and_finishes(store_copy, monkeypatch):
    photos, store = store_copy
    _retrain_cut_off(photos, store, monkeypatch, embedding_dim=8)
    with Store.open(store) as st:  # a new 8-d model, every row still of the old 16-d one
        assert st.dim == 8 and st.model_serial == 2 and st.info["reembedding"] == 2
        # a reader serves the old model's complete index, not the new model's empty one
        assert len(st.index) == N and st.index.dim == 16 and st.index_model_serial == 1
        generation = st.db.generation
    assert not (store / f"index-{generation}.faiss").exists()  # no index of part of the rows
    assert (store / "model-1").is_dir()  # kept for the readers until the new index is saved
    engine = Engine.open(store)
    try:
        top = _top(engine, photos, PHOTO_SEEDS[4])
        assert engine.serial == 1 and top.path == photo_name(PHOTO_SEEDS[4]) and top.score >= 0.99
        report = index_folder(photos, store)  # the next run finishes the work
        assert report.reembedded == N
        top = _top(engine, photos, PHOTO_SEEDS[4])  # the running engine follows
        assert engine.serial == 2 and top.path == photo_name(PHOTO_SEEDS[4]) and top.score >= 0.99
    finally:
        engine.close()
    with Store.open(store) as st:
        assert {s[4] for s in st.db.file_states().values()} == {2}
        assert len(st.index) == N and "reembedding" not in st.info
        assert st.info["dedupe_calibration"]["model_serial"] == 2  # calibrated after all
        assert (store / f"index-{st.db.generation}.faiss").exists()
    assert not (store / "model-1").exists()  # the old model goes once nobody needs it


def test_a_store_from_before_model_since_keeps_its_index_during_a_retrain(store_copy, monkeypatch):
    photos, store = store_copy
    with Store.open(store) as st, st.writing():
        st.update_state({}, deletes=("model_since",))  # as an older version left it
    _retrain_cut_off(photos, store, monkeypatch)
    with Store.open(store) as st:
        assert len(st.index) == N and st.index_model_serial == 1


def test_an_engine_switching_models_during_a_retrain_loads_its_index_model(store_copy, monkeypatch):
    """The served index and the model that embeds queries never disagree: an engine that
    catches up with one retrain while the next is half-way loads the model of the index it
    serves, not the store's newest."""
    photos, store = store_copy
    engine = Engine.open(store)
    try:
        index_folder(
            photos, store, model=ONE_EPOCH.replace(seed=7), options=IndexOptions(retrain=True)
        )
        engine.store.refresh()  # the engine's store holds model 2's index; its embedder is 1's
        assert engine.store.index_model_serial == 2 and engine.serial == 1
        _retrain_cut_off(photos, store, monkeypatch, seed=11)  # model 3, same dimension
        top = _top(engine, photos, PHOTO_SEEDS[6])
        assert engine.serial == 2  # not 3: model 3 has no index yet
        assert top.path == photo_name(PHOTO_SEEDS[6]) and top.score >= 0.99
    finally:
        engine.close()


def test_what_needs_one_model_waits_for_a_retrain_half_way(store_copy, monkeypatch, tmp_path):
    photos, store = store_copy
    _retrain_cut_off(photos, store, monkeypatch)
    before = _rows(store)
    moved = tmp_path / "moved"
    for args in (["--move-to", str(moved), "--yes"], ["--json"], ["--undo"]):
        result = CliRunner().invoke(app, ["dedupe", "--store", str(store), *args])
        assert result.exit_code == 1, result.output
        assert "re-embedding its photos with a new model (0 of 30 done)" in result.output
        assert f"lookalike index {photos} --store {store}" in result.output
        assert "Traceback" not in result.output
    engine = Engine.open(store)
    try:
        with pytest.raises(StoreIncompleteError):
            engine.add_images([("new.png", (photos / photo_name(PHOTO_SEEDS[5])).read_bytes())])
    finally:
        engine.close()
    assert _rows(store) == before and not moved.exists()
    assert not (store / "uploads").exists() or not any((store / "uploads").iterdir())
    info = CliRunner().invoke(app, ["info", "--store", str(store), "--json"])
    assert json.loads(info.output)["re_embedding"] == {"model": 2, "done": 0, "of": N}
    index_folder(photos, store)
    result = CliRunner().invoke(app, ["dedupe", "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    info = CliRunner().invoke(app, ["info", "--store", str(store), "--json"])
    assert json.loads(info.output)["re_embedding"] is None


# --------------------------------------------------------------------------- locks


def test_a_write_waits_briefly_then_says_busy_and_searches_go_on(store_copy):
    photos, store = store_copy
    engine = Engine.open(store, write_timeout=4.0)
    held, release = threading.Event(), threading.Event()

    def long_job():  # another process's index run, say
        with Store.open(store) as other, other.writing():
            held.set()
            release.wait(10)

    job = threading.Thread(target=long_job)
    job.start()
    try:
        held.wait(5)
        data = (photos / photo_name(PHOTO_SEEDS[1])).read_bytes()
        done = threading.Event()
        errors = []

        def upload():
            try:
                engine.add_images([("x.png", data)])
            except StoreBusyError as exc:
                errors.append(exc)
            done.set()

        threading.Thread(target=upload, daemon=True).start()
        time.sleep(0.3)  # the upload is waiting for the lock now
        scores = []

        def searches():  # not held up by the waiting writer
            scores.extend(engine.search_bytes(data, k=1)[0].score for _ in range(20))

        searcher = threading.Thread(target=searches, daemon=True)
        searcher.start()
        searcher.join(10)
        assert not searcher.is_alive(), "searches hung"
        assert not done.is_set(), "searches waited for the writer's lock timeout"
        assert len(scores) == 20 and min(scores) >= 0.99
        assert done.wait(5) and len(errors) == 1 and "busy" in str(errors[0])
    finally:
        release.set()
        job.join()
        engine.close()
    assert len(_rows(store)) == N  # the refused upload left nothing


def test_an_upload_is_all_or_nothing_when_the_disk_fails(store_copy, monkeypatch):
    photos, store = store_copy
    engine = Engine.open(store)
    try:
        before = _rows(store)
        generation = engine.store.db.generation
        n_index = len(engine.store.index)

        def disk_full(self):
            raise StoreWriteError("cannot write index: No space left on device")

        monkeypatch.setattr(KnnIndex, "serialize", disk_full)
        data = (photos / photo_name(PHOTO_SEEDS[2])).read_bytes()
        with pytest.raises(StoreWriteError, match="No space"):
            engine.add_images([("a.png", data), ("b.png", data)])
        monkeypatch.undo()
        assert _rows(store) == before and engine.store.db.generation == generation
        assert len(engine.store.index) == n_index
        assert not list((store / "uploads").glob("*")) if (store / "uploads").exists() else True
        assert [p.name for p in store.glob("index*.faiss")] == [f"index-{generation}.faiss"]
        ids = engine.add_images([("a.png", data)])  # and it works once there is room
        assert engine.search_id(ids[0], k=1)
    finally:
        engine.close()


def test_a_full_disk_in_sqlite_is_reported_as_such(tmp_path):
    from lookalike.index.meta import ImageRecord, MetaDB

    db = MetaDB(tmp_path / "t.sqlite")
    pages = db.conn.execute("PRAGMA page_count").fetchone()[0]
    db.conn.execute(f"PRAGMA max_page_count = {pages}")
    rec = ImageRecord(0, "a.jpg", 1, 1.0, "x" * 64, 1, 1)
    with pytest.raises(StoreWriteError, match="full"):
        db.write([(rec, np.zeros(4096, np.float32))])
    assert len(db) == 0


def test_a_read_only_store_can_still_be_searched(store_copy, monkeypatch):
    import lookalike.index.meta as meta

    photos, store = store_copy
    monkeypatch.setattr(meta.os, "access", lambda path, mode: False)  # as on read-only media
    engine = Engine.open(store)
    try:
        data = (photos / photo_name(PHOTO_SEEDS[4])).read_bytes()
        assert engine.search_bytes(data, k=1)[0].score >= 0.99
        with pytest.raises(StoreWriteError, match="read-only"):
            engine.add_images([("a.png", data)])
    finally:
        engine.close()


def test_new_rows_are_not_removed_from_the_index_first(store_copy, monkeypatch):
    """FAISS remove_ids scans the whole index: adding photos must not call it for new rows."""
    from conftest import write_photo

    photos, store = store_copy
    for seed in range(500, 505):
        write_photo(photos / "new" / f"{seed}.png", seed)
    calls = []
    real = KnnIndex.remove

    def counting(self, ids):
        calls.append(len(ids))
        return real(self, ids)

    monkeypatch.setattr(KnnIndex, "remove", counting)
    assert index_folder(photos, store).added == 5
    assert not [c for c in calls if c]


def test_http_writes_get_503_with_retry_after_while_a_long_job_runs(store_copy):
    from fastapi.testclient import TestClient

    from lookalike.api.app import create_app
    from lookalike.config import Settings

    photos, store = store_copy
    data = (photos / photo_name(PHOTO_SEEDS[6])).read_bytes()
    settings = Settings(store=store, write_timeout=0.2)
    with TestClient(create_app(settings)) as client, Store.open(store) as other:
        with other.writing():  # `lookalike index` in another process, say
            r = client.post("/images", files={"file": ("a.png", data)})
            assert r.status_code == 503 and r.headers["Retry-After"]
            assert r.json()["error"] == "store_unavailable" and "busy" in r.json()["detail"]
            assert client.post("/search", files={"file": ("q.png", data)}).status_code == 200
            first = client.get("/health").json()["images"]
        assert client.post("/images", files={"file": ("a.png", data)}).status_code == 201
        assert client.get("/health").json()["images"] == first + 1


def test_a_report_to_an_unwritable_path_is_one_line(tiny_store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder is needed: unwritable even for root
    for flag in ("--csv", "--html"):
        result = CliRunner().invoke(
            app, ["dedupe", "--store", str(tiny_store), flag, str(blocker / "r.out")]
        )
        assert result.exit_code == 1, result.output
        assert "error:" in result.output and "Traceback" not in result.output


def test_the_training_sample_is_decoded_once(tmp_path, photos_dir, monkeypatch):
    """Training decodes the sample; the embedding that follows takes those pixels (files that
    changed meanwhile are read again) and stores the same vectors as a fresh decode."""
    import lookalike.images as images

    calls: list[Path] = []
    real = images._decode_or_fail

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(images, "_decode_or_fail", counting)
    store = tmp_path / "s"
    report = index_folder(photos_dir, store, model=ONE_EPOCH)
    assert report.trained and report.added == N
    assert len(calls) == N  # once each, not twice
    monkeypatch.undo()
    engine = Engine.open(store)
    try:
        for seed in PHOTO_SEEDS[:5]:
            hits = engine.search_bytes((photos_dir / photo_name(seed)).read_bytes(), k=1)
            assert hits[0].path == photo_name(seed) and hits[0].score >= 0.9999
    finally:
        engine.close()


def test_a_file_changed_after_the_training_decode_is_read_again(store_copy, monkeypatch):
    from conftest import write_photo

    import lookalike.indexer as indexer_module

    photos, store = store_copy
    victim = photos / photo_name(PHOTO_SEEDS[7])
    real_train = indexer_module._train

    def train_then_change(*args, **kwargs):
        out = real_train(*args, **kwargs)
        write_photo(victim, 9999)  # changed between the training decode and the embedding
        return out

    monkeypatch.setattr(indexer_module, "_train", train_then_change)
    index_folder(photos, store, model=ONE_EPOCH, options=IndexOptions(retrain=True))
    with Store.open(store) as st:
        import hashlib

        assert (
            st.db.by_path(photo_name(PHOTO_SEEDS[7])).sha256
            == hashlib.sha256(victim.read_bytes()).hexdigest()
        )
