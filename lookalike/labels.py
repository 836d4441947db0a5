"""Labels of stored images and label suggestion by a similarity-weighted vote of neighbours.

Labels come from the first folder level under PHOTOS (``--labels folders``) or from a CSV
``path,labels`` whose labels cell holds one or more labels separated by ``|``. They live in the
store's table and can change without re-embedding anything.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import InvalidArgumentError

FOLDERS = "folders"


class LabelsFileError(InvalidArgumentError):
    """A labels CSV that cannot be read; the message names the file and line."""


def split_labels(cell: str) -> tuple[str, ...]:
    """'beach| sunset' -> ('beach', 'sunset'): stripped, empty parts dropped, order kept."""
    seen: dict[str, None] = {}
    for part in cell.split("|"):
        part = part.strip()
        if part:
            seen.setdefault(part, None)
    return tuple(seen)


def folder_label(rel_path: str) -> tuple[str, ...]:
    """The label of PHOTOS/<label>/...: its first folder; none for files at the top level."""
    parts = rel_path.split("/")
    return (parts[0],) if len(parts) > 1 and not rel_path.startswith("@") else ()


def read_labels_csv(path: Path) -> dict[str, tuple[str, ...]]:
    """A CSV of `path,labels` rows (a header row `path,labels` is optional) -> {path: labels}.

    Paths are relative to PHOTOS with '/' separators. A malformed row raises LabelsFileError
    naming its line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LabelsFileError(f"cannot read labels file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise LabelsFileError(f"labels file {path} is not UTF-8 text") from None
    out: dict[str, tuple[str, ...]] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    for row in reader:
        line_no = reader.line_num  # a physical line: a quoted cell may span several
        if not row or all(not c.strip() for c in row):
            continue
        if line_no == 1 and [c.strip().lower() for c in row[:2]] == ["path", "labels"]:
            continue
        if len(row) != 2 or not row[0].strip():
            raise LabelsFileError(
                f"{path}, line {line_no}: expected 2 columns `path,labels`, got {len(row)}: "
                f"{','.join(row)[:80]!r}"
            )
        rel = row[0].strip().replace("\\", "/")
        out[rel[2:] if rel.startswith("./") else rel] = split_labels(row[1])
    return out


def vote(
    neighbours: Iterable[tuple[Sequence[str], float]], top: int = 3
) -> list[tuple[str, float]]:
    """Similarity-weighted vote of neighbours' labels -> [(label, confidence)], best first.

    Each neighbour weighs max(cosine, 0); a label's confidence is the weight of the neighbours
    carrying it over the weight of all neighbours (labelled or not), so it lies in [0, 1] and a
    label every neighbour carries scores 1. Multi-label neighbours vote for each of their labels.
    Ties break by label name.
    """
    totals: dict[str, float] = defaultdict(float)
    weight = 0.0
    for labels, score in neighbours:
        w = float(score)
        if not w > 0:  # a dissimilar (or NaN) neighbour has no say, not even a 0 vote
            continue
        weight += w
        for label in labels:
            totals[label] += w
    if weight <= 0:
        return []
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(label, min(1.0, s / weight)) for label, s in ranked[:top]]


def apply_labels(db, source: str, photos: Path | None = None, keep_existing: bool = False) -> int:
    """Set the table's labels from a source: 'folders' or a CSV path; returns rows changed.

    With 'folders' every image gets its first folder as label (with keep_existing, only the
    images that have no label yet: so `lookalike labels set` edits survive later index runs);
    with a CSV, the listed paths get its labels and other rows keep theirs.
    """
    if source == FOLDERS:
        pairs = [
            (rec.path, folder_label(rec.path))
            for rec in db.records()
            if not (keep_existing and rec.labels)
        ]
    else:
        pairs = list(read_labels_csv(Path(source)).items())
    return db.set_labels(pairs)
