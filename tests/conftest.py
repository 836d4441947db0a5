"""Shared fixtures: a tiny model config, seeded synthetic photos, and one store indexed once.

Session fixtures are read-only by convention: a test that changes photos or a store copies them
to its own tmp_path first (``copy_store`` does both).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lookalike.config import ModelConfig  # noqa: E402
from lookalike.store import Store  # noqa: E402

# A model that trains in a few seconds on two CPU cores; every test that trains uses it.
TINY = ModelConfig(
    image_size=32,
    filters=(8, 16, 16, 16),
    code_channels=4,
    pooled_levels=(2, 3, 4),
    embedding_dim=16,
    epochs=3,
    batch_size=16,
    patience=3,
    seed=0,
    # the quality defaults may change (issue 18 turned masks and residual levels on); the tests
    # that check what a tiny model finds keep the model they were written with;
    # tests/encoder/test_masking.py trains one with the default's masks and residual levels
    mask_ratio=0.0,
    residual=False,
)

PHOTO_SEEDS = range(30)  # photos_dir holds one photo per seed


def make_photo(rng: np.random.Generator, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A seeded synthetic "photo": a two-colour gradient with random shapes on it.

    Different generators give clearly different images (colours, layout, shapes).
    """
    w, h = size
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h) / np.sqrt(2) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    grad = (1 - t) * c0 + t * c1
    img = Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1 = x0 + int(rng.integers(w // 8, w // 2 + 1))
        y1 = y0 + int(rng.integers(h // 8, h // 2 + 1))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        elif shape == 1:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)]
            draw.polygon(pts, fill=color)
    return img


def photo_name(seed: int) -> str:
    """The path (relative to photos_dir) of the photo made from seed: two folders, JPEG and PNG."""
    folder = "a" if seed % 2 == 0 else "b"
    suffix = ".jpg" if seed % 3 else ".png"
    return f"{folder}/photo_{seed:03d}{suffix}"


def write_photo(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    """Write make_photo(seed) to path in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = make_photo(np.random.default_rng(seed), size)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, "JPEG", quality=92)
    else:
        img.save(path)
    return path


def copy_store(src_photos: Path, src_store: Path, dst: Path) -> tuple[Path, Path]:
    """Copy a photos folder and its store (mtimes kept) under dst; returns (photos, store)."""
    photos, store = dst / "photos", dst / "store"
    shutil.copytree(src_photos, photos)
    shutil.copytree(src_store, store)
    return photos, store


def trust_mtimes(store: Path) -> None:
    """Make the store's last run look an hour later than it was: no file's mtime is then recent
    enough for the next run to read it again (indexer's racy check), as when a collection was
    written long before it was indexed. Tests that count what a run reads use it."""
    with Store.open(store) as st:
        st.update_state({"last_scan": st.info.get("last_scan", 0.0) + 3600})


def png_header_only(width: int, height: int) -> bytes:
    """A tiny 1-bit greyscale PNG whose header claims width x height pixels (a bomb)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(autouse=True)
def _fresh_crop_verdicts():
    """Dedupe holds crop verdicts by content hash for the process; tests make up hashes
    (one per row number), so each test starts with none held."""
    from lookalike.dedupe import grouping

    grouping._CROP_VERDICTS.clear()


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return TINY


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """~30 distinct seeded photos in two sub-folders, JPEG and PNG. Do not modify."""
    root = tmp_path_factory.mktemp("photos")
    for seed in PHOTO_SEEDS:
        write_photo(root / photo_name(seed), seed)
    return root


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, photos_dir) -> Path:
    """A store made by index_folder(photos_dir, ..., model=TINY), once. Do not modify."""
    from lookalike.indexer import index_folder

    store = tmp_path_factory.mktemp("stores") / "tiny"
    report = index_folder(photos_dir, store, model=TINY)
    assert report.trained and report.images == len(PHOTO_SEEDS) and not report.failed
    return store


@pytest.fixture(scope="module")
def engine(tiny_store):
    """An Engine on tiny_store, one per test module. Read-only."""
    from lookalike.engine import Engine

    eng = Engine.open(tiny_store)
    yield eng
    eng.close()


@pytest.fixture
def store_copy(tmp_path, photos_dir, tiny_store) -> tuple[Path, Path]:
    """A private (photos, store) copy of photos_dir and tiny_store, free to change."""
    return copy_store(photos_dir, tiny_store, tmp_path)


def textured(seed: int, size: tuple[int, int] = (192, 144)) -> Image.Image:
    """A seeded photo-like image: detail at every scale (noise summed over octaves)."""
    rng = np.random.default_rng(seed)
    w, h = size
    out = np.zeros((h, w, 3))
    for octave in range(1, 6):
        small = rng.random((max(2, h >> octave), max(2, w >> octave), 3)) * 255
        layer = Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        out += np.asarray(layer, dtype=np.float64) / 5
    out += rng.random((h, w, 3)) * 40 - 20
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def table_rows(store: Path) -> dict[str, tuple]:
    """path -> (id, embedding, size, sha256, width, height, phash) of a store's table."""
    import sqlite3

    conn = sqlite3.connect(store / "images.sqlite")
    try:
        return {
            r[1]: (r[0], np.frombuffer(r[2], "<f4"), *r[3:])
            for r in conn.execute(
                "SELECT id, path, embedding, size, sha256, width, height, phash FROM images"
            )
        }
    finally:
        conn.close()


def assert_same_tables(a: Path, b: Path, facts: bool = True, ids: bool = True) -> None:
    """Two stores hold the same paths with the same ids, embeddings (1e-5) and file facts."""
    ra, rb = table_rows(a), table_rows(b)
    assert sorted(ra) == sorted(rb)
    for path in ra:
        if ids:
            assert ra[path][0] == rb[path][0], f"id of {path}"
        np.testing.assert_allclose(ra[path][1], rb[path][1], atol=1e-5, err_msg=path)
        if facts:
            assert ra[path][2:] == rb[path][2:], f"file facts of {path}"
