"""Finding and decoding images: the one preprocessing path for training, indexing and queries."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageDecodeError, ImageError, ImageTooLargeError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF"})
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; larger images are refused as possible bombs
# EXIF orientation -> the transpose that displays the image upright (5-8 swap width and height)
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image and the facts the store keeps about its file."""

    path: Path
    pixels: np.ndarray  # (size, size, 3) uint8 RGB
    width: int  # original width after EXIF orientation
    height: int
    nbytes: int  # file size in bytes
    sha256: str  # of the file's bytes


@dataclass(frozen=True)
class FailedImage:
    """A file that could not be used, and why."""

    path: Path
    error: str


def find_images(root: Path | str) -> Iterator[Path]:
    """Image files under root, recursively; hidden files and folders skipped.

    The order is stable: each folder's files by name, then its sub-folders by name.
    """
    root = Path(root)
    if root.is_file():
        yield root
        return
    if not root.is_dir():
        raise ImageError(f"no such folder or file: {root}")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath) / name


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"unreadable image header: {exc}") from None
    if img.format not in FORMATS:
        raise ImageDecodeError(
            f"unsupported format {img.format}; expected JPEG, PNG, WebP, GIF, BMP or TIFF"
        )
    if img.width * img.height > max_pixels:
        raise ImageTooLargeError(
            f"{img.width}x{img.height} = {img.width * img.height:,} pixels is over the limit "
            f"of {max_pixels:,}"
        )
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited on white, 16-bit scaled to 8-bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if (img.mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(
    data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, int, int]:
    """Decode image bytes to a (size, size, 3) uint8 RGB array; also the oriented width, height.

    EXIF orientation is applied, every mode becomes RGB, GIFs give their first frame, and JPEGs
    are decoded at a reduced DCT scale (draft mode) when the target is much smaller. The whole
    image is resized to the square (no crop), so nothing of it is lost.
    """
    img = _open(data, max_pixels)
    try:
        orientation = img.getexif().get(0x0112, 1)
        width, height = img.size
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", (size, size))  # scale 1/2, 1/4 or 1/8, never below size
        img.load()
        if orientation in _EXIF_TRANSPOSE:  # not ImageOps.exif_transpose: it re-encodes the EXIF
            img = img.transpose(_EXIF_TRANSPOSE[orientation])
        pixels = to_pixels(img, size)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"too many pixels: {exc}") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        IndexError,
        KeyError,
        TypeError,
        ZeroDivisionError,
        struct.error,
    ) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from None
    return pixels, width, height


def to_pixels(img: Image.Image, size: int) -> np.ndarray:
    """An upright Pillow image -> (size, size, 3) uint8 RGB: decode's last step, for every input."""
    img = _to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(img, dtype=np.uint8)


def from_pil(img: Image.Image, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A Pillow image (its EXIF orientation applied, as for files) -> (size, size, 3) uint8."""
    if img.width * img.height > max_pixels:
        raise ImageTooLargeError(
            f"{img.width}x{img.height} = {img.width * img.height:,} pixels is over the limit "
            f"of {max_pixels:,}"
        )
    orientation = img.getexif().get(0x0112, 1)
    if orientation in _EXIF_TRANSPOSE:
        img = img.transpose(_EXIF_TRANSPOSE[orientation])
    try:
        return to_pixels(img, size)
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"cannot use the image: {exc}") from None


def array_to_pil(array: np.ndarray) -> Image.Image:
    """An image array -> Pillow: (H, W, 3|4) or (H, W) grey; uint8 0-255 or float 0-1."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise ImageDecodeError(
            f"an image array must be (H, W, 3), (H, W, 4) or (H, W) grey, got shape {a.shape}"
        )
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < -1e-3 or a.max() > 1 + 1e-3:
            raise ImageDecodeError("a float image array must hold values in [0, 1]")
        a = np.rint(np.clip(a, 0, 1) * 255.0).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise ImageDecodeError(
            f"an image array must be uint8 (0-255) or float (0-1), got {a.dtype}"
        )
    return Image.fromarray(np.ascontiguousarray(a))


def thumbnail(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A JPEG of the image fitted into size x size, aspect ratio kept, EXIF orientation applied."""
    img = _open(data, max_pixels)
    try:
        orientation = img.getexif().get(0x0112, 1)
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", (size, size))
        img.load()
        if orientation in _EXIF_TRANSPOSE:
            img = img.transpose(_EXIF_TRANSPOSE[orientation])
        img = _to_rgb(img)
        img.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85, optimize=True)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from None
    return buf.getvalue()


def phash64(pixels: np.ndarray) -> int:
    """The 64-bit perceptual hash (imagehash.phash) of decoded pixels, as a signed int64.

    pixels: (size, size, 3) uint8 RGB from ``decode``, so no second decode is needed; the hash
    shrinks the image to 32 x 32 grey anyway. Bit 63 is the hash's first (top-left) DCT bit;
    the value is stored two's-complement so that SQLite's INTEGER holds it.
    """
    import imagehash  # imports scipy on first use: not at import time

    bits = imagehash.phash(Image.fromarray(np.asarray(pixels, dtype=np.uint8))).hash.ravel()
    value = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return value - (1 << 64) if value >= 1 << 63 else value


def load_image(
    source: Path | str | bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """The single preprocessing function: a file path or bytes -> (size, size, 3) uint8 RGB."""
    data = source if isinstance(source, bytes) else read_file(Path(source))
    return decode(data, size, max_pixels=max_pixels)[0]


def read_file(path: Path) -> bytes:
    """A file's bytes, with a clear error when it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(f"no such file: {path}") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {path}: {exc.strerror or exc}") from None


def decode_file(path: Path, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read, hash and decode one file."""
    data = read_file(path)
    pixels, width, height = decode(data, size, max_pixels=max_pixels)
    return DecodedImage(path, pixels, width, height, len(data), hashlib.sha256(data).hexdigest())


def _decode_or_fail(path: Path, size: int, max_pixels: int) -> DecodedImage | FailedImage:
    try:
        return decode_file(path, size, max_pixels=max_pixels)
    except ImageError as exc:
        return FailedImage(path, str(exc))
    except Exception as exc:  # a decoder bug on one odd file must not stop a batch run
        return FailedImage(path, f"cannot decode image: {type(exc).__name__}: {exc}")


def iter_batches(
    paths: Iterable[Path],
    size: int,
    batch_size: int,
    *,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[list[DecodedImage], list[FailedImage]]]:
    """Decode files in batches on a thread pool, one batch ahead of the consumer.

    Only two batches are ever in memory, so memory stays flat however many paths there are.
    """

    def chunks() -> Iterator[list[Path]]:
        chunk: list[Path] = []
        for p in paths:
            chunk.append(p)
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: list[Future] | None = None
        for chunk in chunks():
            submitted = [pool.submit(_decode_or_fail, p, size, max_pixels) for p in chunk]
            if pending is not None:
                yield _split([f.result() for f in pending])
            pending = submitted
        if pending is not None:
            yield _split([f.result() for f in pending])


def _split(
    results: Sequence[DecodedImage | FailedImage],
) -> tuple[list[DecodedImage], list[FailedImage]]:
    ok = [r for r in results if isinstance(r, DecodedImage)]
    bad = [r for r in results if isinstance(r, FailedImage)]
    return ok, bad


def stack(images: Sequence[DecodedImage]) -> np.ndarray:
    """(n, size, size, 3) uint8 batch of decoded images."""
    return np.stack([im.pixels for im in images]) if images else np.zeros((0, 0, 0, 3), np.uint8)
