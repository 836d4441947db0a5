"""Finding and decoding images: the one preprocessing path for training, indexing and queries."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageDecodeError, ImageError, ImageTooLargeError
from .photos import LocalPhotos, read_bytes

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF"})
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; larger images are refused as possible bombs
# Memory one decode may hold at its peak (see decode_cost). 100 MB: a 24 Mpx (6000 x 4000) PNG or
# TIFF (96 MB as Pillow holds RGB, 4 bytes a pixel) decodes; a baseline JPEG of any size within
# the pixel limit costs a few MB (draft: 1/8 scale); a 1-bit or palette image of 64 Mpx
# (128 / 320 MB) is refused, however small its file.
DEFAULT_MAX_DECODE_BYTES = 100_000_000
# Decodes running at once in this process: more would only queue for the CPUs while each holds
# its full-size image, so the memory of decoding stays under slots x the decode budget.
DECODE_SLOTS = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
# Pillow holds a big image in blocks of 16 MB; glibc serves blocks under 32 MB from per-thread
# heaps that keep the memory once the image is freed (a server decoding big images in its
# threads grew by GBs and kept them). Blocks over 32 MB are mapped on their own and go back to
# the system when freed (scripts/bench_memory_bomb.py: 0.8 GB kept -> 0).
BLOCK_BYTES = 64 * 1024 * 1024
if "PILLOW_BLOCK_SIZE" not in os.environ:  # Pillow's own setting wins
    Image.core.set_block_size(BLOCK_BYTES)
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # else 4
_RESIZABLE = frozenset({"L", "LA", "RGB", "RGBA", "I", "F"})  # resized before going to RGB
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
    yield from LocalPhotos(root).files(IMAGE_SUFFIXES)


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


def _to_rgb(img: Image.Image, top: float = 255.0) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited on white, 16-bit scaled to 8-bit.

    top: the white of a 32-bit integer or float image (I, F), measured on the full image.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
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


def _resizable_mode(img: Image.Image) -> str:
    """The mode an image is converted to at full size before it is shrunk (its own if it can)."""
    if img.mode in _RESIZABLE:
        return img.mode
    if img.mode == "1":
        return "L"
    if img.mode.startswith("I;16"):
        return "I"
    if img.mode in ("P", "PA", "RGBa", "La"):
        return "RGBA" if img.mode != "P" or "transparency" in img.info else "RGB"
    return "RGB"  # CMYK, YCbCr, LAB, HSV


def decode_cost(img: Image.Image, full_size: tuple[int, int] | None = None) -> int:
    """Bytes the decode of an opened (and drafted) image holds at its peak, from its header.

    Full-size buffers only, at the scale the image will be decoded at: the image as Pillow holds
    it (1 byte a pixel for 1-bit, grey and palette, 2 for 16-bit, 4 for the rest, RGB included),
    the copies made before it is shrunk (the EXIF turn, a palette or 1-bit image made resizable,
    the premultiplied copy Pillow makes to resize an image with alpha), and what the decoder
    holds besides: a progressive JPEG keeps every DCT coefficient of the full-size image (2 bytes
    each), WebP decodes into a buffer of its own. Two consecutive stages live at once.
    full_size: the size before draft mode (the coefficients are not reduced by it).
    """
    pixels = img.width * img.height
    source = _BYTES_PER_PIXEL.get(img.mode, 4)
    stages = [source]
    if _header_orientation(img) in _EXIF_TRANSPOSE:
        stages.append(source)
    target = _resizable_mode(img)
    if target != img.mode:
        stages.append(4 if target in ("RGB", "RGBA", "I") else 1)
    if target in ("LA", "RGBA"):
        stages.append(4)  # resize() premultiplies alpha in a copy
    peak = max([stages[0]] + [a + b for a, b in zip(stages, stages[1:])]) * pixels
    return peak + _decoder_bytes(img, full_size or img.size)


def _header_orientation(img: Image.Image) -> int:
    """The EXIF orientation known without decoding the image (1 if it is not known yet).

    Pillow finds a PNG's EXIF chunk by decoding the whole image when the chunk comes after the
    pixel data, so that orientation is only learnt once decoded (and costs one copy more).
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    return img.getexif().get(0x0112, 1)


def _decoder_bytes(img: Image.Image, full_size: tuple[int, int]) -> int:
    """Memory the format's decoder holds besides the image, while the image loads."""
    if img.format == "WEBP":
        return img.width * img.height * 4
    if img.format in ("JPEG", "MPO") and (
        img.info.get("progressive") or img.info.get("progression")
    ):
        layers = getattr(img, "layer", None) or [(None, 1, 1, 0)]
        h_max = max(layer[1] for layer in layers)
        v_max = max(layer[2] for layer in layers)
        share = sum(layer[1] * layer[2] for layer in layers) / (h_max * v_max)
        return int(full_size[0] * full_size[1] * share * 2)
    return 0


def _prepare(
    data: bytes, box: int, max_pixels: int, max_bytes: int
) -> tuple[Image.Image, tuple[int, int]]:
    """Open, draft a JPEG down towards box x box, refuse it if decoding costs too much.

    Returns the image, not yet loaded, and its size in the file (before draft mode).
    """
    img = _open(data, max_pixels)
    try:
        full_size = img.size
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", (box, box))  # scale 1/2, 1/4 or 1/8, never below box
        cost = decode_cost(img, full_size)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from None
    if cost > max_bytes:
        raise ImageTooLargeError(
            f"{full_size[0]}x{full_size[1]} {img.format} ({img.mode}) needs {cost:,} bytes of "
            f"memory to decode, over the budget of {max_bytes:,} (LOOKALIKE_MAX_DECODE_BYTES)"
        )
    return img, full_size


def _shrunk(img: Image.Image, shrink) -> tuple[Image.Image, int]:
    """Load, turn upright, shrink and convert to RGB, with as few full-size copies as can be.

    The image is shrunk in its own mode (or the nearest resizable one) before it becomes RGB,
    so a grey, 1-bit or transparent image is never held at full size as RGB. At most
    DECODE_SLOTS images are loaded at once. Returns the RGB image and its EXIF orientation.
    """
    with DECODE_SLOTS:
        img.load()
        orientation = img.getexif().get(0x0112, 1)
        if orientation in _EXIF_TRANSPOSE:  # not ImageOps.exif_transpose: it re-encodes EXIF
            img = img.transpose(_EXIF_TRANSPOSE[orientation])
        top = 255.0
        if img.mode.startswith("I;16"):
            top = 65535.0
        elif img.mode in ("I", "F"):
            top = 65535.0 if (img.getextrema()[1] or 0) > 255 else 255.0
        target = _resizable_mode(img)
        if target != img.mode:
            img = img.convert(target)
        img = shrink(img)
    return _to_rgb(img, top), orientation


def decode(
    data: bytes,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> tuple[np.ndarray, int, int]:
    """Decode image bytes to a (size, size, 3) uint8 RGB array; also the oriented width, height.

    EXIF orientation is applied, every mode becomes RGB, GIFs give their first frame, and JPEGs
    are decoded at a reduced DCT scale (draft mode) when the target is much smaller. The whole
    image is resized to the square (no crop), so nothing of it is lost. An image with more than
    max_pixels pixels, or whose decoding would hold more than max_bytes (decode_cost), is
    refused with ImageTooLargeError before it is decoded.
    """
    img, (width, height) = _prepare(data, size, max_pixels, max_bytes)
    try:

        def square(im: Image.Image) -> Image.Image:
            if im.size == (size, size):
                return im
            return im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)

        small, orientation = _shrunk(img, square)
        pixels = np.asarray(small, dtype=np.uint8)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
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


def thumbnail(
    data: bytes,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> bytes:
    """A JPEG of the image fitted into size x size, aspect ratio kept, EXIF orientation applied."""
    img, _ = _prepare(data, size, max_pixels, max_bytes)

    def fit(im: Image.Image) -> Image.Image:
        im.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
        return im

    try:
        img = _shrunk(img, fit)[0]
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
    source: Path | str | bytes,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> np.ndarray:
    """The single preprocessing function: a file path or bytes -> (size, size, 3) uint8 RGB."""
    data = source if isinstance(source, bytes) else read_file(source)
    return decode(data, size, max_pixels=max_pixels, max_bytes=max_bytes)[0]


def read_file(path: Path | str) -> bytes:
    """A file's (or an object's, for an s3:// or gs:// URL) bytes, with a clear error when it
    cannot be read."""
    return read_bytes(path)


def decode_file(
    path: Path,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> DecodedImage:
    """Read, hash and decode one file."""
    data = read_file(path)
    pixels, width, height = decode(data, size, max_pixels=max_pixels, max_bytes=max_bytes)
    return DecodedImage(path, pixels, width, height, len(data), hashlib.sha256(data).hexdigest())


def _decode_or_fail(
    path: Path, size: int, max_pixels: int, max_bytes: int = DEFAULT_MAX_DECODE_BYTES
) -> DecodedImage | FailedImage:
    try:
        return decode_file(path, size, max_pixels=max_pixels, max_bytes=max_bytes)
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
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    known: Mapping[Path, DecodedImage] | None = None,
) -> Iterator[tuple[list[DecodedImage], list[FailedImage]]]:
    """Decode files in batches on a thread pool, one batch ahead of the consumer.

    Only two batches are ever in memory, so memory stays flat however many paths there are.
    Paths in ``known`` are not read again: their decoded image is passed on, in order.
    """
    known = known or {}

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
            submitted = [
                _done(known[p])
                if p in known
                else pool.submit(_decode_or_fail, p, size, max_pixels, max_bytes)
                for p in chunk
            ]
            if pending is not None:
                yield _split([f.result() for f in pending])
            pending = submitted
        if pending is not None:
            yield _split([f.result() for f in pending])


def _done(result: DecodedImage) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


def _split(
    results: Sequence[DecodedImage | FailedImage],
) -> tuple[list[DecodedImage], list[FailedImage]]:
    ok = [r for r in results if isinstance(r, DecodedImage)]
    bad = [r for r in results if isinstance(r, FailedImage)]
    return ok, bad


def stack(images: Sequence[DecodedImage]) -> np.ndarray:
    """(n, size, size, 3) uint8 batch of decoded images."""
    return np.stack([im.pixels for im in images]) if images else np.zeros((0, 0, 0, 3), np.uint8)
