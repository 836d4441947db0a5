"""A collection's store on disk: model + index + metadata, opened and saved as one.

Layout of STORE/:
    images.sqlite      the source of truth: one row per image (lookalike.index.meta), and the
                       store's state (model serial, photos root, thresholds, index settings) in
                       its meta table, every change a transaction that advances a generation
    info.json          a snapshot of that state for people to read (format version, counts, dim,
                       versions); written after each change, never read back as the truth
    model-<serial>/    config.json, encoder.keras, decoder.keras, whitening.npz, training.json,
                       pictures, embed.onnx (the portable embedding every query and index runs)
                       and export.json (its check against the Keras embedding) -- one folder per
                       (re)training, made complete under a temporary name and switched to by one
                       transaction (older stores: model/); an older model's folder stays
                       until an index of every photo by the new one is saved
    index-<gen>.faiss  the FAISS index of generation <gen>, of every row (never a partial one):
                       the model it belongs to is the one current at <gen> (state model_since)
    uploads/           images added over HTTP
    .write.lock        the cross-process writer lock

Concurrency: writers (indexing, uploads, label and dedupe changes, clean-up) take the writer
lock; readers never take it and never wait for it: they serve the last consistent index, with
its own model, until the file of the current generation exists. While a retrain re-embeds the
rows (state ``reembedding``), that is the previous model's complete index, and what needs every
row embedded by one model (dedupe, uploads, undo) is refused with StoreIncompleteError.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock
import numpy as np

from .config import ModelConfig
from .errors import (
    LookalikeError,
    StoreBusyError,
    StoreIncompleteError,
    StoreNotFoundError,
    StoreNotTrainedError,
    StoreVersionError,
    StoreWriteError,
)
from .index.knn import KnnIndex, ivf_params, resolve_index_type, tune_nprobe
from .index.meta import MetaDB
from .photos import is_url, locate, normalise, relative
from .version import __version__

if TYPE_CHECKING:
    from .encoder.runtime import PortableEmbedder
    from .encoder.train import TrainResult

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
UPLOAD_PREFIX = "@uploads/"  # table paths of images added over HTTP, kept in STORE/uploads
TRASH = "trash"  # STORE/trash/<run>/<path>: deleted photos, until the trash is emptied
METRIC = "cosine"  # inner product of L2-normalised float32 vectors
SNAPSHOT_KEYS = ("format_version", "count", "metric", "updated", "versions")  # not state
INDEX_FILE = re.compile(r"^index-(\d+)\.faiss$")
MODEL_DIR = re.compile(r"^model-(\d+)$")
THUMBNAILS = "thumbnails"  # STORE/thumbnails: {id}-{sha256[:12]}-{size}.jpg
LEFTOVERS = ("model.tmp*", "train-*", ".tmp-*", "*.tmp")  # a dead writer's temporary files


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a uniquely named temporary file beside path, fsync it, rename it over."""
    with _atomic_file(path) as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True).encode())


@contextmanager
def _atomic_file(path: Path) -> Iterator[Any]:
    """A binary file handle whose content replaces path when the block ends without error;
    the temporary name is unique, so concurrent writers never write into one file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StoreWriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def library_versions() -> dict[str, str]:
    """Versions of the libraries a store depends on, read without importing them."""
    out = {"python": platform.python_version(), "lookalike": __version__}
    for name, dists in {
        "tensorflow": ("tensorflow-cpu", "tensorflow"),
        "keras": ("keras",),
        "faiss": ("faiss-cpu", "faiss"),
        "numpy": ("numpy",),
        "pillow": ("pillow",),
    }.items():
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def is_trained_store(path: Path | str) -> bool:
    """Whether path holds a store with a trained model (without creating anything)."""
    path = Path(path).expanduser()
    if not (path / "info.json").is_file():
        return False
    with Store.open(path) as store:
        return store.is_trained


def remove_thumbnails(store_root: Path | str, image_ids: Iterable[int]) -> int:
    """Remove every cached thumbnail (and leftover temporary file) of these ids; how many.

    Call it after the rows are removed (committed): a thumbnail being made for one of them at
    that moment sees the row gone and removes its own file.
    """
    folder = Path(store_root) / THUMBNAILS
    if not folder.is_dir():
        return 0
    removed = 0
    for image_id in image_ids:
        for path in folder.glob(f"{int(image_id)}-*"):
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:  # the row is gone already: a stale file is no reason to fail
                log.warning("cannot remove thumbnail %s: %s", path, exc)
    return removed


def copy_model(trained: Path | str, dst: Path | str) -> Path:
    """A new, empty store at dst with the trained store's model (encoder, whitening, config):
    indexing into it embeds exactly as the trained store does, without training again."""
    trained, dst = Path(trained), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise StoreNotFoundError(f"{dst} exists and is not empty")
    with Store.open(trained) as src:
        src.model_config()  # raises the not-trained error
        keep = ("created", "model_serial", "embedding_dim", "image_size")
        state = {k: src.info[k] for k in keep if k in src.info}
        model_dir = src.model_dir
    with Store.open(dst, create=True) as new:
        with new.writing():
            shutil.copytree(model_dir, new.root / f"model-{state.get('model_serial', 0)}")
            new.update_state(state, bump=True)
    return dst


class _State(dict):
    """The store's state as a dict that remembers which keys the caller changed, so saving
    writes those keys only and never puts back another process's older values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dirty: set[str] = set()
        self.removed: set[str] = set()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.dirty.add(key)
        self.removed.discard(key)

    def __delitem__(self, key):
        super().__delitem__(key)
        self.removed.add(key)
        self.dirty.discard(key)

    def pop(self, key, *default):
        if key in self:
            self.removed.add(key)
            self.dirty.discard(key)
        return super().pop(key, *default)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


class Store:
    """An open store. Writes go through :meth:`writing` (the cross-process writer lock)."""

    def __init__(self, root: Path, legacy_info: dict[str, Any]):
        self.root = root
        self.db = MetaDB(root / "images.sqlite")
        self.lock = threading.RLock()  # in-process: guards the in-memory index and state
        self._flock = filelock.FileLock(root / ".write.lock", thread_local=True)
        self._local = threading.local()  # writing() depth of the calling thread
        self.write_timeout: float | None = None  # default wait for the writer lock (None: ever)
        self._index: KnnIndex | None = None
        self._index_generation = -1  # table generation the in-memory index reflects
        self._index_serial = -1  # model serial of the vectors in the in-memory index
        self._generation, state = self.db.snapshot()
        if not state and legacy_info:  # a store written before the state moved into SQLite
            state = {k: v for k, v in legacy_info.items() if k not in SNAPSHOT_KEYS}
            self._migrate(state)
        self.info = _State(state)

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, root: Path | str, *, create: bool = False, photos: Path | str | None = None
    ) -> Store:
        """Open the store at root; with create, make an empty one if there is none; with
        photos, record that folder as the photos root (`lookalike index` checks first)."""
        root = Path(root).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise StoreNotFoundError(f"{root} is a file, not a lookalike store folder")
        info_path = root / "info.json"
        if info_path.exists():
            info = _read_info(info_path, root)
        elif create:
            if root.exists() and any(root.iterdir()):
                raise StoreNotFoundError(
                    f"{root} exists, is not empty and is not a lookalike store"
                )
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreWriteError(f"cannot create store {root}: {exc.strerror}") from None
            info = {}
        else:
            hint = "" if root.exists() else " (no such folder)"
            raise StoreNotFoundError(
                f"no lookalike store at {root}{hint}; create one with "
                "`lookalike index PHOTOS --store STORE`"
            )
        store = cls(root, info)
        if not info_path.exists():
            store.update_state({"created": time.time()})
        if photos is not None:
            store.update_state({"photos_root": str(normalise(photos))})
        return store

    def _migrate(self, state: dict[str, Any]) -> None:
        """Move an older store's info.json state into SQLite, once, if the lock is free."""
        if self.db.readonly:
            return
        try:
            self._flock.acquire(timeout=0)
        except filelock.Timeout:
            return  # a writer is busy: read the old file this time, migrate next time
        try:
            _, current = self.db.snapshot()
            if not current:
                state.pop("index_generation", None)  # the legacy index file is not trusted
                self.db.set_state(state)
        finally:
            self._flock.release()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- paths --------------------------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        return self.model_path()

    def model_path(self, serial: int | None = None) -> Path:
        """The folder of model ``serial`` (default: the current model)."""
        current = self.model_serial
        serial_dir = self.root / f"model-{current if serial is None else serial}"
        if serial_dir.is_dir() or serial not in (None, current):
            return serial_dir
        return self.root / "model"  # a store from before model-<serial> folders

    @property
    def index_path(self) -> Path:
        """The index file of the in-memory index's generation (before one is loaded: of the
        table's current generation)."""
        generation = self._index_generation if self._index is not None else self.db.generation
        return self.root / f"index-{generation}.faiss"

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    def new_trash_dir(self) -> Path:
        """A new folder in the store's trash for one delete run (made when first used)."""
        stamp = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{time.time_ns() % 10**9:09d}"
        return self.root / TRASH / stamp

    @property
    def photos_root(self) -> Path | str | None:
        """The folder the photos are in, or their bucket's URL (s3://..., gs://...)."""
        root = self.info.get("photos_root")
        if not root:
            return None
        return root if is_url(root) else Path(root)

    def table_path(self, path: Path | str, photos: Path | str) -> str:
        """The table's path of a file: relative to PHOTOS (a folder or a bucket's URL), or
        UPLOAD_PREFIX + name for uploads."""
        if isinstance(path, Path) and path.parent == self.uploads_dir:
            return UPLOAD_PREFIX + path.name
        return relative(photos, path)

    def file_path(self, rel_path: str) -> Path | str:
        """Where an indexed image lives: uploads are under the store, others under PHOTOS (a
        URL string when the photos are in a bucket: read it with images.read_file)."""
        if rel_path.startswith(UPLOAD_PREFIX):
            return self.uploads_dir / rel_path[len(UPLOAD_PREFIX) :]
        if self.photos_root is None:
            raise StoreNotFoundError(f"store {self.root} does not record its photos folder")
        return locate(self.photos_root, rel_path)

    # -- state --------------------------------------------------------------------------------
    def update_state(
        self, updates: dict[str, Any], deletes: tuple[str, ...] = (), bump: bool = False
    ) -> None:
        """Change state keys in one transaction, then reload the whole state and write the
        info.json snapshot."""
        self.db.set_state(updates, deletes, bump=bump)
        with self.lock:
            self.info.dirty -= set(updates)
            self.info.removed -= set(deletes)
        self._reload_state()
        self._write_snapshot()

    def save_info(self) -> None:
        """Persist the keys of ``info`` this process changed (others' changes are kept)."""
        with self.lock:
            updates = {k: self.info[k] for k in self.info.dirty if k in self.info}
            deletes = tuple(self.info.removed)
        self.update_state(updates, deletes)

    def _reload_state(self) -> None:
        generation, state = self.db.snapshot()
        with self.lock:
            pending = {k: self.info[k] for k in self.info.dirty if k in self.info}
            removed = set(self.info.removed)
            fresh = _State({k: v for k, v in state.items() if k not in removed})
            fresh.update(pending)  # keys changed here and not saved yet stay changed
            fresh.removed = removed
            self.info = fresh
            self._generation = generation

    def snapshot(self) -> dict[str, Any]:
        """The info.json snapshot (counts, versions of the last writer) as last written."""
        try:
            return json.loads((self.root / "info.json").read_text())
        except (OSError, ValueError):
            return {}

    def _write_snapshot(self) -> None:
        if self.db.readonly:
            return
        snapshot = {k: v for k, v in self.info.items() if k not in SNAPSHOT_KEYS}
        snapshot.update(
            format_version=FORMAT_VERSION,
            count=len(self.db),
            metric=METRIC,
            updated=time.time(),
            versions=library_versions(),
        )
        write_json_atomic(self.root / "info.json", snapshot)

    # -- model --------------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return (self.model_dir / "config.json").exists()

    def model_config(self, serial: int | None = None) -> ModelConfig:
        """The config of model ``serial`` (default: the current one); FileNotFoundError when an
        older model's folder was removed meanwhile."""
        if serial is None and not self.is_trained:
            raise StoreNotTrainedError(
                f"store {self.root} has no trained model; run `lookalike index PHOTOS --store "
                f"{self.root}`"
            )
        config = self.model_path(serial) / "config.json"
        return ModelConfig.from_dict(json.loads(config.read_text()))

    @property
    def model_serial(self) -> int:
        """Increases with every (re)training; rows embedded by an older model are re-embedded."""
        return int(self.info.get("model_serial", 0))

    def training_record(self) -> dict[str, Any]:
        path = self.model_dir / "training.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def load_embedder(self, serial: int | None = None) -> PortableEmbedder:
        """The query-path embedder of model ``serial`` (default: the current model): its
        embed.onnx on onnxruntime, without TensorFlow.

        A store trained before the portable model gets it exported once first (see
        :meth:`ensure_portable_model`).
        """
        from .encoder.runtime import PORTABLE_FILE, PortableEmbedder

        cfg = self.model_config(serial)
        if serial in (None, self.model_serial):
            self.ensure_portable_model()
        return PortableEmbedder(self.model_path(serial) / PORTABLE_FILE, cfg)

    def ensure_portable_model(self) -> bool:
        """Export an older store's Keras model to model/embed.onnx, once; True if it did.

        Imports TensorFlow this one time (a one-line message says so), checks the export on up
        to 256 of the store's photos, and raises a one-line error if TensorFlow is not installed.
        """
        from .encoder.runtime import PORTABLE_FILE

        cfg = self.model_config()
        if (self.model_dir / PORTABLE_FILE).exists():
            return False
        log.warning(
            "store %s has no portable model yet: exporting model/%s once (loads TensorFlow)",
            self.root,
            PORTABLE_FILE,
        )
        from .encoder.export import export_store_model

        export_store_model(self.model_dir, cfg, self._check_pixels(cfg.image_size))
        return True

    def _check_pixels(self, size: int, limit: int = 256) -> np.ndarray:
        """Up to limit of the store's readable photos, evenly spread; synthetic ones if none."""
        from .images import decode_file

        records = list(self.db.records())
        step = max(1, len(records) // limit)
        pixels = []
        for record in records[::step][:limit]:
            try:
                pixels.append(decode_file(self.file_path(record.path), size).pixels)
            except (LookalikeError, OSError):
                continue
        if len(pixels) >= 16:
            return np.stack(pixels)
        from .encoder.export import synthetic_pixels

        return synthetic_pixels(size)

    def save_model(self, result: TrainResult, cfg: ModelConfig) -> None:
        """Write the trained model to a new folder and switch to it in one transaction (which
        also advances the generation: every row of the old model is stale from then on). The
        folder holds the portable embedding (embed.onnx) and the record of its check."""
        from .encoder.export import CHECK_FILE, export_checked, synthetic_pixels
        from .encoder.pictures import write_pictures
        from .encoder.runtime import PORTABLE_FILE

        portable, check = result.portable, result.export_check
        if portable is None:  # a result made without train_autoencoder's export
            pixels = synthetic_pixels(cfg.image_size)
            portable, check = export_checked(result.embedder(cfg), pixels, cfg.seed)
        with self.writing():
            serial = self.model_serial + 1
            tmp = Path(tempfile.mkdtemp(dir=self.root, prefix="model.tmp-"))
            try:
                result.encoder.save(tmp / "encoder.keras")
                result.decoder.save(tmp / "decoder.keras")
                result.whitening.save(tmp / "whitening.npz")
                (tmp / PORTABLE_FILE).write_bytes(portable)
                write_json_atomic(tmp / CHECK_FILE, check)
                write_json_atomic(tmp / "training.json", result.history)
                write_pictures(tmp, result.history, result.preview)  # loss curve, reconstructions
                write_json_atomic(tmp / "config.json", cfg.to_dict())
                target = self.root / f"model-{serial}"
                shutil.rmtree(target, ignore_errors=True)  # a dead writer's, never switched to
                os.replace(tmp, target)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StoreWriteError(f"cannot save the model in {self.root}: {exc}") from None
            state = {
                "model_serial": serial,
                "embedding_dim": int(result.whitening.projection.shape[1]),
                "image_size": cfg.image_size,
                "model_since": self._model_since(serial, self.db.generation + 1),
            }
            if len(self.db):  # readers keep the old model and its index until all is re-embedded
                state["reembedding"] = serial
            self.update_state(state, bump=True)
            if not len(self.db):
                self._remove_old_models()

    def _model_since(self, serial: int, generation: int) -> dict[str, int]:
        """State model_since with model ``serial`` current from ``generation`` on (entries of
        models whose folder is gone are dropped)."""
        since = dict(self.info.get("model_since") or {})
        if not since and "reembedding" not in self.info:  # a store from before model_since:
            since[str(self.model_serial)] = 0  # its current model made its index files
        since = {s: g for s, g in since.items() if (self.root / f"model-{s}").is_dir()}
        return since | {str(serial): generation}

    def _serial_at(self, generation: int) -> int | None:
        """The model current at ``generation``, from state model_since (None: not recorded)."""
        since = self.info.get("model_since") or {}
        return max((int(s) for s, g in since.items() if g <= generation), default=None)

    def require_complete(self) -> None:
        """Raise StoreIncompleteError while a retrain's re-embedding is unfinished."""
        serial = self.info.get("reembedding")
        if serial is None:
            return
        done, total = self.db.count(int(serial)), len(self.db)
        where = self.photos_root or "PHOTOS"
        raise StoreIncompleteError(
            f"store {self.root} is re-embedding its photos with a new model ({done} of {total} "
            f"done): wait for the index run, or if it was interrupted, finish it with `lookalike "
            f"index {where} --store {self.root}`; nothing was changed"
        )

    def _remove_old_models(self) -> None:
        """Model folders other than the current one (caller holds the writer lock)."""
        current = self.model_dir
        for path in self.root.iterdir():
            old = path.name in ("model", "model.old") or MODEL_DIR.match(path.name)
            if old and path.is_dir() and path != current:
                shutil.rmtree(path, ignore_errors=True)

    # -- index --------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        if "embedding_dim" not in self.info:
            self.model_config()  # raises the not-trained error
        return int(self.info["embedding_dim"])

    def embeddings(self, chunk: int = 10_000):
        """(ids, vectors) chunks of the rows the current model embedded."""
        return self.db.embeddings(self.dim, chunk=chunk, model=self.model_serial)

    @property
    def index(self) -> KnnIndex:
        """The FAISS index, loaded once: the current generation's file; else, for a reader, the
        last complete index (a retrain half-way); else built from the table."""
        with self.lock:
            if self._index is None:
                self._reload_state()
                if not self._load_index_file(self._generation):
                    if self.writing_here or not self._load_last_complete():
                        self._build_in_memory()  # of every row, unless a retrain is half-way
            return self._index

    @property
    def index_model_serial(self) -> int:
        """The model serial whose vectors the in-memory index holds (-1: none loaded)."""
        return self._index_serial

    def _index_file(self, generation: int) -> Path | None:
        path = self.root / f"index-{generation}.faiss"
        if path.exists():
            return path
        legacy = self.root / "index.faiss"
        if legacy.exists() and self.info.get("index_generation") == generation:
            return legacy
        return None

    def _load_index_file(self, generation: int) -> bool:
        """Load the index file of this generation, if there is one (caller holds self.lock)."""
        path = self._index_file(generation)
        if path is None:
            return False
        try:
            knn = KnnIndex.load(path)
        except (OSError, RuntimeError):  # removed meanwhile by a writer that moved on
            return False
        self._set_index(knn, generation)
        return True

    def _load_last_complete(self, newer_than: int = -1) -> bool:
        """Load the newest index file of an older generation (newer than ``newer_than``),
        with its model, when that model's folder is still there and a retrain is half-way
        (else the table's rows are all of one model, and an index built from them is newer).
        Caller holds self.lock."""
        if self.info.get("reembedding") is None:
            return False
        names = (INDEX_FILE.match(p.name) for p in self.root.glob("index-*.faiss"))
        files = sorted((int(m.group(1)), m.string) for m in names if m)
        for generation, name in reversed(files):
            if not newer_than < generation < self._generation:
                continue
            serial = self._serial_at(generation)
            if serial is None or not (self.root / f"model-{serial}").is_dir():
                return False
            try:
                knn = KnnIndex.load(self.root / name)
            except (OSError, RuntimeError):  # removed meanwhile by a writer that moved on
                continue
            self._set_index(knn, generation, serial)
            return True
        return False

    def _set_index(self, knn: KnnIndex, generation: int, serial: int | None = None) -> None:
        self._index = knn
        self._index_generation = generation
        self._index_serial = self.model_serial if serial is None else serial

    def _build_in_memory(self) -> None:
        """Build the index of the current generation from the table; save it when the writer
        lock is free (or already ours), else serve it from memory only."""
        if self.writing_here:
            self.rebuild_index(self.info.get("index_type_requested", "auto"))
            return
        try:
            self._flock.acquire(timeout=0)
        except filelock.Timeout:
            generation = self._generation
            self._set_index(self._build(self.info.get("index_type_requested", "auto")), generation)
            return
        try:
            self._local.depth = 1
            self._reload_state()
            self.rebuild_index(self.info.get("index_type_requested", "auto"))
        finally:
            self._local.depth = 0
            self._flock.release()

    def _build(self, index_type: str) -> KnnIndex:
        """A new index of the current model's rows, read chunk by chunk."""
        count = self.db.count(self.model_serial)
        kind = resolve_index_type(index_type, count)
        train = None
        if kind == "ivf":  # train on an evenly spread sample of at most 100k vectors
            step = max(1, count // 100_000)
            train = np.concatenate(
                [v[::step] for _, v in self.embeddings()] or [np.zeros((0, self.dim), np.float32)]
            )
            if len(train) < 2 * ivf_params(len(train))[0]:
                kind, train = "flat", None
        knn = KnnIndex.empty(self.dim, kind, train)
        for ids, vecs in self.embeddings():
            knn.add(vecs, ids)
        return knn

    def rebuild_index(self, index_type: str = "auto") -> KnnIndex:
        """Build the index from the current model's embeddings and save it (writer lock)."""
        with self.writing(), self.lock:
            self._reload_state()
            knn = self._build(index_type)
            state: dict[str, Any] = {"index_type_requested": index_type}
            if knn.index_type == "ivf":  # probe as few lists as keep recall@10 at the target
                state["ivf"] = tune_nprobe(knn, self.embeddings, len(knn))
            self.update_state(state, deletes=() if "ivf" in state else ("ivf",))
            self._set_index(knn, self._generation)
            if self.db.count(self.model_serial) == len(self.db):
                self.save_index()
            # else a retrain is half-way: other processes keep serving their complete index of
            # the old model until the run that re-embeds the rest saves one
            return knn

    def set_index(self, knn: KnnIndex, index_type: str = "auto") -> None:
        """Serve and save an index built elsewhere (lookalike.scale) from this table's rows."""
        with self.writing(), self.lock:
            self._reload_state()
            self._set_index(knn, self._generation)
            self.update_state({"index_type_requested": index_type})
            self.save_index()

    def save_index(self) -> None:
        """Persist the in-memory index as the file of the table's current generation, once it
        holds every row (a retrain half-way saves none: readers keep the last complete one);
        then older models' folders go."""
        with self.writing(), self.lock:
            assert self._index is not None
            reembedding = self.info.get("reembedding")
            if reembedding is not None and self.db.count(self.model_serial) != len(self.db):
                return
            generation = self.db.generation
            self._save_index_file(generation)
            self._index_generation = generation
            self.update_state({"index_type": self._index.index_type}, deletes=("reembedding",))
            self._remove_old_models()

    def _save_index_file(self, generation: int, keep_others: bool = False) -> None:
        """Write index-<generation>.faiss and (unless keep_others) remove other generations'."""
        target = self.root / f"index-{generation}.faiss"
        with _atomic_file(target) as fh:
            fh.write(self._index.serialize())
        if not keep_others:
            self._remove_other_index_files(generation)

    def _remove_other_index_files(self, generation: int) -> None:
        for path in self.root.glob("index*.faiss"):
            if path.name != f"index-{generation}.faiss":
                path.unlink(missing_ok=True)

    def commit(self, write, change, undo) -> list[int]:
        """One all-or-nothing change of table and index (the caller holds the writer lock).

        ``write(before_commit)`` runs the table transaction and calls ``before_commit(ids)`` in
        it, before COMMIT: there ``change(index, ids)`` updates the in-memory index and the
        index file of the new generation is written. If anything fails (a full disk), the table
        rolls back, ``undo(index, ids)`` puts the index back and its new file is removed.
        """
        self.require_complete()  # never an index file of part of the rows
        with self.lock:
            index = self.index
            generation = self.db.generation + 1
            done: list[list[int]] = []

            def before_commit(ids: list[int]) -> None:
                change(index, ids)
                done.append(ids)
                self._save_index_file(generation, keep_others=True)

            try:
                ids = write(before_commit)
            except BaseException:
                if done:
                    undo(index, done[0])
                (self.root / f"index-{generation}.faiss").unlink(missing_ok=True)
                raise
            self._index_generation = self._generation = generation
            self._remove_other_index_files(generation)
            return ids

    # -- concurrency --------------------------------------------------------------------------
    @property
    def writing_here(self) -> bool:
        """Whether the calling thread holds the writer lock."""
        return getattr(self._local, "depth", 0) > 0

    @contextmanager
    def writing(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the cross-process writer lock (re-entrant in one thread). Waits for it without
        holding the in-process lock, so searches go on meanwhile; with a timeout (or the
        store's ``write_timeout``: the service sets one), a writer that cannot get it in time
        raises StoreBusyError. On entry, a dead writer's leftovers are
        removed and the index is brought to the table's current generation."""
        if self.writing_here:
            self._local.depth += 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        if self.db.readonly:
            raise StoreWriteError(f"store {self.root} is read-only; nothing was changed")
        timeout = self.write_timeout if timeout is None else timeout
        try:
            self._flock.acquire(timeout=-1 if timeout is None else timeout)
        except filelock.Timeout:
            raise StoreBusyError(
                f"store {self.root} is busy: another process (an index, dedupe or labels run) "
                "is writing to it; try again when it has finished"
            ) from None
        except OSError as exc:
            raise StoreWriteError(f"cannot lock store {self.root}: {exc.strerror}") from None
        try:
            self._local.depth = 1
            self._remove_leftovers()
            self._reload_state()
            with self.lock:
                if self._index is not None and self._index_generation != self._generation:
                    self._index = None  # stale: reload or rebuild it from the table now (a
                    if self.info.get("reembedding") is None:  # retrain half-way: when asked,
                        _ = self.index  # so that this process's readers keep the last complete)
            yield
        finally:
            self._local.depth = 0
            self._flock.release()

    def _remove_leftovers(self) -> None:
        """Temporary files and folders of writers that died (caller holds the writer lock)."""
        for pattern in LEFTOVERS:
            for path in self.root.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        generation = self.db.generation
        for path in self.root.glob("index-*.faiss"):  # written, then the commit failed
            match = INDEX_FILE.match(path.name)
            if match and int(match.group(1)) > generation:
                path.unlink(missing_ok=True)
        if not (self.root / "model").exists() and (self.root / "model.old").is_dir():
            os.replace(self.root / "model.old", self.root / "model")  # a legacy swap, cut off

    def refresh(self) -> bool:
        """Catch up with other processes' changes; True when the served index changed.

        Cheap when nothing changed (one SQLite read). While another writer is mid-way (the
        current generation has no index file yet), the last consistent index and its model
        keep being served.
        """
        if self._index is not None and self.db.generation == self._index_generation:
            return False  # the common case, read without the lock: searches do not queue here
        with self.lock:
            if self._index is None or self.db.generation == self._index_generation:
                return False
            self._reload_state()
            return self._load_index_file(self._generation) or self._load_last_complete(
                newer_than=self._index_generation
            )

    def add_rows(self, records: list, vectors: np.ndarray, serial: int) -> list[int]:
        """Insert rows embedded by model ``serial`` into the table and the index, all or nothing
        (the caller holds the writer lock); returns their ids."""
        return self.commit(
            lambda before: self.db.write(zip(records, vectors), model=serial, before_commit=before),
            lambda index, ids: index.add(vectors, np.array(ids, dtype=np.int64)),
            lambda index, ids: index.remove(np.array(ids, dtype=np.int64)),
        )

    def remove_images(self, ids: list[int]) -> int:
        """Drop images from the table and the index, all or nothing; returns rows removed."""
        with self.writing():
            known = list(self.db.get_many(ids))
            if not known:
                return 0
            ids = np.array(known, dtype=np.int64)
            vectors = self.index.reconstruct(ids)
            self.commit(
                lambda before: self.db.write(deletes=known, before_commit=before),
                lambda index, _: index.remove(ids),
                lambda index, _: index.add(vectors, ids),
            )
        remove_thumbnails(self.root, known)
        return len(known)

    def disk_bytes(self) -> int:
        """Total size of the store's files."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


def _read_info(path: Path, root: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreVersionError(f"{path} is not a lookalike store info file: {exc}") from None
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreVersionError(
            f"store {root} has format version {version}; this lookalike "
            f"({__version__}) reads version {FORMAT_VERSION}. Re-create it with "
            "`lookalike index PHOTOS --store NEW_STORE`."
        )
    return info
