"""The Python API: ``lookalike.open(STORE)``, a collection to search, label, dedupe and add to.

A thin layer over :class:`lookalike.engine.Engine` for notebooks and scripts::

    import lookalike

    with lookalike.open("store") as photos:
        for hit in photos.search("holiday/beach.jpg", k=5):
            print(f"{hit.score:.3f}  {hit.path}  {', '.join(hit.labels)}")

A query is a file path (``str`` or ``Path``), the bytes of an image file, a Pillow image, or a
numpy array of any size ((H, W, 3) or (H, W, 4) uint8, (H, W) grey, or float in [0, 1]); each is
turned into model pixels by lookalike.images, the same path the collection went through. Hits
carry absolute paths. TensorFlow and FAISS load in :func:`open`, not at ``import lookalike``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .errors import InvalidArgumentError
from .images import array_to_pil, decode, from_pil, read_file

if TYPE_CHECKING:
    from .engine import Engine, Hit

Query = str | os.PathLike | bytes | Image.Image | np.ndarray


@dataclass(frozen=True)
class Match:
    """A stored photo found for a query: its id, absolute path, cosine score and labels."""

    id: int
    path: Path  # absolute
    score: float  # cosine similarity in [-1, 1]; ~1.0 for the same image
    labels: tuple[str, ...] = ()
    stored_path: str = ""  # as the store keeps it: relative to PHOTOS, '@uploads/...' for uploads


@dataclass(frozen=True)
class Photo:
    """A photo the collection holds: its id, absolute path and labels."""

    id: int
    path: Path
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suggestion:
    """Labels suggested for a query (label, share of the vote) and the neighbours that voted."""

    labels: list[tuple[str, float]]
    neighbours: list[Match]


@dataclass(frozen=True)
class DuplicateGroup:
    """Near-duplicates: the photo to keep, and the others with their cosine to it."""

    keep: Path
    others: list[tuple[Path, float]] = field(default_factory=list)


def open(store: str | os.PathLike, **engine_options: Any) -> Collection:  # noqa: A001
    """Open the store at ``store`` for queries (loads the encoder and the index once)."""
    from .engine import Engine

    return Collection(Engine.open(Path(store), **engine_options))


class Collection:
    """A store opened for queries; use it in a ``with`` block or call :meth:`close`."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the store (the table and its lock)."""
        self.engine.close()

    def __len__(self) -> int:
        return len(self.engine.store.db)

    def __repr__(self) -> str:
        return f"<lookalike collection {self.engine.store.root}: {len(self)} photos>"

    @property
    def root(self) -> Path:
        """The store folder."""
        return self.engine.store.root

    def pixels(self, query: Query) -> np.ndarray:
        """A query as the model sees it: (size, size, 3) uint8, preprocessed like the collection."""
        size, limit = self.engine.image_size, self.engine.max_pixels
        if isinstance(query, (bytes, bytearray, memoryview)):
            return decode(bytes(query), size, max_pixels=limit)[0]
        if isinstance(query, (str, os.PathLike)):
            return decode(read_file(Path(query).expanduser()), size, max_pixels=limit)[0]
        if isinstance(query, Image.Image):
            source = _unread_file(query)
            if source is not None:  # straight from Image.open: decode its file as files are
                return decode(read_file(source), size, max_pixels=limit)[0]
            return from_pil(query, size, max_pixels=limit)
        if isinstance(query, np.ndarray):
            return from_pil(array_to_pil(query), size, max_pixels=limit)
        raise InvalidArgumentError(
            f"a query is a path, bytes, a PIL image or a numpy array, got {type(query).__name__}"
        )

    def embed(self, query: Query) -> np.ndarray:
        """A query's embedding: a (d,) float32 unit vector."""
        return self.engine.embed(self.pixels(query)[None])[0]

    def search(self, query: Query, k: int = 10) -> list[Match]:
        """The k stored photos most like the query, best first."""
        return self._matches(self.engine.search_pixels(self.pixels(query), k))

    def similar(self, photo_id: int, k: int = 10) -> list[Match]:
        """The k stored photos most like the stored photo photo_id (itself left out)."""
        return self._matches(self.engine.search_id(photo_id, k))

    def suggest(self, query: Query, k: int = 10, top: int = 3) -> Suggestion:
        """Labels for the query from its k labelled look-alikes (a weighted vote)."""
        from .labels import vote

        hits = self.engine.search_pixels(self.pixels(query), k)
        return Suggestion(vote(((h.labels, h.score) for h in hits), top), self._matches(hits))

    def duplicates(
        self, threshold: float | None = None, keep: str = "largest", phash_max: int | None = 10
    ) -> list[DuplicateGroup]:
        """Groups of near-duplicate photos (threshold None: the store's calibrated one)."""
        data = _duplicates_function()(self.engine.store, threshold, keep, phash_max)
        path = self._path
        return [
            DuplicateGroup(
                path(g["keep"]),
                [(path(m["path"]), m["score"]) for m in g["members"] if m["path"] != g["keep"]],
            )
            for g in data["groups"]
        ]

    def add(self, *images: Query) -> list[Photo]:
        """Copy images into the store's uploads folder and index them at once (all or none).

        Paths and bytes are stored as they are; Pillow images and arrays as PNG files.
        """
        files = [_upload(image) for image in images]
        ids = self.engine.add_images(files)
        records = self.engine.store.db.get_many(set(ids))
        return [Photo(i, self._path(records[i].path), records[i].labels) for i in ids]

    def _path(self, stored: str) -> Path:
        return Path(os.path.abspath(self.engine.store.file_path(stored)))

    def _matches(self, hits: list[Hit]) -> list[Match]:
        return [Match(h.id, self._path(h.path), h.score, h.labels, h.path) for h in hits]


def _unread_file(img: Image.Image) -> Path | None:
    """The JPEG file a Pillow image was opened from, while its pixels are not read yet.

    Such an image cannot have been edited, and decoding its file gives exactly the collection's
    preprocessing (JPEG draft mode included), without changing the caller's image object.
    """
    name = getattr(img, "filename", "")
    if img.format in ("JPEG", "MPO") and getattr(img, "tile", None) and name:
        path = Path(name)
        return path if path.is_file() else None
    return None


def _upload(image: Query) -> tuple[str, bytes]:
    """(file name, file bytes) of an image to add."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "upload", bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).name, read_file(Path(image).expanduser())
    if isinstance(image, np.ndarray):
        image = array_to_pil(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return "image.png", buf.getvalue()
    raise InvalidArgumentError(
        f"an image is a path, bytes, a PIL image or a numpy array, got {type(image).__name__}"
    )


def _duplicates_function():
    """The dedupe package's `duplicates(store, threshold, keep, phash_max)` -> JSON-ready dict."""
    from .dedupe.grouping import duplicates

    return duplicates
