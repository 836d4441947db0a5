"""Which member of a group is kept: the original, not the copy with the most pixels.

The default rule, ``original``, ranks each photo by (docs/dedupe.md, "The keep rule"):

1. a file of the collection before an upload (``@uploads/...``): an upload is a copy someone
   dropped on the web page, never kept over a collection file unless asked (``keep="largest"``);
2. its real detail, in quarter-octave steps: its real pixels (pixels, divided by 4 for each
   octave it was blown up by: ``upscale_octaves``) times its sharpness (the energy of its
   finest octave over its variance, so a brighter copy is no sharper). An upscaled copy has 4x
   the pixels and a fifth to a tenth of the sharpness; a re-encoded, blurred, cropped or
   reduced copy has lost detail too (measured on intel_neardup: docs/dedupe.md);
3. the earlier EXIF capture date (a dated file before an undated one);
4. the larger file (at equal detail, the less compressed one), then the higher JPEG quality,
   then the shorter and then smaller path.

The other rules (largest, smallest, oldest, newest, shortest-path) are the plain orders of the
store's facts, as before. Reading the pixels is limited to the photos of candidate pairs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError, InvalidArgumentError
from ..photos import openable
from ..store import UPLOAD_PREFIX

log = logging.getLogger(__name__)

KEEP_POLICIES = ("original", "largest", "smallest", "oldest", "newest", "shortest-path")
DEFAULT_KEEP = "original"
WORK_SIDE = 1024  # pixels: detail is measured on at most this long a side (JPEG draft mode)
# The finest octave of a photo holds at least this share of the energy of the octave below it
# (per pixel); a 2x upscale leaves it a few per cent (docs/dedupe.md: measured on intel_neardup
# originals and 2x / 1.5x upscales of them).
UPSCALE_RATIO = 0.12
MAX_OCTAVES = 3
EXIF_DATETIME_ORIGINAL = 0x9003
EXIF_IFD = 0x8769


@dataclass(frozen=True)
class Quality:
    """What the keep rule knows of one file's pixels (None where it could not be read)."""

    real_pixels: float  # pixels / 4**upscale_octaves
    detail: float  # sharpness: finest-octave energy over variance (x1000) at the real size
    jpeg_quality: int  # 101 for a lossless file, else an estimate in 1..100
    taken: str | None  # EXIF DateTimeOriginal, 'YYYY:MM:DD HH:MM:SS'
    upscaled: int  # octaves the file was blown up by

    def to_dict(self) -> dict[str, Any]:
        return {
            "real_pixels": int(self.real_pixels),
            "detail": round(self.detail, 3),
            "jpeg_quality": self.jpeg_quality,
            "upscaled_octaves": self.upscaled,
            "taken": self.taken,
        }


def _octave_energies(g: np.ndarray) -> tuple[float, float]:
    """Mean squared energy per pixel of the finest octave of g and of the one below it."""
    h, w = (g.shape[0] // 4) * 4, (g.shape[1] // 4) * 4
    g = g[:h, :w]
    half = g.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    quarter = half.reshape(h // 4, 2, w // 4, 2).mean(axis=(1, 3))
    fine = g - np.repeat(np.repeat(half, 2, 0), 2, 1)
    coarse = half - np.repeat(np.repeat(quarter, 2, 0), 2, 1)
    return float((fine**2).mean()), float((coarse**2).mean())


def upscale_octaves(g: np.ndarray) -> tuple[int, float]:
    """(octaves the grey image g was blown up by, its sharpness at its real size: the energy of
    its finest octave over its variance, so a brighter or more contrasted copy is no sharper)."""
    octaves = 0
    while min(g.shape) >= 16:
        fine, coarse = _octave_energies(g)
        if octaves >= MAX_OCTAVES or coarse <= 0 or fine >= UPSCALE_RATIO * coarse:
            return octaves, 1000.0 * fine / max(float(g.var()), 1e-9)
        h, w = (g.shape[0] // 2) * 2, (g.shape[1] // 2) * 2
        g = g[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        octaves += 1
    return octaves, 0.0


def _jpeg_quality(img: Image.Image) -> int:
    """101 for a lossless format; else an estimate of the JPEG quality from its luma table."""
    if img.format not in ("JPEG", "MPO", "WEBP"):
        return 101
    tables = getattr(img, "quantization", None) or {}
    if not tables:
        return 50
    mean = float(np.mean(list(tables.get(0, next(iter(tables.values()))))))
    # the IJG tables: quality q scales the base table (mean ~57.6) by 50/q below 50, 2 - q/50 above
    scale = mean / 57.6
    q = 50.0 / scale if scale >= 1 else 50.0 * (2.0 - scale)
    return int(min(100, max(1, round(q))))


def _taken(img: Image.Image) -> str | None:
    try:
        value = img.getexif().get_ifd(EXIF_IFD).get(EXIF_DATETIME_ORIGINAL)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no date, not an error
        return None
    return str(value).strip() or None if value else None


def measure(path: Path) -> Quality | None:
    """The keep rule's facts of one file, or None if it cannot be read."""
    try:
        with Image.open(openable(path)) as img:
            quality, taken = _jpeg_quality(img), _taken(img)
            scale = 1.0
            if img.format in ("JPEG", "MPO") and max(img.size) > WORK_SIDE:
                full = img.size
                img.draft("L", (WORK_SIDE, WORK_SIDE))
                scale = (full[0] * full[1]) / (img.size[0] * img.size[1])
            g = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError, ImageDecodeError) as exc:
        log.info("keep rule cannot read %s: %s", path, exc)
        return None
    octaves, detail = upscale_octaves(g)
    real = g.size * scale / 4**octaves
    return Quality(real, detail, quality, taken, octaves)


def _steps(x: float) -> int:
    """x in quarter-octave steps (factor 1.19): small differences are ties, not evidence."""
    return int(math.floor(4 * math.log2(x))) if x > 0 else -(10**6)


def original_key(path: str, qual: Quality | None, nbytes: int) -> tuple:
    """Sort key of the ``original`` rule: the smallest key is kept (module docstring)."""
    upload = path.startswith(UPLOAD_PREFIX)
    if qual is None:  # unreadable: after every readable member
        return (upload, 1, 0, "~", -nbytes, 0, len(path), path)
    return (
        upload,
        0,
        -_steps(qual.real_pixels * qual.detail),
        qual.taken or "~",  # no date: after every dated member
        -nbytes,
        -qual.jpeg_quality,
        len(path),
        path,
    )


def plain_key(policy: str) -> Callable[[Any], tuple]:
    """Sort key on a member's stored facts for the plain policies (smallest key is kept)."""
    if policy == "largest":
        return lambda m: (-(m.width * m.height), -m.bytes, m.path)
    if policy == "smallest":
        return lambda m: (m.width * m.height, m.bytes, m.path)
    if policy == "oldest":
        return lambda m: (m.mtime, m.path)
    if policy == "newest":
        return lambda m: (-m.mtime, m.path)
    if policy == "shortest-path":
        return lambda m: (len(m.path), m.path)
    raise InvalidArgumentError(f"keep must be one of {', '.join(KEEP_POLICIES)}; got {policy!r}")


def check_policy(policy: str) -> str:
    if policy not in KEEP_POLICIES:
        raise InvalidArgumentError(
            f"keep must be one of {', '.join(KEEP_POLICIES)}; got {policy!r}"
        )
    return policy


def reason(policy: str, kept: Any, qual: dict[int, Quality | None]) -> str:
    """Why the kept member was kept, in words for the report."""
    if policy != "original":
        return f"keep rule '{policy}'"
    q = qual.get(kept.id)
    if kept.path.startswith(UPLOAD_PREFIX):
        why = "every member is an upload; "
    else:
        why = "a collection file (uploads come last); "
    if q is None:
        return why + "no member could be read: the largest file"
    return why + (
        f"most real detail: {int(q.real_pixels):,} real pixels"
        + (f" (the file is blown up {2**q.upscaled}x)" if q.upscaled else "")
        + f" x sharpness {q.detail:.1f}, "
        + ("lossless" if q.jpeg_quality > 100 else f"JPEG quality ~{q.jpeg_quality}")
        + (f", taken {q.taken}" if q.taken else "")
    )
