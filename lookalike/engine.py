"""Queries against a store: the one path from an image to its neighbours, for CLI and HTTP alike."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidArgumentError, NotFoundError
from .images import DEFAULT_MAX_PIXELS, decode
from .store import Store

if TYPE_CHECKING:
    from .encoder.embed import Embedder

MAX_K = 1000


@dataclass(frozen=True)
class Hit:
    """One neighbour: its id, its path relative to PHOTOS, and the cosine similarity."""

    id: int
    path: str
    score: float
    labels: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        out = {"id": self.id, "path": self.path, "score": round(self.score, 6)}
        if self.labels:
            out["labels"] = list(self.labels)
        return out


class Engine:
    """A store loaded for queries: the encoder, the whitening and the index, loaded once.

    Reads take the store's lock only around FAISS, so encoding runs in parallel; writes hold it
    for the whole update, so a search never sees a half-applied change.
    """

    def __init__(
        self, store: Store, embedder: Embedder | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        self.store = store
        self.cfg = store.model_config()
        self.embedder = embedder or store.load_embedder()
        self.max_pixels = max_pixels
        _ = store.index  # load (or rebuild) the index now, not on the first query
        self._embed_lock = threading.Lock()

    @classmethod
    def open(cls, store_path: Path | str, **kwargs) -> Engine:
        return cls(Store.open(store_path), **kwargs)

    def close(self) -> None:
        self.store.close()

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(n, s, s, 3) uint8 -> (n, d) unit float32."""
        return self.embedder(pixels)

    def embed_bytes(self, data: bytes) -> np.ndarray:
        """One image's bytes -> (d,) unit vector; ImageError if they are not a usable image."""
        pixels = decode(data, self.image_size, max_pixels=self.max_pixels)[0]
        return self.embed(pixels[None])[0]

    def search_vectors(
        self, vectors: np.ndarray, k: int, exclude: Sequence[int | None] | None = None
    ) -> list[list[Hit]]:
        """The k nearest stored images of each vector; exclude[i] drops one id from row i."""
        if not 1 <= k <= MAX_K:
            raise InvalidArgumentError(f"k must be between 1 and {MAX_K}, got {k}")
        extra = 1 if exclude is not None else 0
        with self.store.lock:
            scores, ids = self.store.index.search(vectors, k + extra)
            records = self.store.db.get_many({int(i) for i in ids.ravel() if i >= 0})
        out = []
        for row, (srow, irow) in enumerate(zip(scores, ids)):
            skip = exclude[row] if exclude is not None else None
            hits = [
                Hit(int(i), records[int(i)].path, float(s), records[int(i)].labels)
                for s, i in zip(srow, irow)
                if i >= 0 and i != skip and int(i) in records
            ]
            out.append(hits[:k])
        return out

    def search_bytes(self, data: bytes, k: int = 10) -> list[Hit]:
        """Neighbours of an uploaded image."""
        return self.search_vectors(self.embed_bytes(data)[None], k)[0]

    def search_id(self, image_id: int, k: int = 10) -> list[Hit]:
        """Neighbours of a stored image, itself excluded."""
        with self.store.lock:
            if self.store.db.get(image_id) is None:
                raise NotFoundError(f"no image with id {image_id}")
            vec = self.store.index.reconstruct([image_id])
        return self.search_vectors(vec, k, exclude=[image_id])[0]
