"""Exceptions raised by lookalike.

Every error the library raises on purpose derives from :class:`LookalikeError`, so callers can
catch one type. The CLI prints the message and exits non-zero; the HTTP API maps each class to a
status code in one exception handler.

    LookalikeError
    ├── ImageError                 an input image cannot be used (HTTP 400)
    │   ├── ImageDecodeError       not an image, truncated, zero bytes, unsupported format
    │   └── ImageTooLargeError     too many pixels (decompression bomb guard)
    ├── StoreError                 a store on disk cannot be used
    │   ├── StoreNotFoundError     no store at that path
    │   ├── StoreVersionError      store written by an incompatible version
    │   ├── StoreNotTrainedError   the store has no model yet
    │   ├── StoreBusyError         another process holds the store's writer lock (HTTP 503)
    │   │   └── StoreIncompleteError  a retrain's re-embedding is unfinished (HTTP 503)
    │   └── StoreWriteError        the store cannot be written: read-only, disk full (HTTP 503)
    ├── NotFoundError              an id or file the store does not know (HTTP 404)
    └── InvalidArgumentError       an argument out of range or inconsistent (HTTP 422)
"""

from __future__ import annotations


class LookalikeError(Exception):
    """Base class of every error lookalike raises on purpose."""


class ImageError(LookalikeError):
    """An input image cannot be used."""


class ImageDecodeError(ImageError):
    """The bytes are not a readable image (empty, truncated, unknown format)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed (a decompression bomb guard)."""


class StoreError(LookalikeError):
    """A store on disk cannot be used."""


class StoreNotFoundError(StoreError):
    """There is no store at the given path."""


class StoreVersionError(StoreError):
    """The store was written by an incompatible version of lookalike."""


class StoreNotTrainedError(StoreError):
    """The store has no trained model yet."""


class StoreBusyError(StoreError):
    """Another process holds the store's writer lock longer than the caller can wait."""

    retry_after = 5  # seconds a client should wait before trying again (HTTP Retry-After)


class StoreIncompleteError(StoreBusyError):
    """A retrain's index run is re-embedding the store's photos, or was interrupted doing so:
    what needs every row embedded by one model (dedupe, uploads, undo) waits for it to finish."""

    retry_after = 30


class StoreWriteError(StoreError):
    """The store cannot be written (read-only folder, disk full); nothing was changed."""


class NotFoundError(LookalikeError):
    """An image id or path the store does not know."""


class InvalidArgumentError(LookalikeError):
    """An argument is out of range or inconsistent with the store."""
