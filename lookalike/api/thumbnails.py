"""The thumbnail cache: a fixed set of sizes, made once, kept in STORE/thumbnails, removed with
their image.

A file is `{id}-{sha256[:12]}-{size}.jpg`: the id finds every thumbnail of a row, the hash
prefix tells a thumbnail of a file since changed. Only SIZES are made, so the cache holds at most
len(SIZES) files a photo, whatever sizes clients ask for.
"""

from __future__ import annotations

import logging
import os
import uuid

from ..errors import ImageDecodeError, InvalidArgumentError, NotFoundError
from ..images import read_file, thumbnail
from ..photos import exists, is_url
from ..store import THUMBNAILS as FOLDER
from ..store import remove_thumbnails  # noqa: F401  (re-exported: DELETE and tests use it)

log = logging.getLogger(__name__)

SIZES = (128, 256, 512, 1024)  # longest side, pixels


def thumbnail_size(requested: int) -> int:
    """The size served for a requested one: the smallest of SIZES at least as large."""
    for size in SIZES:
        if requested <= size:
            return size
    raise InvalidArgumentError(f"thumbnail size must be at most {SIZES[-1]}, got {requested}")


def cached_thumbnail(engine, image_id: int, size: int) -> bytes:
    """The JPEG thumbnail of a stored image at one of SIZES, from the cache or made and cached.

    A thumbnail made while its row is being removed is removed again (the row is checked after
    the file is in place, and DELETE removes thumbnails after the row), so none outlives it.
    """
    if size not in SIZES:
        raise InvalidArgumentError(f"thumbnail size must be one of {SIZES}, got {size}")
    record, path = _located(engine, image_id)
    folder = engine.store.root / FOLDER
    stem = f"{image_id}-{record.sha256[:12]}-"
    cache = folder / f"{stem}{size}.jpg"
    try:
        return cache.read_bytes()
    except OSError:  # not made yet (or unreadable: made again)
        pass
    data = thumbnail(_read(path, image_id, record), size, **engine.decode_limits)
    tmp = cache.with_name(f"{cache.name}.{uuid.uuid4().hex}.tmp")  # unique per request
    try:
        folder.mkdir(exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, cache)
    except OSError as exc:  # a full disk or a read-only store: serve it, uncached
        log.warning("cannot cache thumbnail %s: %s", cache.name, exc)
        tmp.unlink(missing_ok=True)
        return data
    current = engine.store.db.get(image_id)
    if current is None:
        cache.unlink(missing_ok=True)
        raise NotFoundError(f"no image with id {image_id}")
    for old in folder.glob(f"{image_id}-*.jpg"):  # thumbnails of the file before it changed
        if not old.name.startswith(f"{image_id}-{current.sha256[:12]}-"):
            old.unlink(missing_ok=True)
    return data


def stored_file(engine, image_id: int):
    """(record, path) of a stored image whose file is on disk; NotFoundError otherwise.

    Photos in a bucket are served from a copy of the object kept beside the thumbnails
    ({id}-{sha256[:12]}-original{suffix}, removed with them): the route serves a local file.
    """
    record, location = _located(engine, image_id)
    if not is_url(location):
        return record, location
    folder = engine.store.root / FOLDER
    suffix = os.path.splitext(record.path)[1].lower()
    copy = folder / f"{image_id}-{record.sha256[:12]}-original{suffix}"
    if copy.is_file():
        if not exists(location):  # gone from the bucket: gone, as a deleted file is
            raise NotFoundError(f"image {image_id} ({record.path}) is no longer in its bucket")
        return record, copy
    data = _read(location, image_id, record)
    tmp = copy.with_name(f"{copy.name}.{uuid.uuid4().hex}.tmp")
    try:
        folder.mkdir(exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, copy)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise NotFoundError(f"image {image_id} cannot be copied from {location}: {exc}") from None
    return record, copy


def _located(engine, image_id: int):
    """(record, location) of a stored image: a local file that exists, or an object's URL."""
    record = engine.store.db.get(image_id)
    if record is None:
        raise NotFoundError(f"no image with id {image_id}")
    location = engine.store.file_path(record.path)
    if not is_url(location) and not location.is_file():
        raise NotFoundError(f"image {image_id} ({record.path}) is no longer on disk")
    return record, location


def _read(location, image_id: int, record) -> bytes:
    """A stored image's bytes; an object gone from its bucket is NotFoundError, as a file."""
    if not is_url(location):
        return read_file(location)
    try:
        return read_file(location)
    except ImageDecodeError:
        if exists(location):
            raise
    raise NotFoundError(f"image {image_id} ({record.path}) is no longer in its bucket")
