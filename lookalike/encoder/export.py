"""Export the whole embedding to ONNX and check that the portable model reproduces it.

The exported graph is :func:`lookalike.encoder.embed.embedding_function` itself -- views,
encoder, mean over views, whitening, L2 normalisation -- converted by tf2onnx (opset 17), so
the runtime has nothing to re-implement. The check embeds a seeded sample of the training
images both ways and requires a cosine of at least MIN_COSINE for every image.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import StoreError
from .backend import native_logs_dropped
from .embed import Embedder
from .runtime import PORTABLE_FILE, PortableEmbedder

OPSET = 17
MIN_COSINE = 0.9999  # per image, portable model against the Keras embedding
CHECK_IMAGES = 1024  # seeded sample of the training images the check embeds both ways
CHECK_FILE = "export.json"  # in STORE/model: the check's record


def export_embedding(embedder: Embedder) -> bytes:
    """The embedder's whole graph as ONNX bytes: uint8 pixels in, unit vectors out."""
    import tf2onnx

    _patch_tf2onnx()
    proto, _ = tf2onnx.convert.from_function(
        embedder.function, input_signature=embedder.function.input_signature, opset=OPSET
    )
    return proto.SerializeToString()


def check_portable(portable: bytes, embedder: Embedder, pixels: np.ndarray, seed: int = 0) -> dict:
    """Embed a seeded sample of pixels with both; the record of the per-image cosines."""
    n = len(pixels)
    pick = np.arange(n)
    if n > CHECK_IMAGES:
        pick = np.sort(np.random.default_rng(seed).choice(n, CHECK_IMAGES, replace=False))
    sample = np.asarray(pixels[pick])
    ref = embedder(sample)
    got = PortableEmbedder(portable, embedder.cfg)(sample)
    cos = np.sum(ref * got, axis=1) / np.maximum(
        np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-12
    )
    return {
        "images": int(len(sample)),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.abs(ref - got).max()),
        "threshold": MIN_COSINE,
        "ok": bool(cos.min() >= MIN_COSINE),
        "opset": OPSET,
        "versions": {name: _version(name) for name in ("tf2onnx", "onnxruntime", "onnx")},
    }


def export_checked(embedder: Embedder, pixels: np.ndarray, seed: int = 0) -> tuple[bytes, dict]:
    """Export and check; StoreError (nothing written) if any image's cosine is below the bar."""
    with native_logs_dropped():  # grappler and oneDNN lines while converting
        portable = export_embedding(embedder)
        record = check_portable(portable, embedder, pixels, seed)
    if not record["ok"]:
        raise StoreError(
            f"the exported model does not reproduce the Keras embedding (lowest cosine "
            f"{record['min_cosine']:.6f} < {MIN_COSINE} on {record['images']} images); "
            "the store keeps its previous model"
        )
    return portable, record


def export_store_model(model_dir: Path, cfg: ModelConfig, pixels: np.ndarray) -> dict:
    """Give a store trained before the portable model its model/embed.onnx (checked on pixels).

    The record is written first and the ONNX file renamed into place last, so embed.onnx exists
    only complete and checked; two processes doing this at once write the same bytes.
    """
    embedder = Embedder.load(model_dir / "encoder.keras", model_dir / "whitening.npz", cfg)
    portable, record = export_checked(embedder, pixels, cfg.seed)
    record["exported_on_first_use"] = True  # not at the end of training
    write_check(model_dir, record)
    tmp = model_dir / f"{PORTABLE_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(portable)
    os.replace(tmp, model_dir / PORTABLE_FILE)
    return record


def write_check(model_dir: Path, record: dict) -> None:
    tmp = model_dir / f"{CHECK_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, model_dir / CHECK_FILE)


def synthetic_pixels(size: int, n: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth seeded colour images with some noise, to check an export when no photo is readable."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (n, 4, 4, 3))
    pos = np.linspace(0, 3, size)
    i0 = np.minimum(pos.astype(int), 2)
    up = np.zeros((size, 4))
    up[np.arange(size), i0] = 1 - (pos - i0)
    up[np.arange(size), i0 + 1] = pos - i0
    img = np.einsum("ya,nabc,xb->nyxc", up, low, up) + rng.normal(0, 12, (n, size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _patch_tf2onnx() -> None:
    """tf2onnx 1.17 predates NumPy 2; Keras ships the patch its own ONNX export applies."""
    try:
        from keras.src.export.tf2onnx_lib import patch_tf2onnx
    except ImportError:  # a Keras without it: tf2onnx may already support NumPy 2
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        patch_tf2onnx()
