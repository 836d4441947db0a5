"""Tests for lookalike.store: opening, versions, the model folder, and index recovery."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import PHOTO_SEEDS, TINY

from lookalike.errors import (
    StoreError,
    StoreNotFoundError,
    StoreNotTrainedError,
    StoreVersionError,
)
from lookalike.store import FORMAT_VERSION, METRIC, UPLOAD_PREFIX, Store, write_json_atomic


def _edit_info(store_path, **changes):
    path = store_path / "info.json"
    info = json.loads(path.read_text())
    info.update(changes)
    path.write_text(json.dumps(info))


# --------------------------------------------------------------------------- opening


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no lookalike store at .*no such folder"):
        Store.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="no lookalike store"):
        Store.open(tmp_path / "empty")


def test_create_makes_an_empty_untrained_store(tmp_path):
    with Store.open(tmp_path / "new" / "store", create=True) as store:
        assert (store.root / "info.json").exists()
        assert (store.root / "images.sqlite").exists()
        assert not store.is_trained and store.model_serial == 0
        assert len(store.db) == 0
        with pytest.raises(StoreNotTrainedError, match="no trained model"):
            store.model_config()
        with pytest.raises(StoreNotTrainedError):
            _ = store.dim
        with pytest.raises(StoreNotTrainedError):
            store.load_embedder()
    info = json.loads((tmp_path / "new" / "store" / "info.json").read_text())
    assert info["format_version"] == FORMAT_VERSION
    with Store.open(tmp_path / "new" / "store") as again:  # now it exists
        assert not again.is_trained


def test_create_refuses_a_non_empty_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "stuff.txt").write_text("mine")
    with pytest.raises(StoreNotFoundError, match="not empty"):
        Store.open(tmp_path, create=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stuff.txt"]


def test_incompatible_version_is_refused(tmp_path):
    with Store.open(tmp_path / "s", create=True):
        pass
    _edit_info(tmp_path / "s", format_version=999)
    with pytest.raises(StoreVersionError, match="format version 999"):
        Store.open(tmp_path / "s")
    with pytest.raises(StoreVersionError):  # create does not paper over it
        Store.open(tmp_path / "s", create=True)


def test_unreadable_info_file_is_refused(tmp_path):
    with Store.open(tmp_path / "s", create=True):
        pass
    (tmp_path / "s" / "info.json").write_text("{not json")
    with pytest.raises(StoreError, match="not a lookalike store info file"):
        Store.open(tmp_path / "s")


def test_write_json_atomic(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# --------------------------------------------------------------------------- the indexed store


def test_indexed_store_describes_itself(tiny_store, photos_dir):
    with Store.open(tiny_store) as store:
        info = store.info
        assert info["embedding_dim"] == store.dim == TINY.embedding_dim
        assert info["image_size"] == TINY.image_size
        assert info["index_type"] == "flat"
        assert info["photos_root"] == str(photos_dir.resolve())
        assert store.model_config() == TINY
        assert store.model_serial == 1
        assert store.model_dir == store.root / "model-1"
        assert len(store.index) == len(store.db)
        assert store.index_path == store.root / f"index-{store.db.generation}.faiss"
        assert store.index_path.exists()
        assert store.disk_bytes() > 0
        assert not list(store.root.glob("train-*"))  # the training cache is gone
        record = store.training_record()
        assert record["initial_val_loss"] > 0 and record["epochs_run"] >= 1
    snapshot = json.loads((tiny_store / "info.json").read_text())  # for people to read
    assert snapshot["format_version"] == FORMAT_VERSION
    assert snapshot["count"] == len(PHOTO_SEEDS)
    assert snapshot["metric"] == METRIC
    assert snapshot["embedding_dim"] == TINY.embedding_dim
    assert {"python", "lookalike", "tensorflow", "keras", "faiss", "numpy"} <= set(
        snapshot["versions"]
    )


def test_stored_embeddings_are_unit_float32(tiny_store):
    with Store.open(tiny_store) as store:
        chunks = list(store.db.embeddings(store.dim))
        vecs = np.concatenate([v for _, v in chunks])
        assert vecs.dtype == np.float32 and vecs.shape == (len(PHOTO_SEEDS), TINY.embedding_dim)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        # the index holds the same vectors under the same ids
        ids = np.concatenate([i for i, _ in chunks])
        np.testing.assert_allclose(store.index.reconstruct(ids), vecs, atol=1e-6)


def test_store_embedder_reproduces_the_stored_vectors(tiny_store, photos_dir):
    from lookalike.images import load_image

    with Store.open(tiny_store) as store:
        embed = store.load_embedder()
        records = list(store.db.records())[:5]
        pixels = np.stack([load_image(photos_dir / r.path, TINY.image_size) for r in records])
        got = embed(pixels)
        want = store.index.reconstruct(np.array([r.id for r in records]))
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_file_path(tiny_store, photos_dir):
    with Store.open(tiny_store) as store:
        assert store.file_path("a/photo_000.png") == photos_dir.resolve() / "a/photo_000.png"
        assert store.file_path(UPLOAD_PREFIX + "x.jpg") == store.uploads_dir / "x.jpg"
        assert store.uploads_dir.parent == store.root


def test_file_path_without_photos_root(tmp_path):
    with Store.open(tmp_path / "s", create=True) as store:
        with pytest.raises(StoreNotFoundError, match="photos folder"):
            store.file_path("a.jpg")


# --------------------------------------------------------------------------- recovery


def _search_all(store):
    vecs = np.concatenate([v for _, v in store.db.embeddings(store.dim)])
    return store.index.search(vecs, 5)


def test_missing_index_file_is_rebuilt_from_the_table(tmp_path, tiny_store):
    with Store.open(tiny_store) as store:
        want = _search_all(store)
    store_path = tmp_path / "store"
    shutil.copytree(tiny_store, store_path)
    for path in store_path.glob("index-*.faiss"):
        os.remove(path)
    with Store.open(store_path) as store:
        scores, ids = _search_all(store)
        assert store.index_path.exists()  # the reader could take the lock: it saved it
        assert store.index_path.name == f"index-{store.db.generation}.faiss"
    np.testing.assert_array_equal(ids, want[1])
    np.testing.assert_allclose(scores, want[0], atol=1e-5)


def test_an_index_file_of_another_generation_is_not_used(tmp_path, tiny_store):
    store_path = tmp_path / "store"
    shutil.copytree(tiny_store, store_path)
    with Store.open(store_path) as store:
        generation = store.db.generation
    (store_path / f"index-{generation}.faiss").rename(store_path / f"index-{generation - 1}.faiss")
    with Store.open(store_path) as store:
        assert len(store.index) == len(store.db)
    assert [p.name for p in store_path.glob("index*.faiss")] == [f"index-{generation}.faiss"]


def test_a_reader_never_waits_for_a_writer_to_rebuild(tmp_path, tiny_store):
    store_path = tmp_path / "store"
    shutil.copytree(tiny_store, store_path)
    for path in store_path.glob("index-*.faiss"):
        os.remove(path)
    with Store.open(store_path) as writer, writer.writing():  # another process, say
        with Store.open(store_path) as reader:
            assert len(reader.index) == len(reader.db)  # built in memory, at once
        assert not list(store_path.glob("index-*.faiss"))  # and not saved without the lock


def test_leftovers_of_a_dead_writer_are_removed_under_the_lock(tmp_path, tiny_store):
    from lookalike.engine import Engine

    store_path = tmp_path / "store"
    shutil.copytree(tiny_store, store_path)
    (store_path / "model.tmp-abc").mkdir()  # a model being written when it died
    (store_path / "model.tmp-abc" / "encoder.keras").write_bytes(b"half written")
    (store_path / "model-2").mkdir()  # complete on disk but never switched to
    (store_path / "model-2" / "config.json").write_text("{}")
    (store_path / "train-xyz").mkdir()  # a training cache
    (store_path / ".tmp-123.faiss").write_bytes(b"partial")
    with Store.open(store_path) as store:
        assert store.model_config() == TINY  # the switch is the transaction: model 1 it is
        assert (store_path / "model.tmp-abc").exists()  # a reader removes nothing
        with store.writing():
            pass
        for name in ("model.tmp-abc", "train-xyz", ".tmp-123.faiss"):
            assert not (store_path / name).exists()
    engine = Engine.open(store_path)
    try:
        hits = engine.search_vectors(engine.store.index.reconstruct(np.array([1])), 1)
        assert hits[0][0].id == 1
    finally:
        engine.close()


def test_a_legacy_store_is_migrated_into_sqlite(tmp_path, tiny_store):
    """A store of the previous layout: state in info.json, model/, index.faiss."""
    store_path = tmp_path / "store"
    shutil.copytree(tiny_store, store_path)
    with Store.open(store_path) as store:
        state, generation = dict(store.info), store.db.generation
    os.replace(store_path / "model-1", store_path / "model")
    os.replace(store_path / f"index-{generation}.faiss", store_path / "index.faiss")
    _edit_info(store_path, index_generation=generation, **state)
    import sqlite3

    with sqlite3.connect(store_path / "images.sqlite") as conn:
        conn.execute("DELETE FROM meta WHERE key LIKE 'state.%'")
    with Store.open(store_path) as store:
        assert store.model_serial == 1 and store.model_config() == TINY
        assert store.info["photos_root"] == state["photos_root"]
        assert len(store.index) == len(store.db)
        assert store.db.snapshot()[1]["model_serial"] == 1  # now in SQLite


def test_state_changes_of_two_processes_are_both_kept(tmp_path, tiny_store):
    store_path = tmp_path / "store"
    shutil.copytree(tiny_store, store_path)
    with Store.open(store_path) as st:
        st.update_state({"dedupe_threshold": 0.5})
    with Store.open(store_path) as a, Store.open(store_path) as b:
        a.info["dedupe_threshold"] = 0.9
        a.save_info()
        b.info["labels_source"] = "folders"
        b.save_info()  # b's copy still says 0.5: it must not write that back over a's 0.9
    with Store.open(store_path) as store:
        assert store.info["dedupe_threshold"] == 0.9
        assert store.info["labels_source"] == "folders"
    assert json.loads((store_path / "info.json").read_text())["dedupe_threshold"] == 0.9


def test_copy_model_makes_an_empty_store_that_embeds_like_the_trained_one(
    tmp_path, photos_dir, tiny_store
):
    import sqlite3

    from lookalike.errors import StoreNotFoundError, StoreNotTrainedError
    from lookalike.indexer import index_folder
    from lookalike.store import copy_model

    out = copy_model(tiny_store, tmp_path / "copy")
    with Store.open(out) as st:
        assert len(st.db) == 0 and st.model_serial >= 1 and st.is_trained
    report = index_folder(photos_dir, out)
    assert not report.trained and report.added == 30

    def table(root):
        conn = sqlite3.connect(root / "images.sqlite")
        try:
            return dict(conn.execute("SELECT path, embedding FROM images"))
        finally:
            conn.close()

    assert table(out) == table(tiny_store)
    with pytest.raises(StoreNotFoundError, match="not empty"):
        copy_model(tiny_store, out)
    Store.open(tmp_path / "untrained", create=True).close()
    with pytest.raises(StoreNotTrainedError):
        copy_model(tmp_path / "untrained", tmp_path / "other")
