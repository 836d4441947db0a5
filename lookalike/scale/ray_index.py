"""`lookalike index --ray`: decode and embed on a Ray cluster, build a big index in parallel.

The driver (this process) scans the folder, trains the model on a bounded sample exactly as
without Ray, and ships the portable model (model/embed.onnx: the whole embedding graph) to the
cluster once (one object in Ray's store); the workers run it on onnxruntime, without TensorFlow. Ray Data then runs two stages over the list of files to do:

1. ``map_batches(decode_batch)`` as tasks: read, hash, decode and pHash each file, the same
   function the single-process path uses; unreadable files become rows with an error;
2. ``map_batches(EmbedActor)`` on a pool of actors, each loading the portable model once and
   embedding whole batches.

Results come back to the driver in collection order and are written to shard files in the
store (lookalike.scale.shards), which are merged into the table and deleted once the job is
done. An interrupted job resumes from its shards. Above the exact-index threshold, the IVF
index is trained on a sample here and filled chunk by chunk by Ray tasks, then merged.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from ..config import IndexOptions, ModelConfig, RayOptions
from ..errors import InvalidArgumentError
from ..images import FailedImage
from ..index.meta import ImageRecord, NewRows
from ..photos import is_url
from .shards import COLUMNS, ShardDir

log = logging.getLogger(__name__)

# CPUs asked by each decoding task: differs from the actors' so Ray Data does not fuse decoding
# into the actors (decoding then overlaps embedding, on the CPU the pool leaves free)
DECODE_CPUS = 0.5
BLOCK_ROWS = 512  # files per Ray Data block of the input list
MODEL_FILES = ("config.json", "embed.onnx")


def import_ray():
    """Import Ray, or explain how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InvalidArgumentError(
            'Ray is not installed; install the extra with: pip install "lookalike[ray]"'
        ) from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once, with a clear message, when nothing listens at a host:port address (Ray
    itself retries for minutes). "auto" and other forms are left to Ray."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InvalidArgumentError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head` or leave ADDRESS out to run a local one"
        ) from None


@contextmanager
def ray_session(opts: RayOptions) -> Iterator[Any]:
    """Connect to (or start) Ray for one run; a session this run started is shut down after."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        address = None if opts.address in ("", "local") else opts.address
        if address is not None:
            check_reachable(address)
        kwargs: dict[str, Any] = dict(
            address=address or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise InvalidArgumentError(
                f"cannot reach a Ray cluster at {opts.address}: {exc}"
            ) from None
        started = True
    if not log.isEnabledFor(logging.INFO):  # Ray Data logs every execution at INFO
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards come back in collection order
        ctx.enable_progress_bars = False  # lookalike draws its own
        yield ray
    finally:
        if started:
            ray.shutdown()


def pool_size(cpus: float, workers: int | None = None) -> tuple[int, float, int]:
    """(actors, CPUs per actor, onnxruntime threads per actor) for a cluster of ``cpus`` CPUs.

    The actors together ask for at most cpus - 1, so at least one CPU is always left for the
    decoding tasks: with 2 CPUs and two 1-CPU actors, Ray Data starves the reading stage and the
    job never starts (seen with ray 2.60). Fractional CPUs let two actors share one CPU.
    """
    cpus = max(1.0, float(cpus))
    n = workers if workers is not None else max(1, int(cpus) - 1)
    if n < 1:
        raise InvalidArgumentError(f"--ray-workers must be at least 1, got {n}")
    per_actor = max(0.1, min(1.0, (cpus - 1.0) / n)) if cpus > 1 else 0.5 / n
    threads = max(1, round(cpus / n))
    return n, round(per_actor, 3), threads


def _facts(location: str, listed: tuple[int, float]) -> tuple[int, float]:
    """(size, mtime) of a file as the worker sees it; an object's as the driver listed it (a
    request per object would only repeat what the listing said)."""
    if is_url(location):
        return listed
    try:
        st = os.stat(location)
    except OSError:
        return -1, -1.0
    return st.st_size, st.st_mtime


def decode_cpus(per_actor: float) -> float:
    """CPUs each decoding task asks for: DECODE_CPUS, or less where an actor of a fraction of a
    CPU would leave too little beside it on a node (3 actors of 0.667 CPU on three 1-CPU nodes
    leave 0.333 on each: decoding tasks of 0.5 would never be placed and the job would hang)."""
    spare = 1.0 - per_actor % 1.0
    return DECODE_CPUS if spare >= 1.0 else round(min(DECODE_CPUS, spare), 3)


def decode_batch(
    batch: dict[str, np.ndarray], size: int, max_pixels: int, max_bytes: int | None = None
) -> dict:
    """Ray Data stage 1 (tasks): read, hash, decode and pHash each file (or object) of a batch,
    within the same pixel and decode-memory limits as the single-process path."""
    from ..images import _decode_or_fail, phash64

    paths = batch["path"]
    n = len(paths)
    pixels = np.zeros((n, size, size, 3), np.uint8)
    out: dict[str, list] = {name: [] for name in COLUMNS if name not in ("pos", "rel")}
    for i, path in enumerate(paths):
        location = str(path)
        limits = {} if max_bytes is None else {"max_bytes": max_bytes}
        im = _decode_or_fail(
            location if is_url(location) else Path(location), size, max_pixels, **limits
        )
        fsize, mtime = _facts(location, (int(batch["size"][i]), float(batch["mtime"][i])))
        if isinstance(im, FailedImage):
            values = (fsize, mtime, "", 0, 0, 0, im.error)
        else:
            pixels[i] = im.pixels
            values = (im.nbytes, mtime, im.sha256, im.width, im.height, phash64(im.pixels), "")
        for name, value in zip(
            ("size", "mtime", "sha256", "width", "height", "phash", "error"), values
        ):
            out[name].append(value)
    result = {"pos": batch["pos"], "rel": batch["rel"], "pixels": pixels}
    result.update({name: np.asarray(v, dtype=COLUMNS[name]) for name, v in out.items()})
    return result


class EmbedActor:
    """Ray Data stage 2 (actors): loads the portable model once, embeds whole batches."""

    def __init__(self, model_ref: list, threads: int):
        import json

        import ray

        from ..encoder.runtime import PortableEmbedder

        files: dict[str, bytes] = ray.get(model_ref[0])
        cfg = ModelConfig.from_dict(json.loads(files["config.json"]))
        self.embedder = PortableEmbedder(files["embed.onnx"], cfg, threads=threads)
        self.dim = self.embedder.dim
        self.node = ray.get_runtime_context().get_node_id()  # reported: where rows were embedded

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["error"]) == ""
        embedding = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            embedding[ok] = self.embedder(np.asarray(batch["pixels"])[ok])
        out = {name: batch[name] for name in COLUMNS}
        out["embedding"] = embedding
        out["node"] = np.full(len(ok), self.node)
        return out


def _blocks(items, rows: int):
    """The to-do items as Ray Data input blocks of ``rows`` files, each put into Ray's object
    store as it is made (the driver never holds the whole list)."""
    import pyarrow as pa
    import ray

    names = ("pos", "rel", "path", "size", "mtime")
    block: list[tuple] = []
    for t in items:
        block.append((t.pos, t.rel, str(t.location), t.size, t.mtime))
        if len(block) == rows:
            yield ray.put(pa.table({n: [b[c] for b in block] for c, n in enumerate(names)}))
            block = []
    if block:
        yield ray.put(pa.table({n: [b[c] for b in block] for c, n in enumerate(names)}))


def _model_files(store) -> dict[str, bytes]:
    store.ensure_portable_model()  # an older store's model is exported here, once
    return {name: (store.model_dir / name).read_bytes() for name in MODEL_FILES}


def embed_on_ray(
    store,
    photos,
    plan,
    committer,
    cfg: ModelConfig,
    options: IndexOptions,
    opts: RayOptions,
    progress,
) -> None:
    """Embed plan.todo on the cluster through shard files, then merge them into the table."""

    shards = ShardDir(store.root / "shards", store.model_serial, store.dim)
    # a shard row counts only if its file has the size and mtime the plan saw
    plan.listing.cover(shards.covered_rows())
    todo = plan.listing.todo_count_uncovered()
    total = len(plan)
    resumed = total - todo
    committer.report.resumed = resumed
    progress("embed", resumed, total)

    if todo:
        started = time.perf_counter()
        ds = _pipeline(store, plan, committer, cfg, options, opts, todo)
        _write_shards(ds, shards, committer.report.ray, opts, (resumed, total), progress)
        committer.report.embed_seconds = time.perf_counter() - started

    _merge(shards, plan, committer, progress)
    shards.clear()


def _pipeline(store, plan, committer, cfg: ModelConfig, options, opts: RayOptions, todo: int):
    """The Ray Data pipeline of the rows left: blocks of (pos, path, ...) -> decode tasks ->
    a pool of embedding actors sized to the cluster (recorded in the report)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    n, per_actor, threads = pool_size(cpus, opts.workers)
    log.info(
        "ray: %s CPUs, %d embedding actors at %s CPU, %d threads each", cpus, n, per_actor, threads
    )
    committer.report.ray = {"cpus": cpus, "actors": n, "actor_cpus": per_actor, "embedded": todo}
    model_ref = ray.put(_model_files(store))
    rows = max(opts.batch_size, min(BLOCK_ROWS, opts.shard_rows))
    ds = ray.data.from_arrow_refs(list(_blocks(plan.items(uncovered=True), rows)))
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={
            "size": cfg.image_size,
            "max_pixels": options.max_pixels,
            "max_bytes": options.max_decode_bytes,
        },
        batch_size=opts.batch_size,
        batch_format="numpy",
        num_cpus=decode_cpus(per_actor),
    )
    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"model_ref": [model_ref], "threads": threads},
        batch_size=opts.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n),
        num_cpus=per_actor,
    )


def _write_shards(ds, shards: ShardDir, report_ray: dict, opts: RayOptions, counts, progress):
    """Stream the embedded batches into shard files of opts.shard_rows rows, counting the rows
    each node embedded (report_ray["nodes"]); counts: (rows done before, rows in all)."""
    done, total = counts
    buffer: list[dict[str, np.ndarray]] = []
    buffered = 0
    nodes = report_ray.setdefault("nodes", {})  # node id -> rows embedded there
    for batch in ds.iter_batches(batch_size=opts.batch_size, batch_format="numpy"):
        for node, count in zip(*np.unique(np.asarray(batch["node"]), return_counts=True)):
            nodes[str(node)] = nodes.get(str(node), 0) + int(count)
        buffer.append(batch)
        buffered += len(batch["pos"])
        done += len(batch["pos"])
        if buffered >= opts.shard_rows:
            shards.write(_concat(buffer))
            buffer, buffered = [], 0
        progress("embed", done, total)
    if buffer:
        shards.write(_concat(buffer))


@contextmanager
def _merge_cache(conn, mb: int = 256):
    """SQLite settings for a merge of millions of rows: a larger page cache (the sha256 and path
    indexes take random inserts, which thrash the default 2 MB) and fewer WAL checkpoints (each
    one copies every page changed since the last back into the table, the hot index pages
    again and again). Commits keep their meaning: WAL, synchronous=NORMAL, as always."""
    cache = conn.execute("PRAGMA cache_size").fetchone()[0]
    checkpoint = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    conn.execute(f"PRAGMA cache_size = -{mb * 1024}")
    conn.execute(f"PRAGMA wal_autocheckpoint = {mb * 256}")  # pages of 4 KB: mb MB of WAL
    try:
        yield
    finally:
        conn.execute(f"PRAGMA cache_size = {cache}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {checkpoint}")


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in batches[0]}


MERGE_ROWS = 32_768  # rows a merge transaction takes (whole shards): few, large transactions
BULK_ROWS = 50_000  # a merge of more rows than this, and than the table has, is a bulk load


def _merge(shards: ShardDir, plan, committer, progress) -> None:
    """Write every still-valid shard row into the table, in collection order, whole shards at a
    time (one transaction per MERGE_ROWS rows or so). A merge larger than the table drops the
    table's secondary indexes while it runs (MetaDB.bulk_load)."""
    db = committer.store.db
    bulk = len(plan) > BULK_ROWS and len(plan) > len(db)
    with _merge_cache(db.conn), db.bulk_load() if bulk else nullcontext():
        merged = _merge_shards(shards, plan, committer, progress)
    missing = len(plan) - merged
    if missing:  # a file changed while the job ran: the next run picks it up
        log.warning("%d files changed during the run; run `lookalike index` again", missing)


def _merge_shards(shards: ShardDir, plan, committer, progress) -> int:
    """The merge itself; returns the number of to-do files a shard row was found for."""
    total = len(shards.paths())
    progress("merge", 0, total)
    merged = bytearray(plan.positions)  # 1 at the position of a file merged: found once
    batch = _Batch()
    for number, rows in enumerate(shards.rows(), 1):
        _shard_rows(rows, plan, committer, merged, batch)
        if batch.rows >= MERGE_ROWS:
            batch.commit(committer)
        progress("merge", number, total)
    batch.commit(committer)
    return merged.count(1)


class _Batch:
    """Rows of one merge transaction: new files as columns, the others as records."""

    def __init__(self):
        self.records: list = []  # (record, vector, kind) of files the table has a row of
        self.new: list[dict[str, np.ndarray]] = []  # column pieces of new files
        self.rows = 0

    def commit(self, committer) -> None:
        committer.commit(self.records)  # rows that keep their id first: ids stay as planned
        if self.new:
            names = ("path", "size", "mtime", "sha256", "width", "height", "phash")
            cols = {n: [v for piece in self.new for v in piece[n]] for n in names}
            vectors = np.concatenate([piece["embedding"] for piece in self.new])
            committer.commit_new(NewRows(**cols, embedding=vectors))
        self.__init__()


def _shard_rows(rows, plan, committer, merged: bytearray, batch: _Batch) -> None:
    """Add a shard's rows to write to the batch, in collection order; its unreadable files are
    reported (and dropped from the table) at once."""
    pos = rows["pos"]
    order = np.arange(len(pos))
    if len(pos) > 1 and not bool(np.all(pos[:-1] <= pos[1:])):
        order = np.argsort(pos, kind="stable")
    rels, sizes, mtimes = (rows[n][order].tolist() for n in ("rel", "size", "mtime"))
    errors = rows["error"][order].tolist()
    found = plan.rows_of(rels, pos[order].tolist())
    new: list[int] = []
    bad, bad_items = [], []
    kept = len(batch.records)
    for i, (rel, size, mtime) in enumerate(zip(rels, sizes, mtimes)):
        row = found.get(rel)  # (pos, rel, size, mtime, kind, ...) as planned
        if row is None or row[2] != size or row[3] != mtime or merged[row[0]]:
            continue  # not to do, merged already, or the file changed since it was embedded
        merged[row[0]] = 1
        if errors[i]:
            bad.append(FailedImage(committer.store.file_path(rel), errors[i]))
            bad_items.append(plan.item(row))
        elif row[4] == "added":
            new.append(i)
        else:
            j = order[i]
            k = committer.triage(plan.item(row), str(rows["sha256"][j]), mtime, size)
            if k is not None:
                batch.records.append((_record(rows, j, rel, size, mtime), rows["embedding"][j], k))
    committer.fail(bad, bad_items)
    if new:
        take = order[new]
        piece = {"path": [rels[i] for i in new], "embedding": rows["embedding"][take]}
        for name in ("size", "mtime", "sha256", "width", "height", "phash"):
            piece[name] = rows[name][take].tolist()
        batch.new.append(piece)
    batch.rows += len(new) + len(batch.records) - kept


def _record(rows, j: int, rel: str, size: int, mtime: float) -> ImageRecord:
    return ImageRecord(
        0,
        rel,
        size,
        mtime,
        str(rows["sha256"][j]),
        int(rows["width"][j]),
        int(rows["height"][j]),
        phash=int(rows["phash"][j]),
    )


def fill_ivf_on_ray(trained, chunks, in_flight: int, progress=None):
    """Fill a trained, empty faiss IVF index from (ids, vectors) chunks on Ray tasks.

    Each task adds one chunk to a copy of the trained index and sends the part back; parts are
    merged here in chunk order (so every inverted list holds its ids in the chunks' order, as
    one sequential add would). At most ``in_flight`` chunks are out at once, so memory stays
    bounded by the index itself plus that many parts.
    """
    import faiss
    import ray

    trained.set_direct_map_type(faiss.DirectMap.NoMap)  # parts merge only without an id map
    trained_ref = ray.put(faiss.serialize_index(trained))

    @ray.remote(num_cpus=1)
    def fill(trained: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        part = faiss.deserialize_index(trained)
        part.add_with_ids(vectors, ids)
        return faiss.serialize_index(part)

    merged = None
    pending: list = []
    done = 0

    def take_one() -> None:
        nonlocal merged, done
        ref, n = pending.pop(0)
        part = faiss.deserialize_index(ray.get(ref))
        if merged is None:
            merged = part
        else:
            merged.merge_from(part, 0)
        done += n
        if progress:
            progress(done)

    for ids, vectors in chunks:
        pending.append((fill.remote(trained_ref, ids, vectors), len(ids)))
        if len(pending) >= in_flight:
            take_one()
    while pending:
        take_one()
    if merged is None:
        merged = faiss.deserialize_index(ray.get(trained_ref))
    merged.set_direct_map_type(faiss.DirectMap.Hashtable)
    merged.nprobe = trained.nprobe
    return merged


def build_ivf_on_ray(
    store, requested: str, opts: RayOptions, progress, chunk: int = 50_000
) -> dict:
    """Train an IVF index on a sample here, fill it chunk by chunk on the cluster, merge the
    parts into one index and save it; returns its parameters and measured recall@10."""
    import ray

    from ..index.knn import KnnIndex, ivf_params, tune_nprobe

    started = time.perf_counter()
    dim, count = store.dim, len(store.db)
    step = max(1, count // 100_000)
    train = np.concatenate([v[::step] for _, v in store.embeddings()])
    nlist, _ = ivf_params(len(train))
    if len(train) < 2 * nlist:
        store.rebuild_index(requested)
        return {"type": store.info["index_type"]}
    progress("index", 0, count)
    trained = KnnIndex.empty(dim, "ivf", train).index
    del train
    in_flight = max(1, opts.index_tasks or int(ray.cluster_resources().get("CPU", 1)))
    merged = fill_ivf_on_ray(
        trained,
        store.embeddings(chunk=chunk),
        in_flight,
        lambda done: progress("index", done, count),
    )
    knn = KnnIndex(merged, "ivf")
    built = time.perf_counter() - started
    tuned = tune_nprobe(knn, lambda: store.embeddings(chunk=chunk), count)
    store.update_state({"ivf": tuned})
    store.set_index(knn, requested)
    return {
        "type": "ivf",
        "nlist": nlist,
        "build_seconds": round(built, 3),
        "tune_seconds": round(time.perf_counter() - started - built, 3),
        **tuned,
    }
