"""A collection's store on disk: model + index + metadata, opened and saved as one.

Layout of STORE/:
    info.json          what the store is: format version, photos root, dim, metric, count,
                       index type, library versions (written atomically)
    model/             config.json, encoder.keras, decoder.keras, whitening.npz, training.json,
                       reconstructions.png, embed.onnx (the portable embedding every query and
                       index runs) and export.json (its check against the Keras embedding) --
                       replaced as a whole by a rename on (re)training
    images.sqlite      one row per image (see lookalike.index.meta), the source of truth
    index.faiss        the FAISS index, rebuilt from images.sqlite whenever it is stale
    uploads/           images added over HTTP
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .config import ModelConfig
from .errors import LookalikeError, StoreNotFoundError, StoreNotTrainedError, StoreVersionError
from .index.knn import KnnIndex, ivf_params, resolve_index_type, tune_nprobe
from .index.meta import MetaDB

if TYPE_CHECKING:
    from .encoder.runtime import PortableEmbedder
    from .encoder.train import TrainResult

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
UPLOAD_PREFIX = "@uploads/"  # table paths of images added over HTTP, kept in STORE/uploads
METRIC = "cosine"  # inner product of L2-normalised float32 vectors


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file, fsync it, and rename it over path."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


def copy_model(trained: Path | str, dst: Path | str) -> Path:
    """A new, empty store at dst with the trained store's model (encoder, whitening, config):
    indexing into it embeds exactly as the trained store does, without training again."""
    trained, dst = Path(trained), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise StoreNotFoundError(f"{dst} exists and is not empty")
    with Store.open(trained) as src:
        src.model_config()  # raises the not-trained error
        keep = ("format_version", "created", "model_serial", "embedding_dim", "image_size")
        info = {k: src.info[k] for k in keep if k in src.info}
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(trained / "model", dst / "model")
    write_json_atomic(dst / "info.json", info)
    return dst


class Store:
    """An open store. Writes go through :meth:`write`, serialised by a lock."""

    def __init__(self, root: Path, info: dict[str, Any]):
        self.root = root
        self.info = info
        self.db = MetaDB(root / "images.sqlite")
        self.lock = threading.RLock()
        self._index: KnnIndex | None = None
        self._index_generation = -1  # table generation the in-memory index reflects
        self._write_depth = 0  # nesting of writing() in the thread holding self.lock
        self._recover_model_dir()

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path | str, *, create: bool = False, photos: Path | None = None) -> Store:
        """Open the store at root; with create, make an empty one if there is none."""
        root = Path(root).expanduser().resolve()
        info_path = root / "info.json"
        if info_path.exists():
            try:
                info = json.loads(info_path.read_text())
            except (OSError, ValueError) as exc:
                raise StoreVersionError(
                    f"{info_path} is not a lookalike store info file: {exc}"
                ) from None
            version = info.get("format_version")
            if version != FORMAT_VERSION:
                raise StoreVersionError(
                    f"store {root} has format version {version}; this lookalike "
                    f"({__version__}) reads version {FORMAT_VERSION}. Re-create it with "
                    "`lookalike index PHOTOS --store NEW_STORE`."
                )
        elif create:
            if root.exists() and any(root.iterdir()):
                raise StoreNotFoundError(
                    f"{root} exists, is not empty and is not a lookalike store"
                )
            root.mkdir(parents=True, exist_ok=True)
            info = {"format_version": FORMAT_VERSION, "created": time.time(), "count": 0}
            write_json_atomic(info_path, info)
        else:
            hint = "" if root.exists() else " (no such folder)"
            raise StoreNotFoundError(
                f"no lookalike store at {root}{hint}; create one with "
                "`lookalike index PHOTOS --store STORE`"
            )
        store = cls(root, info)
        if photos is not None:
            store.info["photos_root"] = str(Path(photos).resolve())
        return store

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- paths --------------------------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def index_path(self) -> Path:
        return self.root / "index.faiss"

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    @property
    def photos_root(self) -> Path | None:
        root = self.info.get("photos_root")
        return Path(root) if root else None

    def file_path(self, rel_path: str) -> Path:
        """Where an indexed image lives: uploads are under the store, others under PHOTOS."""
        if rel_path.startswith(UPLOAD_PREFIX):
            return self.uploads_dir / rel_path[len(UPLOAD_PREFIX) :]
        if self.photos_root is None:
            raise StoreNotFoundError(f"store {self.root} does not record its photos folder")
        return self.photos_root / rel_path

    # -- model --------------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return (self.model_dir / "config.json").exists()

    def model_config(self) -> ModelConfig:
        if not self.is_trained:
            raise StoreNotTrainedError(
                f"store {self.root} has no trained model; run `lookalike index PHOTOS --store "
                f"{self.root}`"
            )
        return ModelConfig.from_dict(json.loads((self.model_dir / "config.json").read_text()))

    @property
    def model_serial(self) -> int:
        """Increases with every (re)training; rows embedded by an older model are re-embedded."""
        return int(self.info.get("model_serial", 0))

    def training_record(self) -> dict[str, Any]:
        path = self.model_dir / "training.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def load_embedder(self) -> PortableEmbedder:
        """The query-path embedder: model/embed.onnx on onnxruntime, without TensorFlow.

        A store trained before the portable model gets it exported once first (see
        :meth:`ensure_portable_model`).
        """
        from .encoder.runtime import PORTABLE_FILE, PortableEmbedder

        cfg = self.model_config()
        self.ensure_portable_model()
        return PortableEmbedder(self.model_dir / PORTABLE_FILE, cfg)

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
        """Write the trained model as a whole: a temporary folder renamed into place.

        It holds the portable embedding (model/embed.onnx) and the record of its check.
        """
        from PIL import Image

        from .encoder.export import CHECK_FILE, export_checked, synthetic_pixels
        from .encoder.runtime import PORTABLE_FILE

        portable, check = result.portable, result.export_check
        if portable is None:  # a result made without train_autoencoder's export
            pixels = synthetic_pixels(cfg.image_size)
            portable, check = export_checked(result.embedder(cfg), pixels, cfg.seed)
        tmp = self.root / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        result.encoder.save(tmp / "encoder.keras")
        result.decoder.save(tmp / "decoder.keras")
        result.whitening.save(tmp / "whitening.npz")
        (tmp / PORTABLE_FILE).write_bytes(portable)
        write_json_atomic(tmp / CHECK_FILE, check)
        write_json_atomic(tmp / "training.json", result.history)
        if result.preview is not None:
            Image.fromarray(result.preview).save(tmp / "reconstructions.png")
        write_json_atomic(tmp / "config.json", cfg.to_dict())  # last: marks the folder complete
        old = self.root / "model.old"
        if self.model_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.model_dir, old)
        os.replace(tmp, self.model_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.info["model_serial"] = self.model_serial + 1
        self.info["embedding_dim"] = int(result.whitening.projection.shape[1])
        self.info["image_size"] = cfg.image_size
        self.save_info()

    def _recover_model_dir(self) -> None:
        """Finish a model swap that a crash interrupted."""
        old = self.root / "model.old"
        if not self.model_dir.exists() and old.exists():
            os.replace(old, self.model_dir)
        shutil.rmtree(self.root / "model.tmp", ignore_errors=True)

    # -- index --------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        if "embedding_dim" not in self.info:
            self.model_config()  # raises the not-trained error
        return int(self.info["embedding_dim"])

    @property
    def index(self) -> KnnIndex:
        """The FAISS index, loaded once; rebuilt from the table when it is missing or stale."""
        with self.lock:
            if self._index is None:
                fresh = self.info.get("index_generation") == self.db.generation
                if fresh and self.index_path.exists():
                    self._index = KnnIndex.load(self.index_path, self.info["index_type"])
                    self._index_generation = self.info["index_generation"]
                else:
                    self.rebuild_index(self.info.get("index_type_requested", "auto"))
            return self._index

    def rebuild_index(self, index_type: str = "auto") -> KnnIndex:
        """Build the index from the embeddings in the table, chunk by chunk, and save it."""
        with self.lock:
            count = len(self.db)
            kind = resolve_index_type(index_type, count)
            train = None
            if kind == "ivf":  # train on an evenly spread sample of at most 100k vectors
                step = max(1, count // 100_000)
                train = np.concatenate(
                    [v[::step] for _, v in self.db.embeddings(self.dim)]
                    or [np.zeros((0, self.dim), np.float32)]
                )
                if len(train) < 2 * ivf_params(len(train))[0]:
                    kind, train = "flat", None
            knn = KnnIndex.empty(self.dim, kind, train)
            for ids, vecs in self.db.embeddings(self.dim):
                knn.add(vecs, ids)
            self.info.pop("ivf", None)
            if kind == "ivf":  # probe as few lists as keep recall@10 at the target
                self.info["ivf"] = tune_nprobe(knn, lambda: self.db.embeddings(self.dim), count)
            self._index = knn
            self.info["index_type_requested"] = index_type
            self.save_index()
            return knn

    def set_index(self, knn: KnnIndex, index_type: str = "auto") -> None:
        """Serve and save an index built elsewhere (lookalike.scale) from this table's rows."""
        with self.lock:
            self._index = knn
            self.info["index_type_requested"] = index_type
            self.save_index()

    def save_index(self) -> None:
        """Persist the index and the info file that vouches for it."""
        with self.lock:
            assert self._index is not None
            self._index.save(self.index_path)
            self.info["index_generation"] = self._index_generation = self.db.generation
            self.info["index_type"] = self._index.index_type
            self.save_info()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Serialise writers across threads and processes (the workers of one service, or a
        `lookalike index` run beside it); the index is brought up to date first."""
        with self.lock:
            if self._write_depth:  # re-entered by the thread that holds it
                self._write_depth += 1
                try:
                    yield
                finally:
                    self._write_depth -= 1
                return
            fd = os.open(self.root / ".write.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._write_depth = 1
                self.refresh()
                if self._index is not None and self._index_generation != self.db.generation:
                    self.rebuild_index(self.info.get("index_type_requested", "auto"))
                yield
            finally:
                self._write_depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def refresh(self) -> None:
        """Reload the index when another process has changed the store since it was loaded.

        Cheap when nothing changed (one SQLite read). While another writer is mid-way, the last
        consistent index keeps being served.
        """
        with self.lock:
            if self._index is None:
                return
            generation = self.db.generation
            if generation == self._index_generation:
                return
            try:
                info = json.loads((self.root / "info.json").read_text())
            except (OSError, ValueError):
                return
            if info.get("index_generation") == generation and self.index_path.exists():
                self.info = info
                self._index = KnnIndex.load(self.index_path, info["index_type"])
                self._index_generation = generation

    def remove_images(self, ids: list[int]) -> int:
        """Drop images from the table and the index, and persist both; returns rows removed."""
        with self.writing():
            known = self.db.get_many(ids)
            if not known:
                return 0
            index = self.index
            self.db.write(deletes=list(known))
            index.remove(np.array(list(known), dtype=np.int64))
            self.save_index()
            return len(known)

    def save_info(self) -> None:
        with self.lock:
            self.info.update(
                format_version=FORMAT_VERSION,
                count=len(self.db),
                metric=METRIC,
                updated=time.time(),
                versions=library_versions(),
            )
            write_json_atomic(self.root / "info.json", self.info)

    def disk_bytes(self) -> int:
        """Total size of the store's files."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
