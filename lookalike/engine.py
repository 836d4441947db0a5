"""Queries against a store: the one path from an image to its neighbours, for CLI and HTTP alike."""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from .errors import InvalidArgumentError, NotFoundError, StoreBusyError, StoreWriteError
from .images import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, decode, phash64
from .index.meta import ImageRecord
from .labels import vote
from .store import UPLOAD_PREFIX, Store

if TYPE_CHECKING:
    from .encoder.runtime import PortableEmbedder

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
        self,
        store: Store,
        embedder: PortableEmbedder | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        single_thread_faiss: bool = True,
        write_timeout: float | None = None,
        max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    ):
        self.store = store
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        self.single_thread_faiss = single_thread_faiss
        self.write_timeout = write_timeout  # seconds a write waits for the store (None: ever)
        store.write_timeout = write_timeout  # every write through this engine's store, too
        self._model_lock = threading.Lock()
        _ = store.index  # load (or build) the index now, not on the first query
        self._use_model(store.index_model_serial, embedder)

    def _use_model(self, serial: int, embedder: PortableEmbedder | None = None) -> None:
        """Load the embedder of model ``serial``: the one the served index was built with (not
        necessarily the store's newest: a retrain half-way serves the previous model)."""
        cfg = self.store.model_config(serial)
        embedder = embedder or self.store.load_embedder(serial)
        # the first run of the portable model allocates its buffers: now, not in the first query
        embedder(np.zeros((1, cfg.image_size, cfg.image_size, 3), np.uint8))
        self.cfg, self.embedder, self.serial = cfg, embedder, serial

    def _current(self) -> tuple[PortableEmbedder, int]:
        """(embedder, model serial) matching the index being served: after another process
        retrained the store, the new model is loaded before the next query is embedded."""
        for _ in range(3):
            self.store.refresh()
            serial = self.store.index_model_serial
            if serial == self.serial:
                return self.embedder, self.serial
            with self._model_lock:
                try:
                    if serial != self.serial:
                        self._use_model(serial)
                    return self.embedder, self.serial
                except FileNotFoundError:  # a newer complete index replaced it: refresh again
                    continue
        raise StoreBusyError("the store's model is changing; try again")

    @classmethod
    def open(cls, store_path: Path | str, **kwargs) -> Engine:
        return cls(Store.open(store_path), **kwargs)

    def close(self) -> None:
        self.store.close()

    @property
    def decode_limits(self) -> dict[str, int]:
        """The keyword arguments of images.decode and images.thumbnail that bound a decode."""
        return {"max_pixels": self.max_pixels, "max_bytes": self.max_decode_bytes}

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(n, s, s, 3) uint8 -> (n, d) unit float32, with the served model."""
        return self._current()[0](pixels)

    def embed_bytes(self, data: bytes) -> np.ndarray:
        """One image's bytes -> (d,) unit vector; ImageError if they are not a usable image."""
        pixels = decode(data, self.image_size, **self.decode_limits)[0]
        return self.embed(pixels[None])[0]

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int,
        exclude: Sequence[int | None] | None = None,
        serial: int | None = None,
    ) -> list[list[Hit]]:
        """The k nearest stored images of each vector; exclude[i] drops one id from row i.

        ``serial``: the model that embedded the vectors; StaleModel if the served index
        belongs to another one (a retrain landed between embedding and searching).
        """
        if not 1 <= k <= MAX_K:
            raise InvalidArgumentError(f"k must be between 1 and {MAX_K}, got {k}")
        extra = 1 if exclude is not None else 0
        with self.store.lock:
            if serial is not None and serial != self.store.index_model_serial:
                raise _StaleModel
            if self.single_thread_faiss and len(vectors) <= 4:
                # One query at a time: OpenMP's thread start-up and its fight with the embedding
                # runtime's threads cost milliseconds a query on 2 cores (p99 12 -> 5 ms quiet,
                # p50 16 -> 4 ms loaded, measured with TensorFlow; scripts/bench_query.py). The setting is per calling thread, so it
                # is set (and restored) here, in the thread that searches.
                threads = faiss.omp_get_max_threads()
                faiss.omp_set_num_threads(1)
                try:
                    scores, ids = self.store.index.search(vectors, k + extra)
                finally:
                    faiss.omp_set_num_threads(threads)
            else:
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
        return self.search_pixels(decode(data, self.image_size, **self.decode_limits)[0], k)

    def search_pixels(self, pixels: np.ndarray, k: int = 10) -> list[Hit]:
        """Neighbours of one (s, s, 3) uint8 image, embedded by the model of the served index."""
        for _ in range(3):  # a retrain landing mid-query: embed again with the new model
            embedder, serial = self._current()
            try:
                return self.search_vectors(embedder(pixels[None]), k, serial=serial)[0]
            except _StaleModel:
                continue
        raise StoreBusyError("the store's model is changing; try again")

    def suggest_bytes(
        self, data: bytes, k: int = 10, top: int = 3
    ) -> tuple[list[tuple[str, float]], list[Hit]]:
        """Labels for an image from its k neighbours' vote (see lookalike.labels.vote)."""
        hits = self.search_bytes(data, k)
        return vote(((h.labels, h.score) for h in hits), top), hits

    def search_id(self, image_id: int, k: int = 10) -> list[Hit]:
        """Neighbours of a stored image, itself excluded."""
        with self.store.lock:
            self.store.refresh()
            if self.store.db.get(image_id) is None:
                raise NotFoundError(f"no image with id {image_id}")
            try:
                vec = self.store.index.reconstruct([image_id])
            except RuntimeError:  # added since the served index (a retrain is half-way)
                raise NotFoundError(f"image {image_id} is not in the served index yet") from None
        return self.search_vectors(vec, k, exclude=[image_id])[0]

    def add_images(self, files: Sequence[tuple[str, bytes]]) -> list[int]:
        """Store uploaded images under STORE/uploads, embed them and index them at once.

        All or nothing: every file is decoded first (an ImageError writes nothing); then, under
        the writer lock (StoreBusyError after ``write_timeout``), the files, the table rows and
        the index file are written in one commit that a failure (a full disk) rolls back whole.
        """
        decoded = [
            (name, data, *decode(data, self.image_size, **self.decode_limits))
            for name, data in files
        ]
        if not decoded:
            return []
        self.store.require_complete()  # the rows must all be of one model
        pixels = np.stack([d[2] for d in decoded])
        embedder, serial = self._current()
        vectors = embedder(pixels)  # outside the lock: searches and other uploads go on
        with self.store.writing(timeout=self.write_timeout):
            if self.store.model_serial != serial:  # retrained meanwhile
                embedder, serial = self._current()
                vectors = embedder(pixels)
            written: list[Path] = []
            try:
                records = [self._save_upload(d, written) for d in decoded]
                return self.store.add_rows(records, vectors, serial)
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise

    def _save_upload(self, decoded: tuple, written: list[Path]) -> ImageRecord:
        """Write one upload's bytes under STORE/uploads (unique name) -> its table record."""
        name, data, pixels, width, height = decoded
        uploads = self.store.uploads_dir
        target = uploads / _upload_name(name, data)
        try:
            uploads.mkdir(exist_ok=True)
            with open(target, "xb") as fh:
                written.append(target)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise StoreWriteError(f"cannot save the upload in {uploads}: {exc.strerror}") from None
        digest = hashlib.sha256(data).hexdigest()
        mtime = target.stat().st_mtime
        return ImageRecord(
            0,
            UPLOAD_PREFIX + target.name,
            len(data),
            mtime,
            digest,
            width,
            height,
            phash=phash64(pixels),
        )

    def remove_image(self, image_id: int) -> None:
        """Remove one image from the index and the table; an uploaded file (the only copy)
        goes to the store's trash, a file of the photos folder stays where it is."""
        with self.store.writing(timeout=self.write_timeout):
            record = self.store.db.get(image_id)
            if record is None:
                raise NotFoundError(f"no image with id {image_id}")
            self.store.remove_images([image_id])
            if record.path.startswith(UPLOAD_PREFIX):
                self._trash_upload(record.path)

    def _trash_upload(self, rel_path: str) -> None:
        """Move an upload's file into the store's trash (one rename: same folder tree)."""
        src = self.store.file_path(rel_path)
        if not src.exists():
            return
        dest = self.store.new_trash_dir() / "uploads" / rel_path[len(UPLOAD_PREFIX) :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)


class _StaleModel(Exception):
    """The served index changed model between embedding a query and searching it."""


_SUFFIX = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "DIB": ".bmp",
    "TIFF": ".tif",
}


def _upload_name(name: str, data: bytes) -> str:
    """A safe, unique file name for an upload: no path parts, a random prefix, and the suffix
    of its real format (so a re-index finds it)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        suffix = _SUFFIX.get(img.format or "", ".img")
    stem = os.path.splitext(os.path.basename(name or "upload"))[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[-60:].strip("_") or "upload"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}-{stem}{suffix}"
