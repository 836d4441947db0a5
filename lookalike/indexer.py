"""`lookalike index`: train if needed, embed new and changed files, keep the index in step."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import IndexOptions, ModelConfig, RayOptions
from .errors import InvalidArgumentError
from .images import IMAGE_SUFFIXES, DecodedImage, FailedImage, find_images, iter_batches, phash64
from .index.knn import resolve_index_type
from .index.listing import Listing
from .index.meta import ImageRecord, NewRows
from .labels import FOLDERS, apply_labels, read_labels_csv
from .photos import BucketPhotos, LocalPhotos, open_photos
from .store import UPLOAD_PREFIX, Store, remove_thumbnails

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
    index: dict | None = None  # how an approximate index was built and its measured recall
    resumed: int = 0  # Ray runs: files taken from the shards of an interrupted run
    ray: dict | None = None  # Ray runs: the cluster's CPUs and the embedding pool

    def to_dict(self) -> dict:
        out = {
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
        if self.index is not None:
            out["index"] = self.index
        if self.ray is not None:
            out["ray"] = self.ray
            out["resumed"] = self.resumed
        return out


def index_folder(
    photos: Path | str,
    store_path: Path | str,
    *,
    model: ModelConfig | None = None,
    options: IndexOptions | None = None,
    progress: ProgressFn | None = None,
    ray: RayOptions | None = None,
) -> IndexReport:
    """Bring the store at store_path in step with the photos folder.

    Trains the autoencoder when the store has none (or ``options.retrain``), embeds new and
    changed files (size+mtime, confirmed by sha256), drops deleted ones and updates the index.
    Every batch is committed to the table as it is done, so an interrupted run loses at most a
    batch and the next run continues from there.

    With ``ray``, files are decoded and embedded on a Ray cluster (lookalike.scale), results
    stream to shard files in the store and are merged into the same table and index; training
    stays here, on a bounded sample, exactly as without Ray.
    """
    started = time.perf_counter()
    options = options or IndexOptions()
    resolve_index_type(options.index_type, 0)  # refuse a bad type before any work
    labels_source = options.labels
    if labels_source is not None and labels_source != FOLDERS:
        labels_source = str(Path(labels_source).expanduser().resolve())
        read_labels_csv(Path(labels_source))  # a malformed CSV fails before any work
    source = open_photos(photos)
    source.check()  # a missing folder, bucket or prefix fails before the store is touched
    progress = progress or (lambda stage, done, total: None)
    report = IndexReport()
    with Store.open(store_path, create=True) as store, store.writing():
        _run(store, source, model, options, progress, report, ray)
        labels_source = labels_source or store.info.get("labels_source")
        if labels_source:
            if labels_source != FOLDERS and not Path(labels_source).exists():
                log.warning("labels file %s is gone; labels left as they are", labels_source)
            else:  # a remembered folder source only labels new rows: edits stay
                apply_labels(store.db, labels_source, keep_existing=options.labels is None)
                store.update_state({"labels_source": labels_source})
    report.seconds = time.perf_counter() - started
    return report


class Todo(NamedTuple):
    """One file of the to-do list, with what the plan knew of it."""

    pos: int  # position in the collection order of this run
    rel: str  # the table's path
    location: Path | str  # a Path, or an object's URL
    size: int  # the file's facts when planned (an object's: from the listing)
    mtime: float
    kind: str  # added | maybe (size or mtime differ: the sha256 decides) | stale
    id: int | None = None  # the table's row of the file (None when added)
    sha256: str | None = None
    model: int | None = None
    no_phash: bool = False  # a row of an older version without a pHash: decoded again once


@dataclass
class Plan:
    """What one run has to do: the files to (re)embed, in collection order, and why; read from
    the run's listing (on disk) a chunk at a time."""

    listing: Listing
    locate: Callable[[str], Path | str]  # table path -> location
    removed_ids: np.ndarray  # rows whose file is gone

    @property
    def positions(self) -> int:
        """Entries in the listing (uploads included): every position is below."""
        return self.listing.count

    def __len__(self) -> int:
        return self.listing.todo_count

    @property
    def todo(self) -> Iterator[Todo]:
        """The to-do list in collection order (streamed)."""
        return self.items()

    def items(self, uncovered: bool = False) -> Iterator[Todo]:
        """The to-do list; with ``uncovered``, without the files the covered rows hold."""
        return map(self.item, self.listing.todo(uncovered))

    def rows_of(self, rels: list[str], positions: list[int]) -> dict[str, tuple]:
        """rel -> to-do row (pos, rel, size, mtime, kind, id, sha256, model, no_phash) of these
        table paths (those that have one), expected at these positions; item() makes a Todo."""
        return self.listing.todo_of(rels, positions)

    def item(self, row: tuple) -> Todo:
        pos, rel, size, mtime, kind, id_, sha256, model, no_phash = row
        return Todo(
            pos, rel, self.locate(rel), size, mtime, kind, id_, sha256, model, no_phash == 1
        )


SCAN_EVERY = 200  # files between two scan progress calls


Source = LocalPhotos | BucketPhotos


def scan(store: Store, photos: Path | Source, progress: ProgressFn | None = None) -> list:
    """The image files under photos (a folder, or a bucket's URL), in collection order (the
    store's own folder excluded).

    progress("scan", found, 0) is called every SCAN_EVERY files and at the end (total unknown).
    """
    source = photos if isinstance(photos, Source) else open_photos(photos)
    return [location for location, _ in _walk(store, source, progress)]


def scan_into(listing: Listing, store: Store, photos: Source, progress: ProgressFn) -> None:
    """scan(), streamed into the run's listing (with an object's size and mtime)."""
    listing.add(
        (store.table_path(location, photos.root), *facts)
        for location, facts in _walk(store, photos, progress)
    )
    listing.files = listing.count
    listing.indexed()


def _walk(store, source: Source, progress: ProgressFn | None) -> Iterator[tuple]:
    """(location, (size, mtime) from the listing, or (None, None)) of each image file."""
    found = 0
    for location, facts in source.entries(IMAGE_SUFFIXES):
        if isinstance(source, BucketPhotos) or not location.resolve().is_relative_to(store.root):
            found += 1
            if progress and found % SCAN_EVERY == 0:
                progress("scan", found, 0)
            yield location, facts
    if progress:
        progress("scan", found, found)


def _locator(store: Store, photos: Source) -> Callable[[str], Path | str]:
    """table path -> location: a file under the photos root, or an upload kept in the store."""

    def locate(rel: str) -> Path | str:
        if rel.startswith(UPLOAD_PREFIX):
            return store.uploads_dir / rel[len(UPLOAD_PREFIX) :]
        return photos.locate(rel)

    return locate


def plan_changes(store: Store, photos: Source, listing: Listing, report: IndexReport) -> Plan:
    """Compare the listed files (and the store's uploads) with the table, a chunk at a time,
    into the listing's to-do list; counts unchanged files in report."""
    if store.uploads_dir.is_dir():
        listing.add(
            (store.table_path(p, photos.root), None, None) for p in find_images(store.uploads_dir)
        )
    locate = _locator(store, photos)
    serial = store.model_serial
    racy = store.info.get("last_scan", float("-inf")) - photos.racy_seconds
    for rows in listing.joined():
        todo = []
        for pos, rel, size, mtime, id_, old_size, old_mtime, sha256, model, no_phash in rows:
            if size is None:  # a file: asked now (an object's facts come from the listing)
                try:
                    size, mtime = photos.stat(locate(rel))
                except OSError:  # gone since the scan: reading it fails and is reported
                    size, mtime = -1, -1.0
            if id_ is None:
                todo.append((pos, rel, size, mtime, "added", None, None, None, 0))
                continue
            if size == old_size and mtime == old_mtime and old_mtime < racy:
                if model == serial and not no_phash:
                    report.unchanged += 1
                    continue
                kind = "stale"
            else:  # size or mtime differ, or the mtime was too close to the last run to
                kind = "maybe"  # prove a rewrite since would change it: the sha256 decides
            todo.append((pos, rel, size, mtime, kind, id_, sha256, model, no_phash))
        listing.add_todo(todo)
    return Plan(listing, locate, listing.removed_ids())


class Committer:
    """Writes embedded files to the table (one transaction per batch) and keeps the index and
    the report in step; shared by the single-process and the Ray paths. The to-do items carry
    what it needs of the plan."""

    def __init__(self, store: Store, index, report: IndexReport):
        self.store = store
        self.index = index
        self.report = report
        self.serial = store.model_serial
        self.failed: dict[Path, FailedImage] = {}
        self._touches: list[tuple[int, float, int]] = []

    def fail(self, bad: list[FailedImage], items: list[Todo]) -> None:
        """Report unreadable files; a file that was indexed and is now unreadable is dropped."""
        for f, item in zip(bad, items):
            self.failed.setdefault(f.path, f)
            if item.id is not None:  # it cannot be served any more
                self.store.db.write(deletes=[item.id])
                if self.index is not None:
                    with self.store.lock:
                        self.index.remove(np.array([item.id]))

    def triage(self, item: Todo, sha256: str, mtime: float, size: int) -> str | None:
        """The kind of write a decoded file needs, or None when it is unchanged after all
        (same bytes under a new mtime: only the file facts are updated)."""
        k = item.kind
        if k == "maybe" and item.sha256 == sha256:
            k = "unchanged" if item.model == self.serial and not item.no_phash else "stale"
            self._touches.append((item.id, mtime, size))
            if k == "unchanged":
                self.report.unchanged += 1
                return None
        elif k == "maybe":
            k = "updated"
        return k

    def commit(self, rows: list[tuple[ImageRecord, np.ndarray, str]]) -> None:
        """Write (record, vector, kind) rows and the touches triage collected, in one transaction."""
        touches, self._touches = self._touches, []
        if rows:
            pairs = [(r, v) for r, v, _ in rows]
            if all(k == "added" for _, _, k in rows):  # a first run: one executemany
                ids = self.store.db.insert_new(pairs, touches=touches, model=self.serial)
            else:
                ids = self.store.db.write(pairs, touches=touches, model=self.serial)
            if self.index is not None:
                replaced = [i for i, (_, _, k) in zip(ids, rows) if k != "added"]
                with self.store.lock:
                    self.index.remove(np.array(replaced))  # replaced rows keep their id
                    self.index.add(np.stack([v for _, v, _ in rows]), np.array(ids))
            self._count(k for _, _, k in rows)
        elif touches:
            self.store.db.write(touches=touches)

    def commit_new(self, rows: NewRows) -> None:
        """Insert rows of new paths given as columns (all of kind added), and the touches
        triage collected, in one transaction: the merge's path for millions of rows."""
        touches, self._touches = self._touches, []
        ids = self.store.db.insert_columns(rows, touches=touches, model=self.serial)
        if self.index is not None and ids:
            with self.store.lock:
                self.index.add(np.asarray(rows.embedding, np.float32), np.array(ids))
        self.report.added += len(ids)

    def _count(self, kinds) -> None:
        for k in kinds:
            if k == "added":
                self.report.added += 1
            elif k == "updated":
                self.report.updated += 1
            else:
                self.report.reembedded += 1
                self.report.unchanged += 1


def check_removals(store: Store, photos: Source, listing: Listing, prune: bool) -> None:
    """Refuse a run that would remove more than half of the stored rows (or all of them)
    unless ``prune``: an empty or wrong folder (an unmounted drive, a typo) must not wipe a
    store. Checked before anything is changed, training included."""
    gone, rows = listing.gone(keep_prefix=UPLOAD_PREFIX)  # uploads stay
    if gone and (gone == rows or 2 * gone > rows) and not prune:
        was = store.photos_root
        raise InvalidArgumentError(
            f"{photos.root} would remove {gone} of the store's {rows} photos "
            f"({listing.files} images found there"
            + (f"; the store indexes {was}" if was and was != photos.root else "")
            + "). Nothing was changed. If the photos really are gone, run again with --prune."
        )


def _run(store, photos, model, options, progress, report, ray=None) -> None:
    started = time.time()  # the next run re-reads files whose mtime is this close to it
    with Listing(store.root, store.db.path) as listing:
        progress("scan", 0, 0)
        scan_into(listing, store, photos, progress)
        check_removals(store, photos, listing, options.prune)
        if store.photos_root != photos.root:
            store.update_state({"photos_root": str(photos.root)})
        failed: dict[Path, FailedImage] = {}
        with ExitStack() as stack:
            decoded = None
            if not store.is_trained or options.retrain:
                cfg = model or (store.model_config() if store.is_trained else ModelConfig())
                tmp = stack.enter_context(
                    tempfile.TemporaryDirectory(dir=store.root, prefix="train-")
                )
                report.train_seconds, decoded = _train(
                    store, photos, listing, cfg, options, progress, failed, Path(tmp)
                )
                report.trained = True
            _update(store, photos, listing, options, progress, report, ray, failed, decoded)
    store.update_state({"last_scan": started})


def _update(store, photos, listing, options, progress, report, ray, failed, decoded) -> None:
    """Embed what the plan says with the store's model, commit it, bring the index in step and
    calibrate a new model; ``decoded``: the training sample, decoded already."""
    cfg = store.model_config()
    plan = plan_changes(store, photos, listing, report)
    index = None
    if not report.trained and store.info.get("embedding_dim"):
        index = store.index  # loaded, or rebuilt if a previous run was interrupted
    _remove(store, plan, index, report)
    committer = Committer(store, index, report)
    committer.failed.update(failed)
    embedder = None
    if ray is not None:
        index = _embed_on_ray(store, photos, plan, committer, cfg, options, ray, progress, index)
    else:
        known = _unchanged(decoded, photos) if decoded else None
        embedder = _embed_here(store, photos, plan, committer, cfg, options, progress, known)
    report.images = _save_index(store, index, options.index_type, progress)
    report.failed = sorted(committer.failed.values(), key=lambda f: str(f.path))
    if report.images:
        _calibrate_new_model(store, photos, embedder, progress)


def _remove(store, plan, index, report) -> None:
    """The rows of removed files out of the table, their thumbnails and the index."""
    if len(plan.removed_ids):
        store.db.write(deletes=plan.removed_ids)
        report.removed = len(plan.removed_ids)
        remove_thumbnails(store.root, plan.removed_ids.tolist())
        if index is not None:
            with store.lock:
                index.remove(plan.removed_ids)


def _embed_on_ray(store, photos, plan, committer, cfg, options, ray, progress, index):
    """Embed on the Ray cluster; an IVF index is filled there too. Returns the index to keep."""
    from .scale.ray_index import build_ivf_on_ray, embed_on_ray, ray_session

    with ray_session(ray):
        committer.report.ray = {}
        embed_on_ray(store, photos, plan, committer, cfg, options, ray, progress)
        kind = resolve_index_type(options.index_type, len(store.db))
        if kind == "ivf" and (index is None or index.index_type != "ivf"):
            committer.report.index = build_ivf_on_ray(store, options.index_type, ray, progress)
            index = store.index
    return index


def _save_index(store, index, requested: str, progress) -> int:
    """Rebuild the index where its kind must change, else save it; returns the row count."""
    count = len(store.db)
    progress("index", 0, 1)
    if index is None or index.index_type != resolve_index_type(requested, count):
        store.rebuild_index(requested)
    else:
        store.update_state({"index_type_requested": requested})
        store.save_index()
    progress("index", 1, 1)
    return count


def _calibrate_new_model(store, photos, embedder, progress) -> None:
    """Measure the dedupe threshold for every new model (also when the run that trained it was
    cut off before calibrating): the cosine scale of duplicates is the model's."""
    calibration = store.info.get("dedupe_calibration") or {}
    if calibration.get("model_serial") == store.model_serial:
        return
    from .dedupe.calibration import calibrate_store

    progress("calibrate", 0, 1)
    try:
        calibrate_store(store, embedder or store.load_embedder())
    except OSError as exc:
        if not isinstance(photos, BucketPhotos):
            raise
        # a bucket that cannot be read now: the index is complete and searchable, and
        # dedupe measures its threshold on its first run
        log.warning("dedupe threshold not measured for %s: %s", photos.root, exc)
    progress("calibrate", 1, 1)


def _embed_here(store, photos, plan, committer, cfg, options, progress, known=None):
    """Decode on a thread pool (``known``: files decoded already) and embed in this process,
    one committed batch at a time; returns the embedder (None when there was nothing to embed)."""
    total = len(plan)
    embedder = store.load_embedder() if total else None
    progress("embed", 0, total)
    pending: dict = {}  # location -> its to-do item, for the files being decoded

    def locations():
        for item in plan.todo:
            pending[item.location] = item
            yield item.location

    done = 0
    for ok, bad in iter_batches(
        locations(),
        cfg.image_size,
        options.batch_size,
        workers=options.workers,
        max_pixels=options.max_pixels,
        max_bytes=options.max_decode_bytes,
        known=known,
    ):
        committer.fail(bad, [pending.pop(f.path) for f in bad])
        keep = []
        for im in ok:
            item = pending.pop(im.path)
            mtime = photos.fresh(im.path, (item.size, item.mtime))[1]
            k = committer.triage(item, im.sha256, mtime, im.nbytes)
            if k is not None:
                keep.append((im, item.rel, k, mtime))
        vectors = []
        if keep:
            t0 = time.perf_counter()
            vectors = embedder(np.stack([im.pixels for im, *_ in keep]))
            committer.report.embed_seconds += time.perf_counter() - t0
        committer.commit(
            [(_record(im, rel, mtime), v, k) for (im, rel, k, mtime), v in zip(keep, vectors)]
        )
        done += len(ok) + len(bad)
        progress("embed", done, total)
    return embedder


def _record(im: DecodedImage, rel: str, mtime: float) -> ImageRecord:
    return ImageRecord(
        0, rel, im.nbytes, mtime, im.sha256, im.width, im.height, phash=phash64(im.pixels)
    )


def _train(store: Store, photos, listing, cfg: ModelConfig, options, progress, failed, tmp):
    """Decode a seeded sample of at most cfg.max_train_images listed files into a memmap in
    tmp and train on it; returns (seconds, the sample's decoded images by path, with the file's
    (size, mtime)): the embedding that follows takes those pixels instead of decoding the
    files again."""
    from .encoder.train import train_autoencoder

    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    positions = np.arange(listing.files)
    if listing.files > cfg.max_train_images:
        positions = np.sort(rng.choice(listing.files, cfg.max_train_images, False))
    if len(positions) < 2:
        raise InvalidArgumentError(
            f"need at least 2 images to train a model, found {len(positions)}"
        )
    locate = _locator(store, photos)
    listed = {locate(rel): (size, mtime) for _, rel, size, mtime in listing.sample(positions)}
    pick = list(listed)
    s = cfg.image_size
    cache = np.lib.format.open_memmap(
        tmp / "sample.npy", mode="w+", dtype=np.uint8, shape=(len(pick), s, s, 3)
    )
    decoded: dict[Path, tuple[DecodedImage, tuple[int, float]]] = {}
    progress("decode", 0, len(pick))
    for ok, bad in iter_batches(
        pick,
        s,
        options.batch_size,
        workers=options.workers,
        max_pixels=options.max_pixels,
        max_bytes=options.max_decode_bytes,
    ):
        for f in bad:
            failed.setdefault(f.path, f)
        for im in ok:
            n = len(decoded)
            cache[n] = im.pixels
            facts = photos.fresh(im.path, listed[im.path])
            decoded[im.path] = (replace(im, pixels=cache[n]), facts)
        progress("decode", len(decoded) + len(failed), len(pick))
    if len(decoded) < 2:
        raise InvalidArgumentError(
            f"need at least 2 readable images to train, found {len(decoded)}"
        )
    result = train_autoencoder(cache[: len(decoded)], cfg, progress)
    store.save_model(result, cfg)
    return time.perf_counter() - started, decoded


def _unchanged(decoded: dict[Path, tuple[DecodedImage, tuple[int, float]]], photos):
    """The decoded images whose file has the size and mtime it had when it was decoded."""
    out = {}
    for path, (im, facts) in decoded.items():
        try:
            now = photos.fresh(path, facts)
        except OSError:
            continue
        if now == facts:
            out[path] = im
    return out
