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

import hashlib
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ImageDecodeError, StoreBusyError, StoreWriteError
from ..photos import is_url, read_bytes

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
# A photo is a crop of another when its frame, mapped onto the other's, lies inside it (this
# share of its area: the transform's error and a crop flush with an edge stay inside) and
# covers less than CROP_COVER of the other's frame (a re-encode or a resize covers all of it)
CROP_INSIDE = 0.95
CROP_COVER = 0.9
NEIGHBOURS = 5  # candidates per photo: its nearest others under the threshold
FLOOR = 0.5  # candidates score at least this cosine
# The cache key of a pair's inliers: changing any setting above that shapes the count makes
# every cached count stale (MIN_MATCHES and STRICT_MATCHES only judge counts: not in it)
VERSION = f"orb1/side{WORK_SIDE}/n{FEATURES}/ratio{RATIO}/px{REPROJECTION}"
# ... and of whether the first photo of an ordered pair is a crop of the second (1) or not (0)
CROP_VERSION = f"crop1/{VERSION}/min{MIN_MATCHES}/in{CROP_INSIDE}/cover{CROP_COVER}"
WORKERS = os.cpu_count() or 1  # threads: OpenCV releases the GIL while it decodes and matches
CHUNK_PAIRS = 512  # pairs matched per step: the photos they need are described first
HELD_PHOTOS = 4096  # features held at most (~20 kB each); a photo dropped is read again
SAVE_EVERY = 20_000  # cached counts written per transaction (a killed run keeps its batches)


def _cv2():
    import cv2  # noqa: PLC0415 - optional and heavy: only when verification runs

    return cv2


def _read(path) -> tuple[np.ndarray, str | None]:
    """A file's bytes ((m,) uint8; empty if unreadable) and their sha256 (None if unreadable)."""
    try:
        if is_url(path):  # a photo in a bucket
            data = np.frombuffer(read_bytes(path), dtype=np.uint8)
        else:
            data = np.fromfile(str(path), dtype=np.uint8)
    except (OSError, ImageDecodeError):
        return np.zeros(0, np.uint8), None
    return data, hashlib.sha256(data).hexdigest()


def describe(data: np.ndarray) -> tuple[Any, Any, tuple[int, int]] | None:
    """(points (k, 2) float32, descriptors (k, 32) uint8, (height, width) of the matched image)
    of encoded image bytes at WORK_SIDE, or None if undecodable or bare: the ORB work a cache
    hit saves."""
    cv2 = _cv2()
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
    return np.float32([k.pt for k in kps]), desc, img.shape[:2]


def features(path) -> tuple[Any, Any, tuple[int, int]] | None:
    """(keypoints, descriptors, size) of one file at WORK_SIDE, or None if unreadable or bare."""
    return describe(_read(path)[0])


def _similarity(a: tuple | None, b: tuple | None) -> tuple[np.ndarray | None, int]:
    """(the 2x3 similarity transform from a's image to b's, its RANSAC inliers) of two photos'
    features; (None, 0) where they do not fit one."""
    if a is None or b is None:
        return None, 0
    cv2 = _cv2()
    (pa, da, _), (pb, db, _) = a, b
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(da, db, k=2)
    good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
    if len(good) < 6:
        return None, 0
    src = pa[[m.queryIdx for m in good]]
    dst = pb[[m.trainIdx for m in good]]
    transform, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=REPROJECTION
    )
    return (transform, int(mask.sum())) if mask is not None else (None, 0)


def matches(a: tuple | None, b: tuple | None) -> int:
    """RANSAC inliers of a similarity transform between two photos' features (0: none)."""
    return _similarity(a, b)[1]


def cropped_from(a: tuple | None, b: tuple | None) -> bool:
    """Whether photo a is a crop of photo b: their features fit one similarity transform
    (MIN_MATCHES inliers), a's frame mapped into b's lies inside it (CROP_INSIDE of its area)
    and covers less than CROP_COVER of b's. Then b shows all a shows, and more."""
    transform, inliers = _similarity(a, b)
    if transform is None or inliers < MIN_MATCHES:
        return False
    cv2 = _cv2()
    (ha, wa), (hb, wb) = a[2], b[2]
    corners = np.float32([[0, 0], [wa, 0], [wa, ha], [0, ha]])
    mapped = (corners @ transform[:, :2].T + transform[:, 2]).astype(np.float32)
    frame = np.float32([[0, 0], [wb, 0], [wb, hb], [0, hb]])
    inside, _ = cv2.intersectConvexConvex(mapped, frame)
    area = abs(float(cv2.contourArea(mapped)))
    return area > 0 and inside >= CROP_INSIDE * area and inside < CROP_COVER * wb * hb


class Verifier:
    """Counts the inliers of pairs of stored photos: cached in the store by content (the two
    sha256), the rest matched on `workers` threads, each photo's features computed once."""

    def __init__(self, store: Store, workers: int | None = None):
        self.store = store
        self.workers = workers or WORKERS
        self.saved = 0  # cache rows written by this verifier
        self.skipped = 0  # cache rows not written: the writer lock was busy, or read-only

    def count(self, pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], int]:
        """Inliers of each pair of ids (unknown ids: 0)."""
        pairs = list(pairs)
        records = self.store.db.get_many({i for p in pairs for i in p})
        keys = {
            p: _key(records[p[0]].sha256, records[p[1]].sha256)
            for p in pairs
            if p[0] in records and p[1] in records
        }
        wanted = sorted(set(keys.values()))
        known = self.store.db.verified_inliers(wanted, VERSION)
        # each content is read from the file of its smallest id
        paths = {r.sha256: r.path for r in sorted(records.values(), key=lambda r: -r.id)}
        todo = [k for k in wanted if k not in known]
        if todo:
            known.update(self._match(todo, paths))
        log.info("verification: %d pairs, %d of them cached", len(wanted), len(wanted) - len(todo))
        return {p: known.get(keys[p], 0) if p in keys else 0 for p in pairs}

    def _match(self, todo: list[tuple[str, str]], paths: dict[str, str]) -> dict:
        """Inliers of each pair of contents, matched in chunks; each chunk's results are saved
        when the writer lock is free (a file whose bytes are not its row's sha256 is matched
        but not saved)."""
        order = _local_order(todo)
        last = {s: n for n, pair in enumerate(order) for s in pair}  # last use of each photo
        held: OrderedDict[str, tuple] = OrderedDict()  # sha -> (features, bytes match sha)
        out: dict[tuple[str, str], int] = {}
        pending: list[tuple[str, str, int]] = []
        with ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, len(order), CHUNK_PAIRS):
                chunk = order[start : start + CHUNK_PAIRS]
                used = {s for p in chunk for s in p}
                need = sorted(used - held.keys())
                files = [self.store.file_path(paths[s]) for s in need]
                held.update(zip(need, pool.map(checked_features, files, need)))
                for s in sorted(used):
                    held.move_to_end(s)
                found = pool.map(lambda p: matches(held[p[0]][0], held[p[1]][0]), chunk)
                for (a, b), n in zip(chunk, found):
                    out[(a, b)] = n
                    if held[a][1] and held[b][1]:
                        pending.append((a, b, n))
                _free(held, used, last, start + len(chunk))
                if len(pending) >= SAVE_EVERY:
                    pending = self._save(pending)
        left = self._save(pending)  # a busy lock now: these counts are computed again next run
        self.skipped += len(left)
        return out

    def _save(self, rows: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
        """Write rows to the store's cache if the writer lock is free now (never waits);
        returns the rows left unsaved (to try again with the next batch)."""
        if not rows:
            return rows
        db = self.store.db
        if db.readonly or db.conn.in_transaction:
            self.skipped += len(rows)
            return []  # not now, nor later in this run
        if not save_cached(self.store, rows, VERSION, prune=not self.saved):
            return rows
        self.saved += len(rows)
        log.info("verification cache: %d pair counts saved", len(rows))
        return []


def save_cached(store: Store, rows: list[tuple[str, str, int]], version: str, prune=False) -> bool:
    """Write rows of one version to the store's pair cache if the writer lock is free now
    (never waits; a read-only store or a busy lock: False, and the work is done again next
    time). Pruning keeps the inlier counts and the crop verdicts of these settings."""
    if not rows:
        return True  # nothing to write: no writer lock, no transaction
    if store.db.readonly or store.db.conn.in_transaction:
        return False
    try:
        with store.writing(timeout=0):
            store.db.put_verified(rows, version, prune, current=(VERSION, CROP_VERSION))
    except (StoreBusyError, StoreWriteError) as exc:
        log.info("pair cache not saved this time: %s", exc)
        return False
    return True


def _free(held: OrderedDict, used: set[str], last: dict[str, int], done: int) -> None:
    """Drop the features no pair after the first `done` needs, then the least recently used
    beyond HELD_PHOTOS (read again if a later pair needs them)."""
    for s in used:
        if last[s] < done:
            del held[s]
    while len(held) > HELD_PHOTOS:
        held.popitem(last=False)


def _key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def checked_features(path, sha256: str) -> tuple[tuple | None, bool]:
    """(features of a file, whether its bytes still are the table's sha256)."""
    data, digest = _read(path)
    return describe(data), digest == sha256


def _local_order(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs in breadth-first order of the photos they join, so that a photo's pairs come
    close together and its features can be freed soon (a bounded live set on a graph of
    near neighbours); deterministic."""
    adjacent: dict[str, list[str]] = {}
    for a, b in pairs:
        adjacent.setdefault(a, []).append(b)
        adjacent.setdefault(b, []).append(a)
    position: dict[str, int] = {}
    for root in sorted(adjacent):
        if root in position:
            continue
        position[root] = len(position)
        queue = deque([root])
        while queue:
            for other in sorted(adjacent[queue.popleft()]):
                if other not in position:
                    position[other] = len(position)
                    queue.append(other)

    def key(pair: tuple[str, str]) -> tuple[int, int]:
        a, b = position[pair[0]], position[pair[1]]
        return max(a, b), min(a, b)

    return sorted(pairs, key=key)


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
