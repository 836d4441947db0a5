"""Dedupe groups written for people: a CSV of members and a self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
from pathlib import Path

from PIL import Image

from ..errors import ImageDecodeError
from ..photos import openable
from ..store import Store
from .grouping import Group, Member

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "group",
    "keep",
    "path",
    "score",
    "bytes",
    "width",
    "height",
    "link",
    "phash_distance",
    "matches",
    "real_pixels",
    "sharpness",
    "jpeg_quality",
    "why_kept",
)
THUMB_SIDE = 160  # pixels, long side of the thumbnails embedded in the HTML page


def write_csv(groups: list[Group], path: Path) -> None:
    """One row per member: its group number (from 1), whether it is kept, and its facts."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for number, g in enumerate(groups, 1):
            for m in g.members:
                keep = int(m.id == g.keep.id)
                q = m.quality or {}
                writer.writerow(
                    [number, keep, m.path, f"{m.score:.6f}", m.bytes, m.width, m.height, m.link]
                    + [_blank(m.phash_distance), _blank(m.matches)]
                    + [_blank(q.get("real_pixels")), _blank(q.get("detail"))]
                    + [_blank(q.get("jpeg_quality")), g.reason if keep else ""]
                )


def _blank(value) -> str:
    return "" if value is None else str(value)


def evidence(m: Member, keep: Member) -> str:
    """The link that put a member in its group, in words."""
    if m.id == keep.id:
        return "kept"
    parts = {
        "exact": "exact copy (same bytes)",
        "cosine": f"cosine {m.score:.4f} to the kept photo",
        "phash": f"pHash {m.phash_distance} bits from the kept photo (cosine {m.score:.4f})",
        "verified": f"{m.matches} local features verified (cosine {m.score:.4f})",
    }
    text = parts.get(m.link, m.link)
    if m.link != "phash" and m.phash_distance is not None:
        text += f", pHash distance {m.phash_distance}"
    return text


def thumbnail_uri(path: Path, side: int = THUMB_SIDE) -> str | None:
    """A small JPEG of the image as a data: URI, or None if it cannot be read."""
    try:
        with Image.open(openable(path)) as img:
            img.draft("RGB", (side, side))
            img = img.convert("RGB")
            img.thumbnail((side, side), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError, ImageDecodeError) as exc:
        log.info("no thumbnail for %s: %s", path, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.3rem}.group{background:#fff;border:1px solid #ddd;border-radius:8px;
padding:.8rem;margin:0 0 1rem}.group h2{font-size:1rem;margin:0 0 .6rem}
.row{display:flex;flex-wrap:wrap;gap:.8rem}.card{width:170px;border:2px solid #ddd;
border-radius:6px;padding:4px;font-size:12px;min-width:0}
.path{overflow-wrap:anywhere;word-break:break-word}.why{color:#555}
.card.keep{border-color:#2a7}.card img{display:block;max-width:160px;max-height:160px;
margin:0 auto 4px}.badge{background:#2a7;color:#fff;border-radius:3px;padding:0 4px}
.missing{height:100px;display:flex;align-items:center;justify-content:center;background:#eee}
"""


def render_html(store: Store, groups: list[Group], threshold: float) -> str:
    """One page: each group a row of thumbnails with size, resolution and score; kept marked."""
    total = sum(len(g.others) for g in groups)
    saved = sum(m.bytes for g in groups for m in g.others)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>lookalike dedupe</title><style>",
        _STYLE,
        "</style></head><body>",
        f"<h1>{len(groups)} groups of near-duplicates</h1>",
        f"<p>threshold {threshold:.4f} (cosine) &middot; {total} photos besides the kept ones "
        f"&middot; {_size(saved)}</p>",
    ]
    for number, g in enumerate(groups, 1):
        title = (
            f"Group {number} &middot; {len(g.members)} photos &middot; "
            f"<span class='why'>kept: {html.escape(g.reason)}</span>"
        )
        parts.append(f"<div class='group'><h2>{title}</h2>")
        parts.append("<div class='row'>")
        for m in g.members:
            kept = m.id == g.keep.id
            uri = thumbnail_uri(store.file_path(m.path))
            img = f"<img src='{uri}' alt=''>" if uri else "<div class='missing'>no preview</div>"
            badge = "<span class='badge'>keep</span> " if kept else ""
            parts.append(
                f"<div class='card{' keep' if kept else ''}'>{img}"
                f"<div class='path'>{badge}{html.escape(m.path)}</div>"
                f"<div>{m.width}&times;{m.height} &middot; {_size(m.bytes)}</div>"
                f"<div class='why'>{html.escape(evidence(m, g.keep))}</div></div>"
            )
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def write_html(store: Store, groups: list[Group], threshold: float, path: Path) -> None:
    """Write render_html to path."""
    Path(path).write_text(render_html(store, groups, threshold), encoding="utf-8")
