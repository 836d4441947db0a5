"""Local-feature verification of candidate pairs: finds crops and strong edits the embedding
scores under the threshold.

Each photo is reduced (or enlarged) to WORK_SIDE pixels on its long side, greyscale; ORB finds
up to FEATURES keypoints; two photos' descriptors are matched (Lowe's ratio test) and a
similarity transform (rotation, scale, shift) is fitted by RANSAC. The inliers are the evidence:
a crop, a re-encode or a resize of the same photo keeps hundreds, two different photos a few
(docs/dedupe.md: on intel_neardup, every 60-80 % crop had >= 60 and no pair of different
photos more than 28). A pair is verified with at least MIN_MATCHES inliers.

Candidates are each photo's NEIGHBOURS nearest others with cosine in [floor, threshold): the
embedding proposes, the geometry decides. OpenCV (opencv-python-headless) is imported here
only, when verification runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger(__name__)

WORK_SIDE = 320  # pixels, long side the photos are matched at
FEATURES = 500  # ORB keypoints per photo at most
RATIO = 0.8  # Lowe's ratio test on the two nearest descriptors
REPROJECTION = 5.0  # RANSAC inlier distance, pixels at WORK_SIDE
MIN_MATCHES = 40  # inliers that verify a pair
# ... and where its cosine is under the store's impostor score (grouping.phash_floor): there,
# different photos that share shapes reach 40-50 (the demo's procedural beaches); copies of
# the same photo keep 60 and more
STRICT_MATCHES = 64
NEIGHBOURS = 5  # candidates per photo: its nearest others under the threshold
FLOOR = 0.5  # candidates score at least this cosine


def _cv2():
    import cv2  # noqa: PLC0415 - optional and heavy: only when verification runs

    return cv2


def features(path) -> tuple[Any, Any] | None:
    """(keypoints, descriptors) of one file at WORK_SIDE, or None if unreadable or bare."""
    cv2 = _cv2()
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_REDUCED_GRAYSCALE_2) if data.size else None
    if img is not None and max(img.shape) < WORK_SIDE:
        img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if img is None:
        return None
    scale = WORK_SIDE / max(img.shape)
    img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    orb = cv2.ORB_create(nfeatures=FEATURES, edgeThreshold=8, patchSize=15, fastThreshold=10)
    kps, desc = orb.detectAndCompute(img, None)
    if desc is None or len(kps) < 5:
        return None
    return np.float32([k.pt for k in kps]), desc


def matches(a: tuple | None, b: tuple | None) -> int:
    """RANSAC inliers of a similarity transform between two photos' features (0: none)."""
    if a is None or b is None:
        return 0
    cv2 = _cv2()
    (pa, da), (pb, db) = a, b
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(da, db, k=2)
    good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
    if len(good) < 6:
        return 0
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    _, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=REPROJECTION
    )
    return int(mask.sum()) if mask is not None else 0


class Verifier:
    """Matches pairs of stored photos, each photo's features computed once."""

    def __init__(self, store: Store):
        self.store = store
        self._features: dict[int, Any] = {}

    def _of(self, image_id: int, path: str):
        if image_id not in self._features:
            self._features[image_id] = features(self.store.file_path(path))
        return self._features[image_id]

    def count(self, pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], int]:
        """Inliers of each pair of ids (unknown ids: 0)."""
        pairs = list(pairs)
        records = self.store.db.get_many({i for p in pairs for i in p})
        out = {}
        for a, b in pairs:
            if a in records and b in records:
                out[(a, b)] = matches(self._of(a, records[a].path), self._of(b, records[b].path))
            else:
                out[(a, b)] = 0
        return out


def candidates(
    store: Store, threshold: float, floor: float = FLOOR, k: int = NEIGHBOURS
) -> dict[tuple[int, int], float]:
    """Pairs (a < b) of each photo and its k nearest others with floor <= cosine < threshold,
    with their cosine."""
    out: dict[tuple[int, int], float] = {}
    for ids, vecs in store.db.embeddings(store.dim):
        with store.lock:
            scores, found = store.index.search(vecs, min(k + 1, len(store.index)))
        for own, srow, frow in zip(np.asarray(ids).tolist(), scores, found):
            for s, j in zip(srow.tolist(), frow.tolist()):
                if j >= 0 and j != own and floor <= s < threshold:
                    out[(min(own, j), max(own, j))] = s
    return dict(sorted(out.items()))


def verified_pairs(
    store: Store, threshold: float, min_matches: int = MIN_MATCHES
) -> dict[tuple[int, int], int]:
    """The candidate pairs under the threshold that local features verify, with their inliers:
    find_groups' ``verify``. Under the store's impostor score a pair needs STRICT_MATCHES."""
    from .thresholds import phash_floor

    floor = phash_floor(store)
    scores = candidates(store, threshold)
    counts = Verifier(store).count(scores)
    found = {
        p: n
        for p, n in counts.items()
        if n >= (min_matches if scores[p] >= floor else max(min_matches, STRICT_MATCHES))
    }
    log.info("verification: %d of %d candidate pairs verified", len(found), len(counts))
    return found
