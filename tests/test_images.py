"""Tests for lookalike.images: formats, modes, orientation, draft mode, bad files, batching.

Every image is made here, from a seeded generator, in pytest's tmp_path.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import png_header_only  # noqa: E402
from PIL import Image, JpegImagePlugin

from lookalike.errors import ImageDecodeError, ImageError, ImageTooLargeError, LookalikeError
from lookalike.images import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    FailedImage,
    decode,
    decode_file,
    find_images,
    iter_batches,
    load_image,
    stack,
)

SIZE = 32
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


# --------------------------------------------------------------------------- helpers


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _smooth_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth seeded RGB image (compresses well, so lossy formats stay close to it)."""
    small = _rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def _noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _halves(mode: str, size: tuple[int, int], left, right) -> Image.Image:
    """An image whose left half is `left` and right half `right`."""
    img = Image.new(mode, size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def _mean(px: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return px[rows, cols].reshape(-1, 3).astype(np.float64).mean(axis=0)


def _close(actual, expected, tol: float) -> bool:
    return bool(np.all(np.abs(np.asarray(actual, np.float64) - np.asarray(expected)) <= tol))


# Away from the middle column, so JPEG ringing at the edge does not matter.
LEFT = (slice(2, SIZE - 2), slice(2, SIZE // 2 - 3))
RIGHT = (slice(2, SIZE - 2), slice(SIZE // 2 + 3, SIZE - 2))
TOP = (slice(2, SIZE // 2 - 3), slice(2, SIZE - 2))
BOTTOM = (slice(SIZE // 2 + 3, SIZE - 2), slice(2, SIZE - 2))


# --------------------------------------------------------------------------- formats

LOSSLESS = [
    ("png", "PNG", {}),
    ("bmp", "BMP", {}),
    ("tif", "TIFF", {}),
    ("tiff", "TIFF", {"compression": "tiff_lzw"}),
    ("webp", "WEBP", {"lossless": True}),
]
LOSSY = [
    ("jpg", "JPEG", {"quality": 90}),
    ("jpeg", "JPEG", {"quality": 90, "progressive": True}),
    ("webp", "WEBP", {"quality": 90}),
    ("gif", "GIF", {}),
]


@pytest.mark.parametrize(("suffix", "fmt", "kw"), LOSSLESS + LOSSY)
def test_every_accepted_format_gives_size_square_uint8_rgb(tmp_path, suffix, fmt, kw):
    src = _smooth_rgb(48, 40, seed=1)
    path = _save(src, tmp_path / f"img.{suffix}", fmt, **kw)
    assert Image.open(path).format == fmt

    px = load_image(path, SIZE)
    assert px.shape == (SIZE, SIZE, 3)
    assert px.dtype == np.uint8

    # The whole image is squeezed into the square (no crop): close to a plain resize.
    ref = np.asarray(src.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float64)
    tol = 1.0 if (suffix, fmt, kw) in LOSSLESS else 10.0
    assert np.abs(px.astype(np.float64) - ref).mean() < tol

    _, width, height = decode(path.read_bytes(), SIZE)
    assert (width, height) == (48, 40)


@pytest.mark.parametrize("size", [1, 7, 32, 100])
def test_any_requested_size(tmp_path, size):
    path = _save(_smooth_rgb(40, 30), tmp_path / "a.png")
    assert load_image(path, size).shape == (size, size, 3)


def test_animated_gif_uses_first_frame(tmp_path):
    red = Image.new("RGB", (SIZE, SIZE), RED)
    blue = Image.new("RGB", (SIZE, SIZE), BLUE)
    path = tmp_path / "anim.gif"
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    assert getattr(Image.open(path), "n_frames", 1) == 2

    px = load_image(path, SIZE)
    assert _close(px.reshape(-1, 3).mean(axis=0), RED, 2)


def test_animated_webp_uses_first_frame(tmp_path):
    red = Image.new("RGB", (SIZE, SIZE), RED)
    blue = Image.new("RGB", (SIZE, SIZE), BLUE)
    path = tmp_path / "anim.webp"
    red.save(path, save_all=True, append_images=[blue], duration=100, lossless=True)
    assert getattr(Image.open(path), "n_frames", 1) == 2

    px = load_image(path, SIZE)
    assert _close(px.reshape(-1, 3).mean(axis=0), RED, 2)


def test_format_is_detected_from_content_not_suffix(tmp_path):
    png_named_jpg = _save(_smooth_rgb(20, 20), tmp_path / "really_a_png.jpg", "PNG")
    assert load_image(png_named_jpg, 16).shape == (16, 16, 3)


# --------------------------------------------------------------------------- modes


def test_mode_L(tmp_path):
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg")):
        path = _save(_halves("L", (SIZE, SIZE), 20, 200), tmp_path / f"l.{suffix}", fmt)
        assert Image.open(path).mode == "L"
        px = load_image(path, SIZE)
        assert _close(_mean(px, *LEFT), (20, 20, 20), 4)
        assert _close(_mean(px, *RIGHT), (200, 200, 200), 4)


def test_mode_LA_transparent_becomes_white(tmp_path):
    img = _halves("LA", (SIZE, SIZE), (0, 0), (0, 255))  # left: transparent black
    path = _save(img, tmp_path / "la.png")
    assert Image.open(path).mode == "LA"
    px = load_image(path, SIZE)
    assert _close(_mean(px, *LEFT), WHITE, 0)
    assert _close(_mean(px, *RIGHT), (0, 0, 0), 0)


def _palette_image() -> Image.Image:
    img = _halves("P", (SIZE, SIZE), 0, 1)  # left: index 0, right: index 1
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)  # 0 black, 1 red
    return img


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", "png"), ("GIF", "gif"), ("BMP", "bmp")])
def test_mode_P_without_transparency(tmp_path, fmt, suffix):
    path = _save(_palette_image(), tmp_path / f"p.{suffix}", fmt)
    opened = Image.open(path)
    assert opened.mode == "P"
    assert "transparency" not in opened.info
    px = load_image(path, SIZE)
    assert _close(_mean(px, *LEFT), (0, 0, 0), 0)
    assert _close(_mean(px, *RIGHT), RED, 0)


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", "png"), ("GIF", "gif")])
def test_mode_P_with_transparency_becomes_white(tmp_path, fmt, suffix):
    path = _save(_palette_image(), tmp_path / f"pt.{suffix}", fmt, transparency=0)
    opened = Image.open(path)
    assert opened.mode == "P"
    assert "transparency" in opened.info
    px = load_image(path, SIZE)
    assert _close(_mean(px, *LEFT), WHITE, 0)
    assert _close(_mean(px, *RIGHT), RED, 0)


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif")])
def test_mode_RGBA_transparent_becomes_white(tmp_path, fmt, suffix):
    img = _halves("RGBA", (SIZE, SIZE), (0, 0, 0, 0), (255, 0, 0, 255))
    kw = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    path = _save(img, tmp_path / f"rgba.{suffix}", fmt, **kw)
    assert Image.open(path).mode == "RGBA"
    px = load_image(path, SIZE)
    assert _close(_mean(px, *LEFT), WHITE, 0)
    assert _close(_mean(px, *RIGHT), RED, 0)


def test_mode_RGBA_half_transparent_is_blended_on_white(tmp_path):
    path = _save(Image.new("RGBA", (SIZE, SIZE), (255, 0, 0, 128)), tmp_path / "half.png")
    px = load_image(path, SIZE)
    assert _close(px.reshape(-1, 3).mean(axis=0), (255, 127, 127), 1.5)


@pytest.mark.parametrize(("fmt", "suffix"), [("JPEG", "jpg"), ("TIFF", "tif")])
def test_mode_CMYK(tmp_path, fmt, suffix):
    img = _halves("CMYK", (SIZE, SIZE), (0, 255, 255, 0), (0, 0, 0, 0))  # left red, right white
    kw = {"quality": 95} if fmt == "JPEG" else {}
    path = _save(img, tmp_path / f"cmyk.{suffix}", fmt, **kw)
    assert Image.open(path).mode == "CMYK"
    px = load_image(path, SIZE)
    assert px.shape == (SIZE, SIZE, 3)
    assert _close(_mean(px, *LEFT), RED, 8)
    assert _close(_mean(px, *RIGHT), WHITE, 8)


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", "png"), ("TIFF", "tif")])
def test_mode_16_bit_scaled_to_8_bit(tmp_path, fmt, suffix):
    arr = np.zeros((SIZE, SIZE), dtype=np.uint16)
    arr[:11] = 65535
    arr[11:22] = 32768
    arr[22:] = 0
    path = _save(Image.fromarray(arr), tmp_path / f"i16.{suffix}", fmt)
    assert Image.open(path).mode.startswith("I")

    px = load_image(path, SIZE)
    assert px.shape == (SIZE, SIZE, 3) and px.dtype == np.uint8
    assert np.all(px[:11] == 255)
    assert np.all(np.abs(px[11:22].astype(int) - 128) <= 1)
    assert np.all(px[22:] == 0)


def test_mode_16_bit_dark_image_stays_dark(tmp_path):
    # 16-bit values that happen to be small are still 16-bit: 200 / 65535 is nearly black.
    arr = np.full((SIZE, SIZE), 200, dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "dark16.png")
    assert np.all(load_image(path, SIZE) <= 1)


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", "png"), ("TIFF", "tif"), ("BMP", "bmp")])
def test_mode_1_bit(tmp_path, fmt, suffix):
    path = _save(_halves("1", (SIZE, SIZE), 0, 1), tmp_path / f"bw.{suffix}", fmt)
    assert Image.open(path).mode == "1"
    px = load_image(path, SIZE)
    assert _close(_mean(px, *LEFT), (0, 0, 0), 0)
    assert _close(_mean(px, *RIGHT), WHITE, 0)


# --------------------------------------------------------------------------- EXIF orientation


def _oriented_jpeg(path: Path, orientation: int) -> Path:
    img = _halves("RGB", (64, 32), (0, 0, 0), WHITE)  # wide: left half black
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif)
    return path


@pytest.mark.parametrize(
    ("orientation", "size", "dark", "light"),
    [
        (1, (64, 32), LEFT, RIGHT),
        (3, (64, 32), RIGHT, LEFT),  # rotated 180: left goes right
        (6, (32, 64), TOP, BOTTOM),  # rotate 90 clockwise to display: left goes to the top
        (8, (32, 64), BOTTOM, TOP),  # rotate 90 counter-clockwise: left goes to the bottom
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, size, dark, light):
    path = _oriented_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    px, width, height = decode(path.read_bytes(), SIZE)
    assert (width, height) == size
    assert _mean(px, *dark).max() < 30
    assert _mean(px, *light).min() > 225
    np.testing.assert_array_equal(load_image(path, SIZE), px)


def test_malformed_exif_never_escapes_as_a_foreign_exception(tmp_path):
    # A real-world kind of damage: a tag whose stored type does not match its standard type
    # (here tag 0x0107, a SHORT by the standard, holding an ASCII string), together with an
    # orientation that needs a rotation. decode must either decode it or raise an ImageError.
    img = _halves("RGB", (64, 32), (0, 0, 0), WHITE)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x0131] = "sw"  # Software, ASCII
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    data = buf.getvalue()
    software_entry = b"\x01\x31\x00\x02"  # big-endian tag 0x0131, type 2 (ASCII)
    assert data.count(software_entry) == 1
    data = data.replace(software_entry, b"\x01\x07\x00\x02")  # retag as 0x0107

    try:
        px, width, height = decode(data, SIZE)
    except ImageError:
        return
    assert px.shape == (SIZE, SIZE, 3)
    assert (width, height) == (32, 64)


# --------------------------------------------------------------------------- JPEG draft mode


def test_large_jpeg_uses_draft_mode_and_matches_full_decode(tmp_path, monkeypatch):
    src = _smooth_rgb(2000, 1500, seed=3)
    path = _save(src, tmp_path / "big.jpg", "JPEG", quality=90)

    drafted_sizes: list[tuple[int, int]] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original_draft(self, mode, size)
        drafted_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    px, width, height = decode(path.read_bytes(), 64)
    monkeypatch.undo()

    assert px.shape == (64, 64, 3) and px.dtype == np.uint8
    assert (width, height) == (2000, 1500)  # the original size, not the drafted one
    assert drafted_sizes, "draft() was not called for a JPEG"
    assert drafted_sizes[0][0] < 2000 and drafted_sizes[0][0] >= 64
    assert drafted_sizes[0][1] >= 64

    with Image.open(path) as full:
        ref = full.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
    diff = np.abs(px.astype(np.float64) - np.asarray(ref, dtype=np.float64)).mean()
    assert diff < 8


# --------------------------------------------------------------------------- bad files


def _valid_jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    _noise_rgb(128, 128, seed=5).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _assert_raises(path: Path, error: type[Exception]) -> None:
    for call in (lambda: load_image(path, SIZE), lambda: decode_file(path, SIZE)):
        with pytest.raises(error) as info:
            call()
        assert str(info.value)
        assert isinstance(info.value, ImageError) and isinstance(info.value, LookalikeError)


def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _assert_raises(path, ImageDecodeError)
    with pytest.raises(ImageDecodeError):
        load_image(b"", SIZE)


def test_random_bytes_with_jpg_suffix(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_raises(path, ImageDecodeError)


def test_random_bytes_after_a_jpeg_signature(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + _rng(8).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_raises(path, ImageDecodeError)


def test_truncated_jpeg(tmp_path):
    data = _valid_jpeg_bytes()
    assert load_image(data, SIZE).shape == (SIZE, SIZE, 3)  # the whole file is fine
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    _assert_raises(path, ImageDecodeError)


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    _noise_rgb(64, 64, seed=9).save(buf, "PNG")
    data = buf.getvalue()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    _assert_raises(path, ImageDecodeError)


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    _assert_raises(path, ImageDecodeError)


def test_missing_file(tmp_path):
    _assert_raises(tmp_path / "does-not-exist.jpg", ImageDecodeError)


def test_folder_instead_of_file(tmp_path):
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    _assert_raises(folder, ImageDecodeError)


@pytest.mark.parametrize(("fmt", "suffix"), [("PPM", "ppm"), ("ICO", "ico"), ("PPM", "png")])
def test_format_pillow_reads_but_we_do_not_accept(tmp_path, fmt, suffix):
    path = _save(_smooth_rgb(32, 32), tmp_path / f"other.{suffix}", fmt)
    assert Image.open(path).format == fmt  # Pillow can read it ...
    _assert_raises(path, ImageDecodeError)  # ... but it is not one of ours


def test_decompression_bomb_header_far_over_pillows_limit(tmp_path):
    data = png_header_only(20000, 20000)  # 400 million pixels in a file of ~100 bytes
    assert len(data) < 200
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    _assert_raises(path, ImageTooLargeError)


def test_decompression_bomb_header_over_our_default_limit(tmp_path):
    data = png_header_only(10000, 10000)  # 100 million: over our default, under Pillow's
    assert 10000 * 10000 > DEFAULT_MAX_PIXELS
    path = tmp_path / "big.png"
    path.write_bytes(data)
    _assert_raises(path, ImageTooLargeError)


def test_max_pixels_is_honoured(tmp_path):
    path = _save(_smooth_rgb(100, 100), tmp_path / "hundred.png")
    data = path.read_bytes()
    with pytest.raises(ImageTooLargeError) as info:
        decode(data, SIZE, max_pixels=1000)
    assert str(info.value)
    with pytest.raises(ImageTooLargeError):
        load_image(path, SIZE, max_pixels=9999)
    assert decode(data, SIZE, max_pixels=10000)[0].shape == (SIZE, SIZE, 3)  # limit inclusive


def test_error_classes():
    assert issubclass(ImageDecodeError, ImageError)
    assert issubclass(ImageTooLargeError, ImageError)
    assert not issubclass(ImageDecodeError, ImageTooLargeError)
    assert not issubclass(ImageTooLargeError, ImageDecodeError)


# --------------------------------------------------------------------------- bytes vs path


@pytest.mark.parametrize(("fmt", "suffix"), [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif")])
def test_bytes_and_path_give_the_same_pixels(tmp_path, fmt, suffix):
    path = _save(_smooth_rgb(50, 30, seed=11), tmp_path / f"same.{suffix}", fmt)
    from_path = load_image(path, SIZE)
    np.testing.assert_array_equal(load_image(path.read_bytes(), SIZE), from_path)
    np.testing.assert_array_equal(load_image(str(path), SIZE), from_path)
    np.testing.assert_array_equal(decode_file(path, SIZE).pixels, from_path)


def test_decoding_is_deterministic(tmp_path):
    path = _save(_smooth_rgb(300, 200, seed=12), tmp_path / "det.jpg", "JPEG")
    np.testing.assert_array_equal(load_image(path, SIZE), load_image(path, SIZE))


# --------------------------------------------------------------------------- find_images


def test_find_images(tmp_path):
    tiny = _smooth_rgb(8, 8)
    wanted = [
        "B.JPG",  # upper case suffix; sorts before lower case names
        "a.png",
        "c.Jpeg",
        "d.TIFF",
        "e.webp",
        "f.gif",
        "g.bmp",
        "h.tif",
        "sub/a.jpg",
        "sub/deeper/z.png",
        "zz/q.PNG",
    ]
    skipped = [
        ".hidden.jpg",
        "notes.txt",
        "noext",
        "image.jpg.txt",
        "other.ppm",
        ".git/x.jpg",
        "sub/.cache/y.png",
        "sub/.hidden.png",
    ]
    for name in wanted + skipped:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tiny.save(path, "PNG")  # the content does not matter to find_images

    found = list(find_images(tmp_path))
    assert found == [tmp_path / name for name in wanted]
    assert found == sorted(found)
    assert list(find_images(str(tmp_path))) == found  # str works too


def test_find_images_on_a_file_and_on_nothing(tmp_path):
    path = _save(_smooth_rgb(8, 8), tmp_path / "one.png")
    assert list(find_images(path)) == [path]
    with pytest.raises(ImageError):
        list(find_images(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert list(find_images(empty)) == []


# --------------------------------------------------------------------------- iter_batches


def _mixed_files(tmp_path: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Paths in input order, the good ones and the bad ones."""
    good_specs = [
        ("g1.png", "PNG", (40, 30)),
        ("g2.jpg", "JPEG", (33, 50)),
        ("g3.gif", "GIF", (20, 20)),
        ("g4.webp", "WEBP", (64, 16)),
        ("g5.bmp", "BMP", (17, 23)),
        ("g6.tif", "TIFF", (31, 29)),
    ]
    good = {
        name: _save(_smooth_rgb(w, h, seed=i), tmp_path / name, fmt)
        for i, (name, fmt, (w, h)) in enumerate(good_specs)
    }
    bad = {
        "b1.jpg": tmp_path / "b1.jpg",
        "b2.png": tmp_path / "b2.png",
        "b3.jpg": tmp_path / "b3.jpg",
        "b4.png": tmp_path / "b4.png",  # never created: missing
        "b5.png": tmp_path / "b5.png",
    }
    bad["b1.jpg"].write_bytes(_rng(21).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    bad["b2.png"].write_bytes(b"")
    data = _valid_jpeg_bytes()
    bad["b3.jpg"].write_bytes(data[: len(data) // 2])
    bad["b5.png"].write_bytes(png_header_only(20000, 20000))

    order = [
        "g1.png",
        "b1.jpg",
        "g2.jpg",
        "g3.gif",
        "b2.png",
        "b3.jpg",
        "g4.webp",
        "b4.png",
        "g5.bmp",
        "b5.png",
        "g6.tif",
    ]
    everything = {**good, **bad}
    paths = [everything[name] for name in order]
    return paths, [p for p in paths if p.name in good], [p for p in paths if p.name in bad]


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_iter_batches_mixed_good_and_bad(tmp_path, workers):
    paths, good, bad = _mixed_files(tmp_path)
    batches = list(iter_batches(iter(paths), SIZE, 3, workers=workers))

    assert len(batches) == 4  # 11 paths in batches of 3
    assert [len(ok) + len(failed) for ok, failed in batches] == [3, 3, 3, 2]
    # Every batch holds exactly the paths of its slice of the input.
    for i, (ok, failed) in enumerate(batches):
        chunk = paths[3 * i : 3 * i + 3]
        assert {d.path for d in ok} | {f.path for f in failed} == set(chunk)

    decoded = [d for ok, _ in batches for d in ok]
    failed = [f for _, fs in batches for f in fs]
    assert [d.path for d in decoded] == good
    assert [f.path for f in failed] == bad

    for d in decoded:
        assert isinstance(d, DecodedImage)
        data = d.path.read_bytes()
        assert d.sha256 == hashlib.sha256(data).hexdigest()
        assert d.nbytes == len(data) == d.path.stat().st_size
        assert d.pixels.shape == (SIZE, SIZE, 3) and d.pixels.dtype == np.uint8
        with Image.open(d.path) as im:
            assert (d.width, d.height) == im.size
        np.testing.assert_array_equal(d.pixels, load_image(d.path, SIZE))

    for f in failed:
        assert isinstance(f, FailedImage)
        assert isinstance(f.error, str) and f.error.strip()
    by_name = {f.path.name: f.error for f in failed}
    assert "pixels" in by_name["b5.png"] or "large" in by_name["b5.png"].lower()


def test_iter_batches_uneven_and_empty(tmp_path):
    paths = [_save(_smooth_rgb(10, 10, seed=i), tmp_path / f"{i}.png") for i in range(9)]
    batches = list(iter_batches(paths, 8, 4))
    assert [len(ok) for ok, _ in batches] == [4, 4, 1]
    assert [d.path for ok, _ in batches for d in ok] == paths
    assert all(not failed for _, failed in batches)

    assert list(iter_batches([], 8, 4)) == []
    one_each = list(iter_batches(paths[:2], 8, 1))
    assert [[d.path for d in ok] for ok, _ in one_each] == [[paths[0]], [paths[1]]]


def test_iter_batches_from_find_images(tmp_path):
    for name in ("a.png", "b.jpg", "c/d.gif"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _smooth_rgb(12, 12).save(path)
    batches = list(iter_batches(find_images(tmp_path), 16, 2))
    assert [d.path.name for ok, _ in batches for d in ok] == ["a.png", "b.jpg", "d.gif"]


def test_iter_batches_survives_malformed_exif(tmp_path):
    # One odd file must not stop a whole indexing run: it is either decoded or reported.
    img = _halves("RGB", (64, 32), (0, 0, 0), WHITE)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x0131] = "sw"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    odd = tmp_path / "odd.jpg"
    odd.write_bytes(buf.getvalue().replace(b"\x01\x31\x00\x02", b"\x01\x07\x00\x02"))
    fine = _save(_smooth_rgb(20, 20), tmp_path / "fine.png")

    batches = list(iter_batches([fine, odd], SIZE, 2))
    ok = [d.path for b in batches for d in b[0]]
    failed = [f.path for b in batches for f in b[1]]
    assert fine in ok
    assert (odd in ok) != (odd in failed)


def test_stack(tmp_path):
    paths = [_save(_smooth_rgb(10, 10, seed=i), tmp_path / f"{i}.png") for i in range(3)]
    images = [decode_file(p, 8) for p in paths]
    batch = stack(images)
    assert batch.shape == (3, 8, 8, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[1], images[1].pixels)
    assert stack([]).shape[0] == 0


def test_phash64_is_imagehash_phash_of_the_pixels_as_signed_int64():
    import imagehash

    from lookalike.images import phash64

    rng = np.random.default_rng(0)
    for _ in range(5):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        value = phash64(pixels)
        assert -(2**63) <= value < 2**63
        bits = imagehash.phash(Image.fromarray(pixels)).hash.ravel()
        assert [(value >> (63 - i)) & 1 for i in range(64)] == bits.astype(int).tolist()
        assert phash64(pixels) == value


# --------------------------------------------------------------------------- decode budget, slots


def _png_header(width: int, height: int, depth: int, colour: int, extra: bytes = b"") -> bytes:
    """A PNG whose header claims width x height (the pixel data is a stub: never decoded)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunks = chunk(b"IHDR", ihdr)
    if colour == 3:
        chunks += chunk(b"PLTE", bytes(range(6)))
    if extra:
        chunks += chunk(b"tRNS", extra)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunks + idat + chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int, progressive: bool = False) -> bytes:
    """A small JPEG whose frame header is patched to claim width x height."""
    buf = io.BytesIO()
    _smooth_rgb(16, 16).save(buf, "JPEG", quality=90, progressive=progressive)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _cost(data: bytes, box: int = 64) -> int:
    from lookalike.images import decode_cost

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    full = img.size
    if img.format == "JPEG":
        img.draft("RGB", (box, box))
    return decode_cost(img, full)


@pytest.mark.parametrize(
    ("depth", "colour", "trns", "per_pixel"),
    [
        (1, 0, b"", 2),  # 1-bit: itself + its grey copy
        (8, 0, b"", 1),  # grey: resized as it is
        (16, 0, b"", 6),  # 16-bit grey: itself (2) + 32-bit copy (4)
        (8, 2, b"", 4),  # RGB: Pillow holds it at 4 bytes a pixel
        (8, 6, b"", 8),  # RGBA: itself + the premultiplied copy resize makes
        (8, 3, b"", 5),  # palette: itself + RGB
        (8, 3, b"\x00", 8),  # palette with transparency: RGBA + premultiplied copy
    ],
)
def test_decode_cost_by_mode(depth, colour, trns, per_pixel):
    assert _cost(_png_header(1000, 500, depth, colour, trns)) == per_pixel * 500_000


def test_decode_cost_of_jpegs_is_at_the_draft_scale_plus_progressive_coefficients():
    camera = _jpeg_claiming(11648, 8736)  # 100 Mpx: drafted to 1/8 for a 64 or 1024 target
    assert _cost(camera, 64) == _cost(camera, 1024) == 1456 * 1092 * 4
    progressive = _jpeg_claiming(11648, 8736, progressive=True)
    coefficients = 11648 * 8736 * 3 // 2 * 2  # 4:2:0 (1.5 samples a pixel), 2 bytes each
    assert abs(_cost(progressive) - (1456 * 1092 * 4 + coefficients)) < 1000
    with Image.open(io.BytesIO(_jpeg_claiming(6000, 4000))) as img:
        assert decode_cost_of(img) == 6000 * 4000 * 4  # no draft asked: full size


def decode_cost_of(img: Image.Image) -> int:
    from lookalike.images import decode_cost

    return decode_cost(img)


def test_default_budget_takes_real_photos_and_refuses_bombs_under_the_pixel_limit():
    from lookalike.images import DEFAULT_MAX_DECODE_BYTES as budget

    assert 7999 * 7999 < DEFAULT_MAX_PIXELS
    assert _cost(png_header_only(7999, 7999)) > budget  # 1-bit: 128 MB
    assert _cost(_png_header(7999, 7999, 8, 3)) > budget  # palette: 320 MB
    assert _cost(_png_header(6000, 4000, 8, 2)) <= budget  # a 24 Mpx RGB PNG: 96 MB
    assert _cost(_jpeg_claiming(11648, 8736)) <= budget // 10  # a 100 Mpx camera JPEG: 6 MB
    assert _cost(_jpeg_claiming(6000, 4000, progressive=True)) <= budget  # 24 Mpx: 72 MB


def test_a_camera_jpeg_of_100_mpx_passes_the_budget(tmp_path):
    """Only the pixel limit stands in its way: with it raised, the budget lets it through."""
    data = _jpeg_claiming(11648, 8736)
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode(data, 64)
    px, width, height = decode(data, 64, max_pixels=120_000_000)  # 1/8 scale: a few MB
    assert px.shape == (64, 64, 3) and (width, height) == (11648, 8736)
    with pytest.raises(ImageTooLargeError, match="budget"):
        decode(_jpeg_claiming(11648, 8736, progressive=True), 64, max_pixels=120_000_000)


@pytest.mark.parametrize(
    "bomb",
    [png_header_only(7999, 7999), _png_header(7999, 7999, 8, 3)],
    ids=["1-bit", "palette"],
)
def test_bombs_are_refused_from_the_header_without_decoding(bomb, monkeypatch):
    from PIL import ImageFile

    from lookalike.images import thumbnail

    def no_decoding(self):
        raise AssertionError("a refused image must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for call in (lambda: decode(bomb, 64), lambda: thumbnail(bomb, 256)):
        with pytest.raises(ImageTooLargeError, match="LOOKALIKE_MAX_DECODE_BYTES") as info:
            call()
        assert "7999x7999" in str(info.value) and "\n" not in str(info.value)


def test_the_budget_is_inclusive_and_honoured(tmp_path):
    data = _save(_smooth_rgb(100, 50), tmp_path / "x.png").read_bytes()
    assert decode(data, SIZE, max_bytes=20_000)[0].shape == (SIZE, SIZE, 3)
    with pytest.raises(ImageTooLargeError, match="20,000 bytes"):
        decode(data, SIZE, max_bytes=19_999)
    with pytest.raises(ImageTooLargeError):
        load_image(data, SIZE, max_bytes=19_999)


def test_iter_batches_skips_and_reports_an_image_over_the_budget(tmp_path):
    good = _save(_smooth_rgb(60, 40), tmp_path / "good.png")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(7999, 7999))
    ((ok, bad),) = list(iter_batches([good, bomb], SIZE, 8))
    assert [d.path for d in ok] == [good]
    assert [f.path for f in bad] == [bomb] and "budget" in bad[0].error
    ((ok, bad),) = list(iter_batches([good], SIZE, 8, max_bytes=100))
    assert not ok and "budget" in bad[0].error


def test_grey_one_bit_and_palette_images_are_shrunk_before_they_become_rgb(tmp_path, monkeypatch):
    """No full-size RGB copy of an image that is not RGB already (1-bit: 2 bytes a pixel, not 5)."""
    conversions = []
    convert = Image.Image.convert

    def spy(self, mode=None, *args, **kwargs):
        conversions.append((self.mode, mode, self.size))
        return convert(self, mode, *args, **kwargs)

    sources = {m: _smooth_rgb(800, 600).convert(m) for m in ("1", "L", "LA", "RGBA")}
    datas = {m: _save(img, tmp_path / f"{m}.png").read_bytes() for m, img in sources.items()}
    monkeypatch.setattr(Image.Image, "convert", spy)
    for mode, data in datas.items():
        conversions.clear()
        decode(data, SIZE)
        to_rgb = [c for c in conversions if c[1] in ("RGB", "RGBA") and c[2] == (800, 600)]
        assert not to_rgb, (mode, conversions)


def test_decodes_hold_one_of_a_few_slots(tmp_path, monkeypatch):
    import os
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from lookalike import images

    assert images.DECODE_SLOTS._initial_value == max(1, os.cpu_count() or 1)
    held, peak, entered = 0, 0, 0
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(2)

    class Recorder:
        def __enter__(self):
            nonlocal held, peak, entered
            slots.acquire()
            with lock:
                held += 1
                entered += 1
                peak = max(peak, held)
            time.sleep(0.02)

        def __exit__(self, *exc):
            nonlocal held
            with lock:
                held -= 1
            slots.release()

    monkeypatch.setattr(images, "DECODE_SLOTS", Recorder())
    data = _save(_smooth_rgb(64, 48), tmp_path / "x.png").read_bytes()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: decode(data, SIZE), range(8)))
        list(pool.map(lambda _: images.thumbnail(data, 32), range(8)))
    assert entered == 16 and peak == 2


def test_pillow_maps_big_images_in_blocks_it_can_give_back():
    from lookalike import images

    assert Image.core.get_block_size() == images.BLOCK_BYTES > 32 * 1024 * 1024
