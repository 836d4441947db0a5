"""The evidence that two photos of a store are near-duplicates, as candidate pairs: cosine at or
above the threshold (FAISS range searches over the store's own vectors), exact copies (same
sha256), 64-bit pHashes within PHASH_MAX bits (a multi-index search over 16-bit bands,
``hash_pairs``) whose cosine is high enough, and pairs that local features verify
(``verification``). ``grouping`` assembles them into groups. No TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

import faiss
import numpy as np

from ..errors import InvalidArgumentError
from .thresholds import phash_floor

if TYPE_CHECKING:
    from ..index.knn import KnnIndex
    from ..store import Store

# A pHash link needs a cosine of at least the store's impostor score (thresholds.phash_floor)
# and at most this far under the cosine threshold: on 300 Fashion-MNIST photos (28 px, grey)
# different products of a class are 2-10 bits apart at cosine 0.82-0.87, threshold 0.97
PHASH_BELOW = 0.05
EXACT_ALL_PAIRS = 50  # a set of more identical files is joined as a star around its first
QUERY_CHUNK = 4096  # range-search queries per FAISS call: bounds the memory of one call
# faiss computes exact inner products with BLAS only for at least this many queries; its
# default here (128000) sends dedupe-sized chunks through a scalar loop ~2.5x slower
BLAS_MIN_QUERIES = 20
# pHash Hamming distance (bits of 64) at or below which two photos are near-duplicates whatever
# their cosine: the usual pHash rule; on intel_neardup it joins no unrelated pair (docs/dedupe.md)
PHASH_MAX = 10
PHASH_MAX_LIMIT = 16  # larger distances make the banded search slow and pHash unreliable
HASH_BANDS = 4  # the 64 bits are split into this many bands of BAND_BITS for the search
BAND_BITS = 16
PROBES_PER_CHUNK = 1 << 18  # band probes per numpy step: bounds the memory of one step
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)


def check_threshold(threshold: float) -> float:
    """A cosine threshold in [-1, 1], as a float."""
    t = float(threshold)
    if not -1.0 <= t <= 1.0:
        raise InvalidArgumentError(f"threshold is a cosine similarity in [-1, 1], got {t}")
    return t


def check_phash_max(phash_max: int | None) -> int | None:
    """A pHash distance in [0, PHASH_MAX_LIMIT] as an int; None or a negative value: off."""
    if phash_max is None or int(phash_max) < 0:
        return None
    if int(phash_max) != phash_max or phash_max > PHASH_MAX_LIMIT:
        raise InvalidArgumentError(
            f"phash_max is a whole number of bits in [0, {PHASH_MAX_LIMIT}] (negative: off), "
            f"got {phash_max}"
        )
    return int(phash_max)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64: (n,) int64."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).astype(np.int64)
    return _BYTE_BITS[x.view(np.uint8).reshape(-1, 8)].sum(1)


def _flip_masks(bits: int, flips: int) -> np.ndarray:
    """Every value of `bits` bits with at most `flips` bits set: (k,) uint64."""
    values = np.arange(1 << bits, dtype=np.uint64)
    return values[popcount(values) <= flips]


def hash_pairs(hashes: np.ndarray, max_distance: int = PHASH_MAX) -> tuple[np.ndarray, ...]:
    """(i, j, distance) int64 arrays, i < j, of every pair of hashes ((n,) uint64) that differ
    in at most max_distance bits, each pair once.

    Multi-index hashing: the 64 bits are HASH_BANDS bands of BAND_BITS; two hashes within
    max_distance bits agree to within f = max_distance // HASH_BANDS bits on at least one band
    (else they would differ in HASH_BANDS * (f + 1) > max_distance bits). So each hash probes,
    in each band, the band values within f bits of its own (137 for the default 10) in a bucket
    table of that band, and only the hashes found there are compared in full. A pair is kept
    from the first band where it is found. Work grows with n times the bucket sizes, not n^2.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    flips = max_distance // HASH_BANDS
    masks = _flip_masks(BAND_BITS, flips)
    low = np.uint64((1 << BAND_BITS) - 1)
    keys = [(h >> np.uint64(BAND_BITS * b)) & low for b in range(HASH_BANDS)]
    step = max(1, PROBES_PER_CHUNK // len(masks))
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for band, key in enumerate(keys):
        order = np.argsort(key, kind="stable")
        # bucket table: the hashes with band value v are order[bounds[v]:bounds[v + 1]]
        bounds = np.searchsorted(key[order], np.arange((1 << BAND_BITS) + 1, dtype=np.uint64))
        for start in range(0, n, step):
            q = np.arange(start, min(n, start + step), dtype=np.int64)
            probes = (key[q, None] ^ masks[None, :]).ravel().astype(np.int64)
            lo = bounds[probes]
            counts = bounds[probes + 1] - lo
            total = int(counts.sum())
            if not total:
                continue
            first = np.repeat(lo - (np.cumsum(counts) - counts), counts)
            j = order[first + np.arange(total)]
            i = np.repeat(np.repeat(q, len(masks)), counts)
            keep = i < j
            i, j = i[keep], j[keep]
            diff = h[i] ^ h[j]
            dist = popcount(diff)
            keep = dist <= max_distance
            for earlier in range(band):  # found in an earlier band already
                keep &= popcount((diff >> np.uint64(BAND_BITS * earlier)) & low) > flips
            out.append((i[keep], j[keep], dist[keep]))
    if not out:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return tuple(np.concatenate(parts) for parts in zip(*out))


def hash_links(hashes: np.ndarray, max_distance: int = PHASH_MAX) -> tuple[np.ndarray, ...]:
    """(i, j) int64 arrays of links whose connected components are those of the pairs of
    hashes within max_distance bits: equal hashes are linked to the first of them (a star,
    not all pairs: a thousand blank images stay a thousand links), distinct values by
    hash_pairs."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    values, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    rest = np.nonzero(first[inverse] != np.arange(len(h)))[0]
    a, b, _ = hash_pairs(values, max_distance)
    return (
        np.concatenate([first[inverse[rest]], first[a]]).astype(np.int64),
        np.concatenate([rest, first[b]]).astype(np.int64),
    )


@contextmanager
def _blas_for_batches():
    """Let faiss use BLAS for our query batches, then restore its setting."""
    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = min(before, BLAS_MIN_QUERIES)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = before


def similar_pairs(
    index: KnnIndex, ids: np.ndarray, vectors: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) int64 arrays, a < b, of the pairs with cosine >= threshold between the queries
    (vectors (m, d) with ids (m,)) and the index. A pair may come twice (once per side)."""
    # faiss keeps inner products strictly above the radius
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))
    with _blas_for_batches():
        lims, scores, found = index.range_search(vectors, radius)
    query = np.repeat(ids, np.diff(lims).astype(np.int64))
    keep = (found >= 0) & (scores >= threshold) & (found != query)
    a, b = query[keep], found[keep]
    return np.minimum(a, b), np.maximum(a, b)


def _locked(store: Store) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """store.db.embeddings, each chunk read under the store's lock."""
    chunks = store.embeddings()
    while True:
        with store.lock:
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk


def cosine_pairs(
    index: KnnIndex,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    threshold: float,
    lock: AbstractContextManager | None = None,
) -> set[tuple[int, int]]:
    """Every pair (a < b) with cosine >= threshold between the chunks' (ids, vectors) and the
    index, QUERY_CHUNK queries per FAISS call; lock, if given, is held around each call."""
    lock = lock if lock is not None else nullcontext()
    pairs: set[tuple[int, int]] = set()
    for chunk_ids, vecs in chunks:
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        for start in range(0, len(chunk_ids), QUERY_CHUNK):
            stop = start + QUERY_CHUNK
            with lock:
                a, b = similar_pairs(index, chunk_ids[start:stop], vecs[start:stop], threshold)
            pairs.update(zip(a.tolist(), b.tolist()))
    return pairs


def _exact_pairs(copies: list[list[int]]) -> set[tuple[int, int]]:
    """Pairs of files with the same bytes: every pair of a small set, a star of a big one."""
    out: set[tuple[int, int]] = set()
    for ids in copies:
        ids = sorted(ids)
        heads = ids if len(ids) <= EXACT_ALL_PAIRS else ids[:1]
        out.update((a, b) for a in heads for b in ids if a < b)
    return out


def candidate_pairs(
    store: Store,
    threshold: float,
    phash_max: int | None,
    verify: Callable | None = None,
    band: float = 0.0,
) -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], int]]:
    """(pairs (a < b) the evidence joins, each with its strongest link: exact, cosine, verified
    or phash (module docstring); the local-feature matches of the verified pairs).
    verify(store, threshold) returns {pair: matches} of the pairs it verified."""
    with store.lock:
        store.refresh()  # another process may have changed the store since it was loaded
        conn = store.db.conn
        copies = [
            [int(i) for i in row[0].split(",")]
            for row in conn.execute(
                "SELECT group_concat(id) FROM images GROUP BY sha256 HAVING COUNT(*) > 1"
            )
        ]
        hash_ids, hashes = store.db.phashes() if phash_max is not None else ([], [])
    links: dict[tuple[int, int], str] = {}
    if phash_max is not None and len(hash_ids) > 1:
        a, b = hash_links(hashes, phash_max)
        x, y = hash_ids[a], hash_ids[b]
        pairs = set(zip(np.minimum(x, y).tolist(), np.maximum(x, y).tolist()))
        floor = max(phash_floor(store), threshold - PHASH_BELOW)
        links.update(dict.fromkeys(_above(store, pairs, floor), "phash"))
    verified = verify(store, threshold + band) if verify is not None else {}
    links.update(dict.fromkeys(verified, "verified"))
    cosine = cosine_pairs(store.index, _locked(store), threshold, store.lock)
    links.update(dict.fromkeys(cosine, "cosine"))
    links.update(dict.fromkeys(_exact_pairs(copies), "exact"))
    return links, dict(verified)


def _above(store: Store, pairs: set[tuple[int, int]], floor: float) -> list[tuple[int, int]]:
    """The pairs whose cosine is at least floor."""
    if not pairs:
        return []
    pairs_list = sorted(pairs)
    a = np.array([p[0] for p in pairs_list], np.int64)
    b = np.array([p[1] for p in pairs_list], np.int64)
    with store.lock:
        cos = np.einsum("nd,nd->n", store.index.reconstruct(a), store.index.reconstruct(b))
    keep = cos >= floor
    return list(zip(a[keep].tolist(), b[keep].tolist()))
