"""Baselines scored beside lookalike on the same images: raw-pixel thumbnails and pHash.

Both search exhaustively in numpy. Rankers return, for a chunk of query indices, the indices of
their m nearest other images and a score where higher means closer; ties go to the image that
comes first in the collection's order (its path order).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..images import load_image, read_file

RAW_PIXELS_SIZE = 16  # thumbnail side in pixels: 16 x 16 x 3 = 768 values
RAW_PIXELS_DEDUPE_THRESHOLD = 0.90  # cosine of mean-centred thumbnails; set a priori, not tuned
PHASH_DEDUPE_DISTANCE = 10  # Hamming distance of 64-bit pHashes (imagededup's default)
CHUNK = 512  # query rows per similarity block: CHUNK x n float32 at a time


def raw_pixel_vectors(files: Sequence[Path], size: int = RAW_PIXELS_SIZE) -> np.ndarray:
    """(n, 3 size^2) float32 unit rows: each thumbnail minus its own mean, L2-normalised.

    Subtracting each image's mean makes the cosine a Pearson correlation of pixel values, so a
    uniform brightness change does not move it.
    """
    out = np.zeros((len(files), 3 * size * size), np.float32)
    for i, path in enumerate(files):
        x = load_image(path, size).astype(np.float32).ravel()
        x -= x.mean()
        norm = float(np.linalg.norm(x))
        if norm > 0:
            out[i] = x / norm
    return out


def phash_codes(files: Sequence[Path]) -> np.ndarray:
    """(n,) uint64: imagehash's 64-bit perceptual hash of each file, first bit highest."""
    import io

    import imagehash
    from PIL import Image

    codes = np.zeros(len(files), np.uint64)
    for i, path in enumerate(files):
        with Image.open(io.BytesIO(read_file(path))) as img:
            bits = imagehash.phash(img).hash.ravel()
        codes[i] = np.packbits(bits).view(">u8")[0]
    return codes


def _top(key: np.ndarray, m: int) -> np.ndarray:
    """Column indices of the m smallest keys of each row, in increasing order of key."""
    n = key.shape[1]
    if m < n:
        part = np.argpartition(key, m - 1, axis=1)[:, :m]
    else:
        part = np.broadcast_to(np.arange(n), key.shape).copy()
    part.sort(axis=1)  # column order first, so a stable sort leaves ties in path order
    order = np.argsort(np.take_along_axis(key, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


class DenseRanker:
    """Exact cosine search over unit vectors (rows in collection order)."""

    def __init__(self, name: str, vectors: np.ndarray):
        self.name = name
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.vectors)

    def _similarity(self, queries: np.ndarray) -> np.ndarray:
        return self.vectors[queries] @ self.vectors.T  # (q, n)

    def neighbours(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, m') indices and cosine scores of each query's m nearest others, m' <= n - 1."""
        queries = np.asarray(queries, dtype=np.int64)
        m = min(m, len(self) - 1)
        sim = self._similarity(queries)
        sim[np.arange(len(queries)), queries] = -np.inf
        idx = _top(-sim, m)
        return idx, np.take_along_axis(sim, idx, axis=1)

    def pairs_at_least(self, min_score: float) -> Iterator[tuple[int, int]]:
        """Every pair i < j whose cosine is >= min_score."""
        n = len(self)
        for start in range(0, n, CHUNK):
            rows = np.arange(start, min(n, start + CHUNK))
            sim = self._similarity(rows)
            upper = np.arange(n)[None, :] > rows[:, None]
            r, c = np.nonzero((sim >= min_score) & upper)
            yield from zip((rows[r]).tolist(), c.tolist())


class HammingRanker:
    """Exact Hamming search over 64-bit codes; the score is minus the distance."""

    def __init__(self, name: str, codes: np.ndarray):
        self.name = name
        self.codes = np.asarray(codes, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.codes)

    def _distance(self, queries: np.ndarray) -> np.ndarray:
        return np.bitwise_count(self.codes[queries, None] ^ self.codes[None, :]).astype(np.int64)

    def neighbours(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, m') indices and minus Hamming distances of each query's m nearest others."""
        queries = np.asarray(queries, dtype=np.int64)
        n = len(self)
        m = min(m, n - 1)
        dist = self._distance(queries)
        dist[np.arange(len(queries)), queries] = 65  # beyond any real distance: self is last
        idx = _top(dist, m)
        return idx, -np.take_along_axis(dist, idx, axis=1).astype(np.float64)

    def pairs_at_least(self, min_score: float) -> Iterator[tuple[int, int]]:
        """Every pair i < j with -distance >= min_score (distance <= -min_score)."""
        n = len(self)
        for start in range(0, n, CHUNK):
            rows = np.arange(start, min(n, start + CHUNK))
            dist = self._distance(rows)
            upper = np.arange(n)[None, :] > rows[:, None]
            r, c = np.nonzero((-dist >= min_score) & upper)
            yield from zip((rows[r]).tolist(), c.tolist())
