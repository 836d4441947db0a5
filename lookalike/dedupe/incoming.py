"""Files of another folder that already have a near-duplicate in a collection (the import case).

Nothing is added to the store: each file is embedded with the store's model and searched, and
its pHash is compared with the stored ones (the same evidence as ``lookalike dedupe``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import StoreNotFoundError
from ..images import FailedImage, find_images, iter_batches, phash64
from .pairs import PHASH_MAX, check_phash_max, check_threshold, popcount

if TYPE_CHECKING:
    from ..engine import Engine
    from ..store import Store

MATCHES = 5  # near-duplicates listed per file at most


@dataclass(frozen=True)
class Known:
    """A file of the folder, and the stored photos at or above the threshold (best first)."""

    path: str  # relative to the folder
    matches: list[tuple[str, float]]  # (stored path relative to PHOTOS, cosine), best first
    crops: frozenset[str] = frozenset()  # matches that are crops of this file: it holds more

    @property
    def only_crops(self) -> bool:
        """Every match is a crop of this file: the collection lacks part of it."""
        return {p for p, _ in self.matches} <= self.crops

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "matches": [
                {"path": p, "score": round(s, 6)}
                | ({"crop_of_file": True} if p in self.crops else {})
                for p, s in self.matches
            ],
            "only_crops": self.only_crops,
        }


@dataclass
class IncomingReport:
    """Which files of a folder the collection already has."""

    folder: Path
    threshold: float
    checked: int = 0
    known: list[Known] = field(default_factory=list)
    failed: list[FailedImage] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": round(self.threshold, 6),
            "folder": str(self.folder),
            "checked": self.checked,
            "files": [k.to_dict() for k in self.known],
            "failed": [{"path": str(f.path), "error": f.error} for f in self.failed],
        }


def find_known(
    engine: Engine,
    folder: Path | str,
    threshold: float,
    k: int = MATCHES,
    batch_size: int = 64,
    phash_max: int | None = PHASH_MAX,
) -> IncomingReport:
    """Embed every image under folder and list those with a stored near-duplicate.

    A stored photo matches at cosine >= threshold, or with a pHash at most phash_max bits
    away (None: cosine only), or with the same sha256 (score 1); a file that is itself one of
    the stored photos is not matched with itself. Scores are cosines.
    """
    t = check_threshold(threshold)
    phash_max = check_phash_max(phash_max)
    folder = Path(folder).expanduser().resolve()
    report = IncomingReport(folder, t)
    base = folder if folder.is_dir() else folder.parent
    store = engine.store
    with store.lock:
        hash_ids, hashes = store.db.phashes() if phash_max is not None else ([], [])
    for ok, bad in iter_batches(
        find_images(folder), engine.image_size, batch_size, max_pixels=engine.max_pixels
    ):
        report.failed.extend(bad)
        report.checked += len(ok) + len(bad)
        if not ok:
            continue
        vectors = engine.embed(np.stack([im.pixels for im in ok]))
        hits = engine.search_vectors(vectors, k + 1)
        for im, row, vec in zip(ok, hits, vectors):
            own = im.path.resolve()
            found: dict[str, float] = {}
            for rec in store.db.by_sha256(im.sha256):
                found[rec.path] = 1.0
            for h in row:
                if h.score >= t:
                    found.setdefault(h.path, h.score)
            for path, score in _close_hashes(store, im.pixels, vec, hash_ids, hashes, phash_max):
                found.setdefault(path, score)
            matches = [(p, s) for p, s in found.items() if _where(store, p) != own]
            matches.sort(key=lambda m: (-m[1], m[0]))
            if matches:
                rel = im.path.relative_to(base).as_posix()
                crops = _crops_of(store, im.path, [p for p, _ in matches[:k]])
                report.known.append(Known(rel, matches[:k], crops))
    report.known.sort(key=lambda x: x.path)
    return report


def _crops_of(store: Store, path: Path, stored: list[str]) -> frozenset[str]:
    """The stored photos that are crops of the file at path (verification.cropped_from): the
    file holds more than they do, so the collection does not have all of it."""
    from .verification import cropped_from, features

    own = features(path)
    if own is None:
        return frozenset()
    return frozenset(p for p in stored if cropped_from(features(store.file_path(p)), own))


def _close_hashes(
    store: Store, pixels, vector, hash_ids, hashes, phash_max: int | None
) -> list[tuple[str, float]]:
    """(path, cosine) of the stored photos whose pHash is within phash_max bits of pixels'."""
    if phash_max is None or not len(hash_ids):
        return []
    own = np.array([phash64(pixels)], dtype=np.int64).view(np.uint64)
    close = hash_ids[popcount(hashes ^ own) <= phash_max]  # (n,) linear scan: one per file
    if not len(close):
        return []
    with store.lock:
        records = store.db.get_many(close.tolist())
        close = np.array([i for i in close.tolist() if i in records], dtype=np.int64)
        scores = store.index.reconstruct(close) @ vector if len(close) else []
    return [(records[i].path, float(s)) for i, s in zip(close.tolist(), scores)]


def _where(store: Store, rel_path: str) -> Path | None:
    try:
        return store.file_path(rel_path).resolve()
    except StoreNotFoundError:  # a store without a photos root: no stored file is this one
        return None
