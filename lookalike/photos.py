"""Where the photos live: a local folder, or a prefix in object storage (s3://, gs://).

One small API for both, used by the indexer, the Ray workers and the HTTP API alike:

- ``open_photos(root)`` -> ``LocalPhotos`` or ``BucketPhotos``: ``files(suffixes)`` walks the
  collection in collection order, ``stat(location)`` gives (size, change time), ``rel`` and
  ``locate`` turn a location into the table's relative path and back;
- ``read_bytes(location)`` reads one photo, wherever it is.

A location is a ``Path`` for a local file and a URL string (``s3://bucket/key``) for an object.
Local folders take the same path as always (``os.walk``, ``os.stat``, ``Path.read_bytes``);
buckets go through fsspec (s3fs, gcsfs), imported only when a URL is used. Object storage has
no mtime: an object's LastModified stands in for it (it changes on every write), and the
sha256 of its bytes confirms a change, as for local files.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from .errors import ImageDecodeError, InvalidArgumentError

# URL schemes read through fsspec, and the extra that installs each one's file system
SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_url(root: Path | str | None) -> bool:
    """Whether a photos root (or a photo's location) is an object-storage URL."""
    if root is None or isinstance(root, Path):
        return False
    scheme, sep, _ = str(root).partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def normalise(root: Path | str) -> Path | str:
    """A photos root as the store keeps it: a resolved Path, or a URL without a trailing '/'."""
    if is_url(root):
        scheme, _, rest = str(root).partition("://")
        rest = rest.strip("/")
        if not rest:
            raise InvalidArgumentError(f"no bucket in {root!r}; expected {scheme}://BUCKET/PREFIX")
        return f"{scheme.lower()}://{rest}"
    return Path(root).expanduser().resolve()


def locate(root: Path | str, rel: str) -> Path | str:
    """The location of a table path under a photos root."""
    return f"{root}/{rel}" if is_url(root) else Path(root) / rel


def relative(root: Path | str, location: Path | str) -> str:
    """The table path of a location under a photos root ('/' separated)."""
    if not is_url(root):
        return Path(location).relative_to(root).as_posix()
    prefix = f"{root}/"
    if not str(location).startswith(prefix):
        raise ValueError(f"{location} is not under {root}")
    return str(location)[len(prefix) :]


def filesystem(url: str):
    """(fsspec file system, path inside it) for a URL; a clear error when its extra is missing.

    Credentials, region and endpoint come from the usual places of each library (for S3:
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL, ~/.aws/config, instance roles).
    Listings are not cached: a walk of ten million keys must not stay in memory.
    """
    scheme = url.partition("://")[0].lower()
    try:
        import fsspec

        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except ImportError:
        extra = SCHEMES.get(scheme, "s3")
        raise InvalidArgumentError(
            f'reading {scheme}:// needs the {extra} extra: pip install "lookalike[{extra}]"'
        ) from None


def read_bytes(location: Path | str) -> bytes:
    """A photo's bytes, local or in a bucket, with a clear error when it cannot be read."""
    if not is_url(location):
        path = Path(location)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageDecodeError(f"no such file: {path}") from None
        except OSError as exc:
            raise ImageDecodeError(f"cannot read {path}: {exc.strerror or exc}") from None
    fs, key = filesystem(str(location))
    try:
        return fs.cat_file(key)
    except FileNotFoundError:
        raise ImageDecodeError(f"no such object: {location}") from None
    except (OSError, PermissionError) as exc:
        raise ImageDecodeError(f"cannot read {location}: {exc}") from None


def openable(location: Path | str) -> Path | io.BytesIO:
    """What Image.open takes for a photo: a local path (read lazily), or a bucket object's
    bytes in memory (ImageDecodeError when it cannot be read)."""
    if not is_url(location):
        return Path(location)
    return io.BytesIO(read_bytes(location))


def exists(location: Path | str) -> bool:
    """Whether a photo is there (a file, or an object)."""
    if not is_url(location):
        return Path(location).is_file()
    fs, key = filesystem(str(location))
    try:
        return fs.isfile(key)
    except (OSError, PermissionError):
        return False


def _walk_order(dirs: list[str], files: list[str]) -> tuple[list[str], list[str]]:
    """A folder's visible sub-folders and files, each by name (hidden ones left out)."""
    return sorted(d for d in dirs if not d.startswith(".")), sorted(
        f for f in files if not f.startswith(".")
    )


class LocalPhotos:
    """Photos in a local folder (or on a mounted file system)."""

    # seconds before a run's start in which an mtime is too close to the run to prove a later
    # rewrite would change it (FAT keeps 2 s, HFS+ and many NFS servers 1 s)
    racy_seconds = 3.0

    def __init__(self, root: Path):
        self.root = root

    def check(self) -> None:
        """Refuse a root that is not there, before anything is changed."""
        if not self.root.is_dir():
            raise InvalidArgumentError(f"photos folder not found: {self.root}")

    def files(self, suffixes: frozenset[str]) -> Iterator[Path]:
        """Image files under the root in collection order: each folder's files by name, then
        its sub-folders by name; hidden files and folders skipped."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:], names = _walk_order(dirnames, filenames)
            for name in names:
                if Path(name).suffix.lower() in suffixes:
                    yield Path(dirpath) / name

    def entries(self, suffixes: frozenset[str]) -> Iterator[tuple[Path, tuple[None, None]]]:
        """files() as (location, (size, mtime)) pairs; a walk does not stat: (None, None)."""
        for path in self.files(suffixes):
            yield path, (None, None)

    def stat(self, location: Path | str) -> tuple[int, float]:
        """(size in bytes, mtime) of a file; OSError when it is gone."""
        st = os.stat(location)
        return st.st_size, st.st_mtime

    def fresh(self, location: Path | str, listed: tuple[int, float]) -> tuple[int, float]:
        """(size, mtime) of a file now: a file is asked again (it may have changed since)."""
        return self.stat(location)

    def locate(self, rel: str) -> Path:
        return self.root / rel


class BucketPhotos:
    """Photos under a prefix of a bucket (S3, GCS or any S3-compatible server)."""

    # LastModified has whole seconds, from the server's clock: a minute covers both
    racy_seconds = 60.0

    def __init__(self, url: str):
        self.root = url
        self.fs, self.path = filesystem(url)
        self.scheme = url.partition("://")[0]

    def check(self) -> None:
        """Refuse a bucket or prefix that does not exist (a typo), before anything is changed."""
        try:
            found = self.fs.exists(self.path) and not self.fs.isfile(self.path)
        except PermissionError as exc:
            raise InvalidArgumentError(f"cannot list {self.root}: {exc}") from None
        except OSError as exc:
            raise InvalidArgumentError(f"cannot list {self.root}: {exc}") from None
        if not found:
            raise InvalidArgumentError(f"no such bucket or prefix: {self.root}")

    def files(self, suffixes: frozenset[str]) -> Iterator[str]:
        """Image objects under the prefix, in the order a local copy would be walked in."""
        for location, _ in self.entries(suffixes):
            yield location

    def entries(self, suffixes: frozenset[str]) -> Iterator[tuple[str, tuple[int, float]]]:
        """files() as (location, (size, LastModified)) pairs, the facts from the listing: the
        run keeps them with its listing (on disk), so no object is asked again."""
        for dirpath, dirs, files in self.fs.walk(self.path, detail=True, on_error="raise"):
            visible, names = _walk_order(list(dirs), list(files))
            keep = {d: dirs[d] for d in visible}
            dirs.clear()  # walk() descends into what is left here, in this order
            dirs.update(keep)
            for name in names:
                if Path(name).suffix.lower() in suffixes:
                    yield f"{self.scheme}://{dirpath}/{name}", _facts(files[name])

    def stat(self, location: Path | str) -> tuple[int, float]:
        """(size, LastModified) of an object, asked of the server (a run takes them from its
        listing instead: see fresh)."""
        if not is_url(location):
            st = os.stat(location)  # an upload kept in the store
            return st.st_size, st.st_mtime
        try:
            return _facts(self.fs.info(str(location).partition("://")[2]))
        except FileNotFoundError:
            raise OSError(f"no such object: {location}") from None

    def fresh(self, location: Path | str, listed: tuple[int, float]) -> tuple[int, float]:
        """(size, LastModified) of an object as the listing gave it (a request per object would
        only repeat it); an upload kept in the store is a file, asked again."""
        return listed if is_url(location) else self.stat(location)

    def locate(self, rel: str) -> str:
        return f"{self.root}/{rel}"


def _facts(info: dict) -> tuple[int, float]:
    """(size, modification time in seconds) from an fsspec listing entry of any back-end."""
    when = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if isinstance(when, str):
        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    seconds = when.timestamp() if isinstance(when, datetime) else float(when or 0.0)
    return int(info.get("size") or 0), seconds


def open_photos(root: Path | str) -> LocalPhotos | BucketPhotos:
    """The photos under a root: a folder path or an s3:// / gs:// URL (normalised first)."""
    root = normalise(root)
    return BucketPhotos(root) if isinstance(root, str) else LocalPhotos(root)
