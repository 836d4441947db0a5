"""The keep rule and local-feature verification on seeded images: no model, no store."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import textured
from PIL import Image

from lookalike.dedupe import keep as keep_rule
from lookalike.dedupe.keep import measure, original_key


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def kept(paths_and_files) -> str:
    """The path the 'original' rule keeps among (table path, file) pairs."""
    keys = {p: original_key(p, measure(f), f.stat().st_size) for p, f in paths_and_files}
    return min(keys, key=keys.get)


def test_the_original_is_kept_over_an_upscaled_reencoded_copy(tmp_path):
    img = textured(1)
    orig = save(img, tmp_path / "orig.jpg", quality=90)
    big = img.resize((img.width * 2, img.height * 2), Image.Resampling.BICUBIC)
    up = save(big, tmp_path / "up.jpg", quality=70)
    assert up.stat().st_size > orig.stat().st_size  # more pixels and more bytes
    assert kept([("a/orig.jpg", orig), ("b/up.jpg", up)]) == "a/orig.jpg"


def test_the_original_is_kept_over_a_heavier_reencode_a_reduction_and_a_blur(tmp_path):
    from PIL import ImageFilter

    img = textured(2)
    orig = save(img, tmp_path / "orig.jpg", quality=92)
    q30 = save(img, tmp_path / "q30.jpg", quality=30)
    half = save(img.resize((96, 72), Image.Resampling.BILINEAR), tmp_path / "half.png")
    blur = save(img.filter(ImageFilter.GaussianBlur(1.5)), tmp_path / "blur.png")
    files = [("z/orig.jpg", orig), ("a/q30.jpg", q30), ("a/half.png", half), ("a/b.png", blur)]
    assert kept(files) == "z/orig.jpg"


def test_an_upload_is_never_kept_over_a_collection_file(tmp_path):
    img = textured(3)
    small = save(img.resize((96, 72)), tmp_path / "small.jpg", quality=60)
    best = save(img, tmp_path / "best.png")
    assert kept([("a/small.jpg", small), ("@uploads/best.png", best)]) == "a/small.jpg"


def test_an_unreadable_file_comes_last(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = save(textured(4).resize((32, 24)), tmp_path / "good.jpg", quality=50)
    assert measure(bad) is None
    assert kept([("a/bad.jpg", bad), ("b/good.jpg", good)]) == "b/good.jpg"


def test_upscale_octaves_detects_a_blown_up_image():
    g = np.asarray(textured(5).convert("L"), dtype=np.float32) / 255
    assert keep_rule.upscale_octaves(g)[0] == 0
    up = np.repeat(np.repeat(g, 2, 0), 2, 1)  # nearest-neighbour 2x: no new detail at all
    assert keep_rule.upscale_octaves(up)[0] == 1


cv2 = pytest.importorskip("cv2")


def test_verification_matches_a_crop_and_not_a_different_photo(tmp_path):
    from lookalike.dedupe.verification import MIN_MATCHES, features, matches

    img = textured(6, (320, 240))
    orig = save(img, tmp_path / "orig.jpg", quality=90)
    w, h = img.size
    crop = save(img.crop((w // 8, h // 8, w * 7 // 8, h * 7 // 8)), tmp_path / "c.jpg", quality=60)
    other = save(textured(7, (320, 240)), tmp_path / "other.jpg", quality=90)
    f = features(orig)
    assert matches(f, features(crop)) >= MIN_MATCHES
    assert matches(f, features(other)) < MIN_MATCHES
    assert matches(f, None) == 0
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"no image here")
    assert features(junk) is None
