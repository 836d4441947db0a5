"""`lookalike index`: train if needed, embed new and changed files, keep the index in step."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import IndexOptions, ModelConfig
from .errors import InvalidArgumentError
from .images import DecodedImage, FailedImage, find_images, iter_batches, phash64
from .index.knn import resolve_index_type
from .index.meta import ImageRecord
from .labels import FOLDERS, apply_labels, read_labels_csv
from .store import UPLOAD_PREFIX, Store

log = logging.getLogger(__name__)

# progress(stage, done, total); total 0 means unknown
ProgressFn = Callable[[str, int, int], None]


@dataclass
class IndexReport:
    """What one `lookalike index` run did; ``to_dict`` is its --json output."""

    images: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    reembedded: int = 0  # unchanged files embedded again because the model was retrained
    failed: list[FailedImage] = field(default_factory=list)
    trained: bool = False
    seconds: float = 0.0
    train_seconds: float = 0.0
    embed_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "reembedded": self.reembedded,
            "failed": [{"path": str(f.path), "error": f.error} for f in self.failed],
            "trained": self.trained,
            "seconds": round(self.seconds, 3),
            "train_seconds": round(self.train_seconds, 3),
            "embed_seconds": round(self.embed_seconds, 3),
        }


def _relative(path: Path, root: Path, store: Store) -> str:
    """The table's path of a file: relative to PHOTOS, or UPLOAD_PREFIX + name for uploads."""
    if path.parent == store.uploads_dir:
        return UPLOAD_PREFIX + path.name
    return path.relative_to(root).as_posix()


def index_folder(
    photos: Path | str,
    store_path: Path | str,
    *,
    model: ModelConfig | None = None,
    options: IndexOptions | None = None,
    progress: ProgressFn | None = None,
) -> IndexReport:
    """Bring the store at store_path in step with the photos folder.

    Trains the autoencoder when the store has none (or ``options.retrain``), embeds new and
    changed files (size+mtime, confirmed by sha256), drops deleted ones and updates the index.
    Every batch is committed to the table as it is done, so an interrupted run loses at most a
    batch and the next run continues from there.
    """
    started = time.perf_counter()
    options = options or IndexOptions()
    resolve_index_type(options.index_type, 0)  # refuse a bad type before any work
    labels_source = options.labels
    if labels_source is not None and labels_source != FOLDERS:
        labels_source = str(Path(labels_source).expanduser().resolve())
        read_labels_csv(Path(labels_source))  # a malformed CSV fails before any work
    photos = Path(photos).expanduser().resolve()
    if not photos.is_dir():
        raise InvalidArgumentError(f"photos folder not found: {photos}")
    progress = progress or (lambda stage, done, total: None)
    report = IndexReport()
    store = Store.open(store_path, create=True, photos=photos)
    try:
        with store.writing():
            _run(store, photos, model, options, progress, report)
            labels_source = labels_source or store.info.get("labels_source")
            if labels_source:
                if labels_source != FOLDERS and not Path(labels_source).exists():
                    log.warning("labels file %s is gone; labels left as they are", labels_source)
                else:  # a remembered folder source only labels new rows: edits stay
                    apply_labels(store.db, labels_source, keep_existing=options.labels is None)
                    store.info["labels_source"] = labels_source
                    store.save_info()
    finally:
        store.close()
    report.seconds = time.perf_counter() - started
    return report


def _run(store, photos, model, options, progress, report) -> None:
    progress("scan", 0, 0)
    files = [p for p in find_images(photos) if not p.resolve().is_relative_to(store.root)]
    uploads = list(find_images(store.uploads_dir)) if store.uploads_dir.is_dir() else []
    states = store.db.file_states()
    no_phash = store.db.without_phash()  # rows of an older version: decoded again once
    seen: set[str] = set()
    failed: dict[Path, FailedImage] = {}

    if not store.is_trained or options.retrain:
        cfg = model or (store.model_config() if store.is_trained else ModelConfig())
        report.train_seconds = _train(store, files, cfg, options, progress, failed)
        report.trained = True
    cfg = store.model_config()
    serial = store.model_serial

    # what changed since the last run
    todo: list[Path] = []
    kind: dict[str, str] = {}  # rel path -> added | updated | maybe | stale
    for path in files + uploads:
        rel = _relative(path, photos, store)
        seen.add(rel)
        state = states.get(rel)
        if state is None:
            kind[rel] = "added"
        else:
            st = path.stat()
            if st.st_size == state[1] and st.st_mtime == state[2]:
                if state[4] == serial and rel not in no_phash:
                    report.unchanged += 1
                    continue
                kind[rel] = "stale"
            else:
                kind[rel] = "maybe"  # size or mtime differ: the sha256 decides
        todo.append(path)
    removed_ids = [states[rel][0] for rel in states if rel not in seen]

    index = None
    requested = options.index_type
    if not report.trained and store.info.get("embedding_dim"):
        index = store.index  # loaded, or rebuilt if a previous run was interrupted
    if removed_ids:
        store.db.write(deletes=removed_ids)
        report.removed = len(removed_ids)
        if index is not None:
            index.remove(np.array(removed_ids))

    embedder = store.load_embedder() if todo else None
    progress("embed", 0, len(todo))
    embed_time = 0.0
    done = 0
    for ok, bad in iter_batches(
        todo,
        cfg.image_size,
        options.batch_size,
        workers=options.workers,
        max_pixels=options.max_pixels,
    ):
        for f in bad:
            failed.setdefault(f.path, f)
            state = states.get(_relative(f.path, photos, store))
            if state is not None:  # was indexed, now unreadable: it cannot be served any more
                store.db.write(deletes=[state[0]])
                if index is not None:
                    index.remove(np.array([state[0]]))
        upserts, touches = [], []
        for im in ok:
            rel = _relative(im.path, photos, store)
            state, k = states.get(rel), kind[rel]
            if k == "maybe" and state[3] == im.sha256:
                k = "unchanged" if state[4] == serial and rel not in no_phash else "stale"
                touches.append((state[0], os.stat(im.path).st_mtime, im.nbytes))
                if k == "unchanged":
                    report.unchanged += 1
                    continue
            elif k == "maybe":
                k = "updated"
            upserts.append((im, rel, k))
        if upserts:
            t0 = time.perf_counter()
            vectors = embedder(np.stack([im.pixels for im, _, _ in upserts]))
            embed_time += time.perf_counter() - t0
            records = [_record(im, rel) for im, rel, _ in upserts]
            ids = store.db.write(zip(records, vectors), touches=touches, model=serial)
            if index is not None:
                index.remove(np.array(ids))  # replaced rows keep their id
                index.add(vectors, np.array(ids))
            for _, _, k in upserts:
                if k == "added":
                    report.added += 1
                elif k == "updated":
                    report.updated += 1
                else:
                    report.reembedded += 1
                    report.unchanged += 1
        elif touches:
            store.db.write(touches=touches)
        done += len(ok) + len(bad)
        progress("embed", done, len(todo))
    report.embed_seconds = embed_time

    count = len(store.db)
    if index is None or index.index_type != resolve_index_type(requested, count):
        store.rebuild_index(requested)
    else:
        store.info["index_type_requested"] = requested
        store.save_index()
    report.images = count
    report.failed = sorted(failed.values(), key=lambda f: str(f.path))
    if report.trained:  # the cosine scale of duplicates is the model's: measure it again
        from .calibrate import calibrate_store

        progress("calibrate", 0, 1)
        calibrate_store(store, embedder)
        progress("calibrate", 1, 1)


def _record(im: DecodedImage, rel: str) -> ImageRecord:
    st = os.stat(im.path)
    return ImageRecord(
        0, rel, im.nbytes, st.st_mtime, im.sha256, im.width, im.height, phash=phash64(im.pixels)
    )


def _train(store: Store, files, cfg: ModelConfig, options, progress, failed) -> float:
    """Decode a seeded sample of at most cfg.max_train_images into a memmap and train on it."""
    from .encoder.train import train_autoencoder

    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    pick = files
    if len(files) > cfg.max_train_images:
        pick = [files[i] for i in np.sort(rng.choice(len(files), cfg.max_train_images, False))]
    if len(pick) < 2:
        raise InvalidArgumentError(f"need at least 2 images to train a model, found {len(pick)}")
    s = cfg.image_size
    with tempfile.TemporaryDirectory(dir=store.root, prefix="train-") as tmp:
        cache = np.lib.format.open_memmap(
            Path(tmp) / "sample.npy", mode="w+", dtype=np.uint8, shape=(len(pick), s, s, 3)
        )
        n = 0
        progress("decode", 0, len(pick))
        for ok, bad in iter_batches(
            pick, s, options.batch_size, workers=options.workers, max_pixels=options.max_pixels
        ):
            for f in bad:
                failed.setdefault(f.path, f)
            for im in ok:
                cache[n] = im.pixels
                n += 1
            progress("decode", n + len(failed), len(pick))
        if n < 2:
            raise InvalidArgumentError(f"need at least 2 readable images to train, found {n}")
        result = train_autoencoder(cache[:n], cfg, progress)
        store.save_model(result, cfg)
        del cache
    return time.perf_counter() - started
