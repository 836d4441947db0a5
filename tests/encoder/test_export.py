"""Tests for lookalike.encoder.export and .runtime: the portable embedding and its check, the
one-time export of an older store, and a query path without TensorFlow."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, photo_name

from lookalike.encoder.backend import tf
from lookalike.encoder.embed import Embedder, view_matrices
from lookalike.encoder.export import (
    MIN_COSINE,
    check_portable,
    export_checked,
    export_embedding,
    synthetic_pixels,
)
from lookalike.encoder.model import build_encoder
from lookalike.encoder.runtime import PORTABLE_FILE, PortableEmbedder
from lookalike.encoder.whitening import fit_whitening
from lookalike.errors import StoreError
from lookalike.store import Store

ROOT = Path(__file__).resolve().parents[2]
# the default architecture's pooling and input norm, and the legacy ones (GeM, /255, one view)
CONFIGS = {
    "default": TINY,
    "legacy": TINY.replace(input_norm="unit", pool_grids=1, tta_scales=(1.0,), flip_average=False),
    "residual": TINY.replace(residual=True),
}


def _embedder(cfg, seed=0) -> Embedder:
    """An untrained encoder (seeded) with a whitening fitted on seeded images."""
    import keras

    keras.utils.set_random_seed(seed)
    encoder = build_encoder(cfg)
    raw = Embedder(encoder, None, cfg)
    return Embedder(encoder, fit_whitening(raw, synthetic_pixels(cfg.image_size, 64, 1), cfg), cfg)


@pytest.mark.parametrize("name", CONFIGS)
def test_portable_model_reproduces_the_keras_embedding(name):
    cfg = CONFIGS[name]
    embedder = _embedder(cfg)
    portable, record = export_checked(embedder, synthetic_pixels(cfg.image_size, 48, 2))
    assert record["ok"] and record["images"] == 48 and record["min_cosine"] >= MIN_COSINE
    runtime = PortableEmbedder(portable, cfg)
    assert runtime.dim == embedder.dim == cfg.embedding_dim and runtime.cfg == cfg
    pixels = synthetic_pixels(cfg.image_size, 40, 3)  # other images than the check's
    want, got = embedder(pixels), runtime(pixels)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.sum(want * got, axis=1).min() >= MIN_COSINE
    # one image (the one-thread session) and a big batch in chunks give the same rows
    np.testing.assert_allclose(runtime(pixels[:1]), got[:1], atol=1e-5)
    np.testing.assert_allclose(runtime(pixels, batch_size=7), got, atol=1e-5)
    assert runtime(pixels[:0]).shape == (0, cfg.embedding_dim)
    with pytest.raises(ValueError, match="expected pixels of shape"):
        runtime(pixels[:, :8])


def test_view_matrices_sample_as_crop_and_resize():
    cfg = TINY.replace(tta_scales=(1.0, 0.8, 0.5))
    s = cfg.image_size
    x = np.random.default_rng(0).uniform(0, 255, (3, s, s, 3)).astype(np.float32)
    views = view_matrices(cfg)
    assert len(views) == 6  # three scales and their mirrors
    for (rows, cols), (scale, flip) in zip(
        views, [(c, f) for f in (0, 1) for c in (1.0, 0.8, 0.5)]
    ):
        o = (1.0 - scale) / 2
        want = tf.image.crop_and_resize(x, [[o, o, 1 - o, 1 - o]] * 3, [0, 1, 2], [s, s]).numpy()
        want = want[:, :, ::-1] if flip else want
        got = np.einsum("ij,njkc,lk->nilc", rows, x, cols)
        np.testing.assert_allclose(got, want, atol=1e-3)


def test_a_portable_model_that_does_not_reproduce_the_embedding_is_refused(monkeypatch):
    cfg = CONFIGS["legacy"]
    other = export_embedding(_embedder(cfg, seed=1))  # another model's graph
    monkeypatch.setattr("lookalike.encoder.export.export_embedding", lambda embedder: other)
    with pytest.raises(StoreError, match="does not reproduce the Keras embedding"):
        export_checked(_embedder(cfg), synthetic_pixels(cfg.image_size, 16))
    record = check_portable(other, _embedder(cfg), synthetic_pixels(cfg.image_size, 16))
    assert not record["ok"] and record["min_cosine"] < MIN_COSINE


def test_a_trained_store_holds_its_checked_portable_model(tiny_store):
    model = tiny_store / "model-1"
    assert (model / PORTABLE_FILE).stat().st_size > 0
    record = json.loads((model / "export.json").read_text())
    assert record["ok"] and record["min_cosine"] >= MIN_COSINE and record["images"] >= 2


def test_an_older_store_gets_its_portable_model_exported_once(store_copy, caplog):
    photos, root = store_copy
    (root / "model-1" / PORTABLE_FILE).unlink()  # as a store trained before the portable model
    (root / "model-1" / "export.json").unlink()
    with Store.open(root) as store, caplog.at_level(logging.WARNING, "lookalike.store"):
        embedder = store.load_embedder()
        assert [r.getMessage() for r in caplog.records if "exporting" in r.getMessage()]
        assert (root / "model-1" / PORTABLE_FILE).exists()
        record = json.loads((root / "model-1" / "export.json").read_text())
        assert record["ok"] and record["images"] >= 16  # checked on the store's own photos
        caplog.clear()
        assert store.ensure_portable_model() is False  # once
        store.load_embedder()
        assert not [r for r in caplog.records if "exporting" in r.getMessage()]
        # it embeds as the stored vectors were embedded
        from lookalike.images import load_image

        records = list(store.db.records())[:4]
        pixels = np.stack([load_image(photos / r.path, TINY.image_size) for r in records])
        want = store.index.reconstruct(np.array([r.id for r in records]))
        assert np.sum(embedder(pixels) * want, axis=1).min() >= MIN_COSINE


def _clean_python(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run the interpreter with args in a minimal environment (no TF_* settings)."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=timeout,
    )


QUERY = """
import sys
from lookalike.engine import Engine
engine = Engine.open(sys.argv[1])
hits = engine.search_bytes(open(sys.argv[2], "rb").read(), k=3)
assert hits[0].score > 0.99, hits
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx"))
print("heavy:", heavy)
"""


def test_the_query_path_imports_no_tensorflow(tiny_store, photos_dir):
    photo = photos_dir / photo_name(0)
    result = _clean_python("-c", QUERY, str(tiny_store), str(photo), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout
    assert result.stderr == ""  # nothing from any framework


def test_cli_search_is_quiet_and_tensorflow_free(tiny_store, photos_dir):
    photo = photos_dir / photo_name(1)
    result = _clean_python(
        *["-X", "importtime", "-m", "lookalike", "search", str(photo)],
        *["--store", str(tiny_store), "-k", "2", "--json"],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()]
    assert "onnxruntime" in imported
    assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx")]
    noise = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert noise == []


NO_TENSORFLOW = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras"):
            raise ImportError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from lookalike.cli import main
sys.argv = ["lookalike", "search", sys.argv[2], "--store", sys.argv[1]]
main()
"""


def test_an_older_store_without_tensorflow_says_what_to_install(store_copy, photos_dir):
    _, root = store_copy
    (root / "model-1" / PORTABLE_FILE).unlink()
    result = _clean_python(
        "-c", NO_TENSORFLOW, str(root), str(photos_dir / photo_name(2)), timeout=120
    )
    assert result.returncode == 1
    assert "pip install 'lookalike[train]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "model-1" / PORTABLE_FILE).exists()


TRAIN = """
import json, sys
from lookalike.config import ModelConfig
from lookalike.indexer import index_folder
cfg = ModelConfig.from_dict(json.loads(sys.argv[3]))
report = index_folder(sys.argv[1], sys.argv[2], model=cfg)
print("trained", report.trained, report.images)
"""


@pytest.mark.slow
def test_training_and_export_print_no_framework_lines(tmp_path, photos_dir):
    cfg = json.dumps(TINY.replace(epochs=1).to_dict())
    result = _clean_python("-c", TRAIN, str(photos_dir), str(tmp_path / "s"), cfg, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "trained True" in result.stdout
    assert result.stderr == ""
    assert (tmp_path / "s" / "model-1" / PORTABLE_FILE).exists()
