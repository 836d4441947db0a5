"""Near-duplicate groups of a store: every member linked directly to the kept photo.

Candidate pairs come from FAISS range searches over the store's own vectors (cosine >= the
threshold), from exact copies (same sha256), from 64-bit pHashes within PHASH_MAX bits found by
a multi-index search over 16-bit bands (``hash_pairs``) whose cosine is at least PHASH_COS_FLOOR,
and from pairs that local features verify (``verification``). Groups are then built as stars,
never as connected components: photos are taken in the keep rule's order (``keep``), and each
photo not yet in a group becomes the kept photo of a new group with every photo not yet in a
group that it has a candidate pair with. So a photo joins a group only on direct evidence
against the photo that is kept: groups cannot drift through chains of links (A~B~C with A and C
different), and the kept photo is the best of its group by the keep rule. No TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from ..errors import InvalidArgumentError
from .keep import (
    DEFAULT_KEEP,
    check_policy,
    measure,
    original_key,
    plain_key,
    reason,
)
from .thresholds import (  # noqa: F401  (re-exported: the CLI, the API and tests use them)
    FALLBACK_THRESHOLD,
    PHASH_COS_FLOOR,
    calibrated_threshold,
    default_threshold,
    phash_floor,
)

if TYPE_CHECKING:
    from ..index.knn import KnnIndex
    from ..store import Store

# ... and at most this far under the cosine threshold: on 300 Fashion-MNIST photos (28 px, grey)
# different products of a class are 2-10 bits apart at cosine 0.82-0.87, threshold 0.97
PHASH_BELOW = 0.05
# A cosine link less than BAND above the threshold needs a second witness: a pHash within
# WITNESS_PHASH bits or verified local features (docs/dedupe.md: on 252 intel_scenes photos,
# all different, the two pairs above the calibrated 0.792 scored 0.800 and 0.798, pHash 24 and
# 32 bits apart, no features verified)
BAND = 0.05
WITNESS_PHASH = 16
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


@dataclass(frozen=True)
class Member:
    """One image of a group and the evidence that put it there (against the kept image)."""

    id: int
    path: str  # relative to PHOTOS ('@uploads/...' for uploads)
    score: float  # cosine similarity to the kept image
    bytes: int
    width: int
    height: int
    mtime: float
    phash_distance: int | None = None  # pHash bits differing from the kept one; None: unknown
    link: str = "kept"  # kept, or what joined it: exact, cosine, phash, verified
    matches: int | None = None  # local-feature matches verified against the kept one
    quality: dict[str, Any] | None = None  # the keep rule's facts (keep.Quality.to_dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "path": self.path,
            "score": round(self.score, 6),
            "bytes": self.bytes,
            "width": self.width,
            "height": self.height,
            "link": self.link,
        }
        if self.phash_distance is not None:
            out["phash_distance"] = self.phash_distance
        if self.matches is not None:
            out["matches"] = self.matches
        if self.quality is not None:
            out["quality"] = self.quality
        return out


@dataclass(frozen=True)
class Group:
    """Near-duplicates: the one to keep, every member (the kept one first), and why."""

    keep: Member
    members: list[Member]
    reason: str = ""  # why the kept one was kept

    @property
    def others(self) -> list[Member]:
        """The members that are not kept."""
        return [m for m in self.members if m.id != self.keep.id]


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
    chunks = store.embeddings()
    while True:
        with store.lock:
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk


def _cosine_pairs(store: Store, threshold: float) -> set[tuple[int, int]]:
    """Every pair (a < b) of stored photos with cosine >= threshold."""
    index = store.index
    pairs: set[tuple[int, int]] = set()
    for chunk_ids, vecs in _locked(store):
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        for start in range(0, len(chunk_ids), QUERY_CHUNK):
            stop = start + QUERY_CHUNK
            with store.lock:
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
    links.update(dict.fromkeys(_cosine_pairs(store, threshold), "cosine"))
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


def find_groups(
    store: Store,
    threshold: float | None = None,
    keep: str = DEFAULT_KEEP,
    phash_max: int | None = PHASH_MAX,
    verify: Callable | None = None,
    band: float = 0.0,
) -> list[Group]:
    """Groups of near-duplicate images in the store, in a deterministic order.

    Candidate pairs (``candidate_pairs``: cosine >= threshold, default default_threshold(store);
    pHash within phash_max bits with cosine >= PHASH_COS_FLOOR, None or negative: off; exact
    copies; pairs verify returns) are assembled into stars around the photos the keep rule
    ranks first (module docstring); pairs a reviewer marked "not duplicates" are left out, and
    a photo a reviewer chose to keep comes first. A cosine link under threshold + band needs a
    second witness (BAND; the callers use it at the calibrated default threshold, not at one a
    user gives). Groups are sorted by their smallest path;
    members list the kept one first, then by path.
    """
    from .review import reviewed

    check_policy(keep)
    t = default_threshold(store) if threshold is None else check_threshold(threshold)
    phash_max = check_phash_max(phash_max)
    links, matches = candidate_pairs(store, t, phash_max, verify, band)
    apart, preferred = reviewed(store)
    links = {p: kind for p, kind in links.items() if p not in apart}
    nodes = sorted({i for p in links for i in p})
    with store.lock:
        records = store.db.get_many(nodes)
        nodes = [i for i in nodes if i in records]
        vectors = dict(zip(nodes, store.index.reconstruct(np.array(nodes, np.int64))))
    quality = (
        {i: measure(store.file_path(records[i].path)) for i in nodes}
        if keep == DEFAULT_KEEP
        else {}
    )
    links = {
        p: kind
        for p, kind in links.items()
        if p[0] in vectors
        and p[1] in vectors
        and _witnessed(p, kind, t + band, vectors, records, matches)
    }
    adjacent: dict[int, list[int]] = {i: [] for i in nodes}
    for a, b in links:
        if a in adjacent and b in adjacent:
            adjacent[a].append(b)
            adjacent[b].append(a)
    rank = _rank(keep, records, quality, preferred)
    taken: set[int] = set()
    groups = []
    for center in sorted(nodes, key=rank):
        if center in taken:
            continue
        joined = sorted(j for j in adjacent[center] if j not in taken)
        if not joined:
            continue
        taken.update([center, *joined])
        groups.append(
            _group(center, joined, records, vectors, (links, matches), quality, keep, preferred)
        )
    groups.sort(key=lambda g: min(m.path for m in g.members))
    return groups


def _witnessed(pair, kind, band_top, vectors, records, matches) -> bool:
    """False for a cosine link under band_top (in the band above the threshold) without a
    second witness."""
    a, b = pair
    if kind != "cosine" or float(vectors[a] @ vectors[b]) >= band_top:
        return True
    from .verification import MIN_MATCHES

    dist = _hash_distance(records[a].phash, records[b].phash)
    return matches.get(pair, 0) >= MIN_MATCHES or (dist is not None and dist <= WITNESS_PHASH)


def _rank(keep: str, records: dict, quality: dict, preferred: set[int]) -> Callable[[int], tuple]:
    """Sort key of ids: a reviewer's choice first, then the keep rule's order."""
    if keep == DEFAULT_KEEP:
        return lambda i: (
            i not in preferred,
            original_key(records[i].path, quality.get(i), records[i].size),
        )
    key = plain_key(keep)
    return lambda i: (i not in preferred, key(_plain(records[i])))


def _plain(rec: Any) -> Member:
    return Member(rec.id, rec.path, 0.0, rec.size, rec.width, rec.height, rec.mtime)


def _group(center, joined, records, vectors, links, quality, keep, preferred) -> Group:
    """The Group of a kept id and the ids joined to it, with the evidence of each."""
    ref = vectors[center]
    links, matches = links
    members = []
    for i in [center, *joined]:
        rec, q = records[i], quality.get(i)
        pair = (min(i, center), max(i, center))
        kind = "kept" if i == center else links[pair]
        members.append(
            Member(
                i,
                rec.path,
                1.0 if i == center else float(vectors[i] @ ref),
                rec.size,
                rec.width,
                rec.height,
                rec.mtime,
                _hash_distance(rec.phash, records[center].phash),
                kind,
                matches.get(pair) if i != center else None,
                q.to_dict() if q is not None else None,
            )
        )
    members.sort(key=lambda m: (m.id != center, m.path))
    why = "chosen in review" if center in preferred else reason(keep, members[0], quality)
    return Group(members[0], members, why)


def _hash_distance(a: int | None, b: int | None) -> int | None:
    """Bits in which two stored pHashes (signed int64) differ; None if either is unknown."""
    return None if a is None or b is None else ((a ^ b) & 0xFFFF_FFFF_FFFF_FFFF).bit_count()


def groups_to_dict(
    groups: list[Group], threshold: float, phash_max: int | None = None
) -> dict[str, Any]:
    """The JSON of `lookalike dedupe --json` and GET /duplicates: threshold and groups (and
    phash_max, the pHash distance that also joined photos, when given). Each group names the
    kept photo and why; each member gives the link that put it in the group."""
    out: dict[str, Any] = {"threshold": round(float(threshold), 6)}
    if phash_max is not None:
        out["phash_max"] = phash_max
    out["groups"] = [
        {"keep": g.keep.path, "reason": g.reason, "members": [m.to_dict() for m in g.members]}
        for g in groups
    ]
    return out


def duplicates(
    store: Store,
    threshold: float | None = None,
    keep: str = DEFAULT_KEEP,
    phash_max: int | None = PHASH_MAX,
    offset: int = 0,
    limit: int | None = None,
) -> dict:
    """find_groups as the JSON-ready dict of GET /duplicates (threshold None: the default);
    groups[offset:offset + limit] only, with "total" the number of groups."""
    t = default_threshold(store) if threshold is None else check_threshold(threshold)
    phash_max = check_phash_max(phash_max)
    from .verification import verified_pairs

    band = BAND if threshold is None else 0.0
    groups = find_groups(store, t, keep, phash_max, verified_pairs, band)
    page = groups[offset : None if limit is None else offset + limit]
    out = groups_to_dict(page, t, phash_max)
    out.update(total=len(groups), offset=offset)
    return out
