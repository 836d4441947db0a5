"""FAISS behind one small class: stable int64 ids, cosine scores, checked inputs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import faiss
import numpy as np

from ..errors import InvalidArgumentError

INDEX_TYPES = ("flat", "ivf")
# Below this many vectors `auto` keeps exact search: a flat scan of 128-d vectors stays under a few
# ms/query up to here on 2 cores (scripts/bench_query.py), and exact search needs no training.
AUTO_IVF_THRESHOLD = 200_000


def resolve_index_type(index_type: str, count: int) -> str:
    """'auto' -> 'flat' or 'ivf' by collection size; others are checked and returned."""
    if index_type == "auto":
        return "ivf" if count >= AUTO_IVF_THRESHOLD else "flat"
    if index_type not in INDEX_TYPES:
        raise InvalidArgumentError(f"index type must be auto, flat or ivf, got {index_type!r}")
    return index_type


def ivf_params(count: int) -> tuple[int, int]:
    """(nlist, nprobe) for an IVF-Flat index of count vectors: ~4 sqrt(n) lists, 1/8 probed."""
    nlist = int(max(1, min(65536, 4 * np.sqrt(max(count, 1)))))
    return nlist, min(nlist, max(8, nlist // 8))


def as_vectors(x: np.ndarray, dim: int) -> np.ndarray:
    """Check and convert to (n, dim) C-contiguous float32."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise InvalidArgumentError(f"expected vectors of shape (n, {dim}), got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


class KnnIndex:
    """Inner-product kNN over unit vectors with stable ids: exact (flat) or IVF-Flat."""

    def __init__(self, index: faiss.Index, index_type: str):
        self.index = index
        self.index_type = index_type

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    @classmethod
    def empty(cls, dim: int, index_type: str, train: np.ndarray | None = None) -> KnnIndex:
        """An empty index; IVF needs training vectors (a sample of what it will hold)."""
        if index_type == "flat":
            return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), "flat")
        if index_type != "ivf":
            raise InvalidArgumentError(f"index type must be flat or ivf, got {index_type!r}")
        train = as_vectors(train if train is not None else np.zeros((0, dim)), dim)
        nlist, nprobe = ivf_params(len(train))
        if len(train) < 2 * nlist:
            raise InvalidArgumentError(
                f"an IVF index of {nlist} lists needs at least {2 * nlist} training vectors, "
                f"got {len(train)}"
            )
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        index.nprobe = nprobe
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return cls(index, "ivf")

    @classmethod
    def build(cls, dim: int, index_type: str, vectors: np.ndarray, ids: np.ndarray) -> KnnIndex:
        """A new index filled with vectors; 'auto' picks by size, IVF trains on the vectors."""
        vectors = as_vectors(vectors, dim)
        knn = cls.empty(dim, resolve_index_type(index_type, len(vectors)), vectors)
        knn.add(vectors, ids)
        return knn

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors under the given int64 ids (the caller keeps ids unique)."""
        vectors = as_vectors(vectors, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise InvalidArgumentError(f"{len(vectors)} vectors but {len(ids)} ids")
        if len(ids):
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove the given ids; returns how many were present."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return int(self.index.remove_ids(ids)) if len(ids) else 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k'), k' = min(k, len(self)); best first, cosine scores."""
        queries = as_vectors(queries, self.dim)
        if k < 1:
            raise InvalidArgumentError(f"k must be at least 1, got {k}")
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self.index.search(queries, k)
        return scores, ids

    def range_search(self, queries: np.ndarray, threshold: float):
        """faiss range search: (lims, scores, ids) of every stored vector with score >= threshold."""
        queries = as_vectors(queries, self.dim)
        return self.index.range_search(queries, float(threshold))

    def ids(self) -> np.ndarray:
        """Every stored id, (n,) int64 (order unspecified): for consistency checks."""
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is None:  # IndexIDMap2 over a flat index
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        lists = ivf.invlists
        parts = [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
            for i in range(ivf.nlist)
            if lists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of the given ids, (n, dim)."""
        return (
            np.stack([self.index.reconstruct(int(i)) for i in ids])
            if len(ids)
            else (np.zeros((0, self.dim), np.float32))
        )

    def serialize(self) -> bytes:
        """The index as bytes (faiss.serialize_index): for saving and for in-memory backups."""
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def deserialize(cls, data: bytes) -> KnnIndex:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return cls(index, _kind(index))

    def save(self, path: Path) -> None:
        """Write atomically: a uniquely named temporary file renamed over path."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".faiss")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(self.serialize())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, index_type: str | None = None) -> KnnIndex:
        index = faiss.read_index(str(path))
        return cls(index, index_type or _kind(index))


def _kind(index: faiss.Index) -> str:
    """'ivf' for an IVF index (also inside an id map), else 'flat'."""
    return "ivf" if faiss.try_extract_index_ivf(index) is not None else "flat"


# An IVF index probes the fewest lists that keep this recall@10 against exact search.
TARGET_RECALL = 0.98
NPROBE_SWEEP = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def exact_neighbours(queries: np.ndarray, chunks, k: int) -> np.ndarray:
    """Ids of the exact top-k inner-product neighbours of queries among (ids, vectors) chunks,
    streamed: only one chunk is in memory at a time."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for ids, vectors in chunks:
        kk = min(k, len(vectors))
        scores, idx = faiss.knn(queries, vectors, kk, metric=faiss.METRIC_INNER_PRODUCT)
        if kk < k:  # pad a short chunk
            pad = k - kk
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(scores, np.where(idx >= 0, ids[np.maximum(idx, 0)], -1))
    heap.finalize()
    return heap.I


def _recall_without_self(found: np.ndarray, truth: np.ndarray, self_ids: np.ndarray, k: int):
    """recall@k of found against truth, each row's own id (the query is a stored vector) left
    out of both lists."""
    hits = 0
    for f, t, s in zip(found, truth, self_ids):
        f = [i for i in f.tolist() if i != s and i >= 0][:k]
        t = [i for i in t.tolist() if i != s and i >= 0][:k]
        hits += len(set(f) & set(t))
    return hits / (len(truth) * k)


def tune_nprobe(
    knn: KnnIndex,
    chunks_fn,
    count: int,
    queries: int = 1000,
    k: int = 10,
    target: float = TARGET_RECALL,
    seed: int = 0,
) -> dict:
    """Measure an IVF index against exact search and set the smallest nprobe that reaches
    ``target`` recall@k (the way autofaiss tunes its search parameters).

    The queries are ``queries`` stored vectors drawn at random; each one's own vector is left
    out of both answers. ``chunks_fn()`` yields (ids, vectors) chunks of everything stored (it
    is read twice). Returns {"nprobe", "recall_at_10", "queries", "sweep": {nprobe: recall}}.
    """
    index = faiss.extract_index_ivf(knn.index)
    picks = np.sort(np.random.default_rng(seed).choice(count, min(queries, count), replace=False))
    q, qids, seen, p = [], [], 0, 0
    for ids, vectors in chunks_fn():
        while p < len(picks) and picks[p] < seen + len(ids):
            q.append(vectors[picks[p] - seen])
            qids.append(ids[picks[p] - seen])
            p += 1
        seen += len(ids)
    xq = np.ascontiguousarray(np.stack(q), dtype=np.float32)
    qids = np.array(qids)
    truth = exact_neighbours(xq, chunks_fn(), k + 1)
    sweep: dict[int, float] = {}
    chosen = index.nlist
    for nprobe in [n for n in NPROBE_SWEEP if n < index.nlist] + [index.nlist]:
        index.nprobe = nprobe
        _, found = knn.search(xq, k + 1)
        sweep[nprobe] = round(_recall_without_self(found, truth, qids, k), 4)
        if sweep[nprobe] >= target:
            chosen = nprobe
            break
    index.nprobe = chosen
    return {
        "nprobe": chosen,
        "recall_at_10": sweep[chosen],
        "queries": len(xq),
        "target": target,
        "sweep": sweep,
    }
