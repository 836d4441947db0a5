"""Near-duplicate groups of a store: pairs above a cosine threshold, joined into components.

Pairs come from FAISS range searches over the store's own vectors, a chunk of queries at a
time, and are merged at once by union-find: memory holds the ids, one chunk's results and the
parent array, never an n x n matrix. Exact copies (same sha256) are always joined. No
TensorFlow here: grouping reads the vectors the store already has.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from ..store import Store
    from .knn import KnnIndex

# Used when a store has no calibrated threshold for its current model (see docs/dedupe.md):
# the threshold with pair precision >= 0.95 on intel_neardup for the default model, measured
# with labels by scripts/bench_dedupe.py.
FALLBACK_THRESHOLD = 0.85
KEEP_POLICIES = ("largest", "smallest", "oldest", "newest", "shortest-path")
QUERY_CHUNK = 1024  # range-search queries per FAISS call: bounds the memory of one call


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "score": round(self.score, 6),
            "bytes": self.bytes,
            "width": self.width,
            "height": self.height,
        }


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


def similar_pairs(
    index: KnnIndex, ids: np.ndarray, vectors: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) int64 arrays, a < b, of the pairs with cosine >= threshold between the queries
    (vectors (m, d) with ids (m,)) and the index. A pair may come twice (once per side)."""
    # faiss keeps inner products strictly above the radius
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))
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
) -> list[list[int]]:
    """Connected components (of two or more) of the pairs at or above threshold.

    ids: every id in the index; chunks yields (ids, vectors) of every stored vector, as
    MetaDB.embeddings does; same_file gives sets of ids joined whatever their score (exact
    copies). Pairs are merged chunk by chunk, so memory holds one chunk's results, not all.
    Components are lists of ids sorted ascending, ordered by their smallest id.
    """
    all_ids = np.unique(np.asarray(ids, dtype=np.int64))  # (n,) sorted: id -> position
    uf = UnionFind(len(all_ids))

    def positions(x: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(all_ids, x), max(len(all_ids) - 1, 0))
        return np.where(all_ids[pos] == x, pos, -1) if len(all_ids) else pos

    for chunk_ids, vecs in chunks:
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        for start in range(0, len(chunk_ids), QUERY_CHUNK):
            stop = start + QUERY_CHUNK
            a, b = similar_pairs(index, chunk_ids[start:stop], vecs[start:stop], threshold)
            pa, pb = positions(a), positions(b)
            ok = (pa >= 0) & (pb >= 0)  # an id the table no longer has is ignored
            for x, y in zip(pa[ok].tolist(), pb[ok].tolist()):
                uf.union(x, y)
    for group in same_file:
        pos = [p for p in positions(np.fromiter(group, dtype=np.int64)).tolist() if p >= 0]
        for x in pos[1:]:
            uf.union(pos[0], x)
    return [[int(all_ids[i]) for i in comp] for comp in uf.components()]


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


def find_groups(store: Store, threshold: float | None = None, keep: str = "largest") -> list[Group]:
    """Groups of near-duplicate images in the store, in a deterministic order.

    Pairs with cosine >= threshold (default: default_threshold(store)) and exact copies are
    joined into connected components. keep picks the member to keep: largest (pixels, then
    bytes), smallest, oldest or newest (mtime), shortest-path; ties go to the smaller path.
    Groups are sorted by their smallest path; members list the kept one first, then by path.
    """
    key = _keep_key(keep)
    t = default_threshold(store) if threshold is None else check_threshold(threshold)
    with store.lock:
        index = store.index
        conn = store.db.conn
        ids = np.fromiter((r[0] for r in conn.execute("SELECT id FROM images")), np.int64)
        copies = [
            [int(i) for i in row[0].split(",")]
            for row in conn.execute(
                "SELECT group_concat(id) FROM images GROUP BY sha256 HAVING COUNT(*) > 1"
            )
        ]
        components = group_ids(index, ids, store.db.embeddings(store.dim), t, copies)
        grouped = [i for comp in components for i in comp]
        records = store.db.get_many(grouped)
        vectors = dict(zip(grouped, index.reconstruct(np.array(grouped, dtype=np.int64))))
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
            )
            for m in plain
        ]
        members.sort(key=lambda m: (m.id != kept.id, m.path))
        groups.append(Group(members[0], members))
    groups.sort(key=lambda g: min(m.path for m in g.members))
    return groups


def groups_to_dict(groups: list[Group], threshold: float) -> dict[str, Any]:
    """The JSON of `lookalike dedupe --json` and GET /duplicates: threshold and groups."""
    return {
        "threshold": round(float(threshold), 6),
        "groups": [
            {"keep": g.keep.path, "members": [m.to_dict() for m in g.members]} for g in groups
        ],
    }
