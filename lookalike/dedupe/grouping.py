"""Near-duplicate groups of a store: pairs above a cosine threshold, joined into components.

Pairs come from FAISS range searches over the store's own vectors, a chunk of queries at a
time, and are merged at once by union-find: memory holds the ids, one chunk's results and the
parent array, never an n x n matrix. Exact copies (same sha256) are always joined, and so are
photos whose 64-bit pHashes (stored at indexing) differ in at most PHASH_MAX bits, found by a
multi-index search over 16-bit bands (``hash_pairs``), never by comparing every pair. No
TensorFlow here: grouping reads the vectors and hashes the store already has.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from ..index.knn import KnnIndex
    from ..store import Store

# Used when a store has no calibrated threshold for its current model (lookalike.calibrate sets
# one at every training; `lookalike dedupe` measures one when it is missing). It is the lowest
# threshold with pair precision >= 0.95 on intel_neardup for the default model, measured with
# the labels by scripts/bench_dedupe.py (docs/dedupe.md): a cautious value for any model.
FALLBACK_THRESHOLD = 0.925
KEEP_POLICIES = ("largest", "smallest", "oldest", "newest", "shortest-path")
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


@dataclass(frozen=True)
class Member:
    """One image of a group; score is its cosine similarity to the group's kept image."""

    id: int
    path: str  # relative to PHOTOS ('@uploads/...' for uploads)
    score: float
    bytes: int
    width: int
    height: int
    mtime: float
    phash_distance: int | None = None  # pHash bits differing from the kept one; None: unknown

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "score": round(self.score, 6),
            "bytes": self.bytes,
            "width": self.width,
            "height": self.height,
        }
        if self.phash_distance is not None:
            out["phash_distance"] = self.phash_distance
        return out


@dataclass(frozen=True)
class Group:
    """Near-duplicates: the one to keep, and every member (the kept one first)."""

    keep: Member
    members: list[Member]

    @property
    def others(self) -> list[Member]:
        """The members that are not kept."""
        return [m for m in self.members if m.id != self.keep.id]


def calibrated_threshold(store: Store) -> float | None:
    """The threshold measured for the store's current model (lookalike.calibrate), or None."""
    cal = store.info.get("dedupe_calibration") or {}
    if "dedupe_threshold" in store.info and cal.get("model_serial") == store.model_serial:
        return float(store.info["dedupe_threshold"])
    return None


def default_threshold(store: Store) -> float:
    """The store's calibrated threshold for its current model, else FALLBACK_THRESHOLD."""
    t = calibrated_threshold(store)
    return FALLBACK_THRESHOLD if t is None else t


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


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size (plain lists: fast)."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def components(self) -> list[list[int]]:
        """Sets of two or more, each sorted, in order of their smallest element."""
        sets: dict[int, list[int]] = {}
        for a in range(len(self.parent)):
            root = self.find(a)
            if self.size[root] > 1:
                sets.setdefault(root, []).append(a)
        return sorted(sets.values(), key=lambda c: c[0])


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


def group_ids(
    index: KnnIndex,
    ids: np.ndarray,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    threshold: float,
    same_file: Iterable[Iterable[int]] = (),
    lock: AbstractContextManager | None = None,
    links: Iterable[tuple[np.ndarray, np.ndarray]] = (),
) -> list[list[int]]:
    """Connected components (of two or more) of the pairs at or above threshold.

    ids: every id in the index; chunks yields (ids, vectors) of every stored vector, as
    MetaDB.embeddings does; same_file gives sets of ids joined whatever their score (exact
    copies); links gives (a, b) arrays of ids joined whatever their score (close pHashes);
    lock, if given, is held around each FAISS call. Pairs are merged chunk by chunk,
    so memory holds one chunk's results, not all of them. Components are lists of ids sorted
    ascending, ordered by their smallest id.
    """
    lock = lock if lock is not None else nullcontext()
    all_ids = np.unique(np.asarray(ids, dtype=np.int64))  # (n,) sorted: id -> position
    uf = UnionFind(len(all_ids))

    def positions(x: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(all_ids, x), max(len(all_ids) - 1, 0))
        return np.where(all_ids[pos] == x, pos, -1) if len(all_ids) else pos

    for chunk_ids, vecs in chunks:
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        for start in range(0, len(chunk_ids), QUERY_CHUNK):
            stop = start + QUERY_CHUNK
            with lock:
                a, b = similar_pairs(index, chunk_ids[start:stop], vecs[start:stop], threshold)
            pa, pb = positions(a), positions(b)
            ok = (pa >= 0) & (pb >= 0)  # an id the table no longer has is ignored
            for x, y in zip(pa[ok].tolist(), pb[ok].tolist()):
                uf.union(x, y)
    for group in same_file:
        pos = [p for p in positions(np.fromiter(group, dtype=np.int64)).tolist() if p >= 0]
        for x in pos[1:]:
            uf.union(pos[0], x)
    for a, b in links:
        pa = positions(np.asarray(a, dtype=np.int64))
        pb = positions(np.asarray(b, dtype=np.int64))
        ok = (pa >= 0) & (pb >= 0)
        for x, y in zip(pa[ok].tolist(), pb[ok].tolist()):
            uf.union(x, y)
    return [[int(all_ids[i]) for i in comp] for comp in uf.components()]


def _locked(store: Store) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """store.db.embeddings, each chunk read under the store's lock."""
    chunks = store.db.embeddings(store.dim)
    while True:
        with store.lock:
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk


def _keep_key(policy: str):
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


def find_groups(
    store: Store,
    threshold: float | None = None,
    keep: str = "largest",
    phash_max: int | None = PHASH_MAX,
) -> list[Group]:
    """Groups of near-duplicate images in the store, in a deterministic order.

    Pairs with cosine >= threshold (default: default_threshold(store)), pairs whose pHashes
    differ in at most phash_max bits (None or negative: cosine only; rows without a pHash take
    no part) and exact copies are joined into connected components. keep picks the member to
    keep: largest (pixels, then bytes), smallest, oldest or newest (mtime), shortest-path; ties
    go to the smaller path. Groups are sorted by their smallest path; members list the kept one
    first, then by path.
    """
    key = _keep_key(keep)
    t = default_threshold(store) if threshold is None else check_threshold(threshold)
    phash_max = check_phash_max(phash_max)
    # the store's lock is taken a chunk at a time, so searches go on while a large store is
    # grouped; rows removed meanwhile are left out, rows added meanwhile wait for the next run
    with store.lock:
        store.refresh()  # another process may have changed the store since it was loaded
        index = store.index
        conn = store.db.conn
        ids = np.fromiter((r[0] for r in conn.execute("SELECT id FROM images")), np.int64)
        copies = [
            [int(i) for i in row[0].split(",")]
            for row in conn.execute(
                "SELECT group_concat(id) FROM images GROUP BY sha256 HAVING COUNT(*) > 1"
            )
        ]
        hash_ids, hashes = store.db.phashes() if phash_max is not None else ([], [])
    links = []
    if phash_max is not None and len(hash_ids) > 1:
        a, b = hash_links(hashes, phash_max)
        links = [(hash_ids[a], hash_ids[b])]
    components = group_ids(index, ids, _locked(store), t, copies, lock=store.lock, links=links)
    with store.lock:
        records = store.db.get_many([i for comp in components for i in comp])
        components = [[i for i in comp if i in records] for comp in components]
        components = [c for c in components if len(c) > 1]
        grouped = np.array([i for comp in components for i in comp], dtype=np.int64)
        vectors = dict(zip(grouped.tolist(), index.reconstruct(grouped)))
    groups = []
    for comp in components:
        plain = [
            Member(
                i,
                records[i].path,
                0.0,
                records[i].size,
                records[i].width,
                records[i].height,
                records[i].mtime,
            )
            for i in comp
        ]
        kept = min(plain, key=key)
        ref = vectors[kept.id]
        members = [
            Member(
                m.id,
                m.path,
                1.0 if m.id == kept.id else float(vectors[m.id] @ ref),
                m.bytes,
                m.width,
                m.height,
                m.mtime,
                _hash_distance(records[m.id].phash, records[kept.id].phash),
            )
            for m in plain
        ]
        members.sort(key=lambda m: (m.id != kept.id, m.path))
        groups.append(Group(members[0], members))
    groups.sort(key=lambda g: min(m.path for m in g.members))
    return groups


def _hash_distance(a: int | None, b: int | None) -> int | None:
    """Bits in which two stored pHashes (signed int64) differ; None if either is unknown."""
    return None if a is None or b is None else ((a ^ b) & 0xFFFF_FFFF_FFFF_FFFF).bit_count()


def groups_to_dict(
    groups: list[Group], threshold: float, phash_max: int | None = None
) -> dict[str, Any]:
    """The JSON of `lookalike dedupe --json` and GET /duplicates: threshold and groups (and
    phash_max, the pHash distance that also joined photos, when given)."""
    out: dict[str, Any] = {"threshold": round(float(threshold), 6)}
    if phash_max is not None:
        out["phash_max"] = phash_max
    out["groups"] = [
        {"keep": g.keep.path, "members": [m.to_dict() for m in g.members]} for g in groups
    ]
    return out


def duplicates(
    store: Store,
    threshold: float | None = None,
    keep: str = "largest",
    phash_max: int | None = PHASH_MAX,
) -> dict:
    """find_groups as the JSON-ready dict of GET /duplicates (threshold None: the default)."""
    t = default_threshold(store) if threshold is None else check_threshold(threshold)
    phash_max = check_phash_max(phash_max)
    return groups_to_dict(find_groups(store, t, keep, phash_max), t, phash_max)
