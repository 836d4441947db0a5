"""FAISS behind one small class: stable int64 ids, cosine scores, checked inputs."""

from __future__ import annotations

import os
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

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of the given ids, (n, dim)."""
        return (
            np.stack([self.index.reconstruct(int(i)) for i in ids])
            if len(ids)
            else (np.zeros((0, self.dim), np.float32))
        )

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file renamed over the old one."""
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, index_type: str) -> KnnIndex:
        return cls(faiss.read_index(str(path)), index_type)
