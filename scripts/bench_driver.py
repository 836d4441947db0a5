"""The Ray driver's own work at scale, without images or a model: merging shards into SQLite,
and the scan + plan of a listing against the table, on synthetic entries.

    python scripts/bench_driver.py merge --rows 1000000,10000000
    python scripts/bench_driver.py plan --rows 1000000,10000000

merge: N rows of 128-d embeddings written as shards of 4,096 rows (as a Ray job writes them) and
a first run's listing and plan of N files on disk, then merged into an empty store's table by
lookalike.scale.ray_index._merge, the function a run uses; prints rows/s of the merge alone and
the driver's peak RSS.
plan: a store whose table holds N rows, and a generated listing of N entries (the same paths,
1 % changed, 1 % new, 1 % gone) fed to the run's scan, removal guard and plan (and the to-do list
read back); prints seconds and the peak RSS of the process (each size runs in a fresh process,
so the peaks do not mix). Set BENCH_TMP to a folder with room: 10M entries take ~10 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 128
SHARD_ROWS = 4096


def rss_mb() -> float:
    """Current resident set of this process, MB (from /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_mb() -> float:
    """Peak resident set of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def new_store(root: Path):
    from lookalike.store import Store

    store = Store.open(root / "store", create=True, photos=root / "photos")
    store.update_state({"model_serial": 1, "embedding_dim": DIM, "image_size": 64}, bump=True)
    return store


def rel(i: int) -> str:
    return f"d{i // 10_000:04d}/photo_{i:08d}.jpg"


def write_shards(store, n: int, rng: np.random.Generator) -> None:
    from lookalike.scale.shards import ShardDir

    shards = ShardDir(store.root / "shards", store.model_serial, DIM)
    for start in range(0, n, SHARD_ROWS):
        m = min(SHARD_ROWS, n - start)
        v = rng.standard_normal((m, DIM)).astype(np.float32)
        shards.write(
            {
                "pos": np.arange(start, start + m),
                "rel": np.array([rel(i) for i in range(start, start + m)]),
                "size": np.full(m, 1000),
                "mtime": np.full(m, 1.0),
                "sha256": np.frombuffer(rng.bytes(32 * m).hex().encode(), "S64").astype(str),
                "width": np.full(m, 64),
                "height": np.full(m, 48),
                "phash": np.arange(start, start + m),
                "error": np.full(m, ""),
                "embedding": v / np.linalg.norm(v, axis=1, keepdims=True),
            }
        )


def bench_merge(n: int) -> dict:
    from lookalike.index.listing import Listing
    from lookalike.indexer import Committer, IndexReport, Plan
    from lookalike.scale.ray_index import _merge
    from lookalike.scale.shards import ShardDir

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        store = new_store(Path(tmp))
        write_shards(store, n, np.random.default_rng(0))
        with Listing(store.root, store.db.path) as listing:  # a first run's listing and plan
            listing.add((rel(i), 1000, 1.0) for i in range(n))
            listing.indexed()
            for start in range(0, n, 50_000):
                listing.add_todo(
                    [
                        (i, rel(i), 1000, 1.0, "added", None, None, None, 0)
                        for i in range(start, min(n, start + 50_000))
                    ]
                )
            plan = Plan(listing, str, np.zeros(0, np.int64))
            index_seconds = timed_index_build(store.db)
            before = rss_mb()
            report = IndexReport()
            committer = Committer(store, None, report)
            shards = ShardDir(store.root / "shards", store.model_serial, DIM)
            started, cpu = time.perf_counter(), time.process_time()
            _merge(shards, plan, committer, lambda *a: None)
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu
        count = len(store.db)
        indexes = {r[0] for r in store.db.conn.execute("SELECT name FROM sqlite_master")}
        store.close()
    assert count == n and report.added == n, (count, report.added)
    assert {"images_sha256", "images_mtime"} <= indexes, indexes
    return {
        "rows": n,
        "merge_seconds": round(seconds, 2),
        "rows_per_s": round(n / seconds),
        "cpu_seconds": round(cpu, 2),  # this process's CPU time: what the load did not take
        "rows_per_cpu_s": round(n / cpu),
        "index_seconds": round(index_seconds[0], 2),  # of merge_seconds: the indexes' sorts
        "rss_before_mb": round(before),
        "peak_rss_mb": round(peak_mb()),
    }


def timed_index_build(db) -> list[float]:
    """Time the end of db.bulk_load (building the secondary indexes); read after the merge."""
    from contextlib import contextmanager

    took = [0.0]
    real = db.bulk_load

    @contextmanager
    def bulk_load():
        load = real()
        load.__enter__()
        try:
            yield
        finally:
            started = time.perf_counter()
            load.__exit__(None, None, None)
            took[0] = time.perf_counter() - started

    db.bulk_load = bulk_load
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["merge", "plan"])
    p.add_argument("--rows", default="1000000")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    sizes = [int(s) for s in args.rows.split(",")]
    if args.one:
        fn = bench_merge if args.what == "merge" else bench_plan
        print(json.dumps(fn(sizes[0])))
        return
    for n in sizes:  # one fresh process per size: peak RSS is per process
        out = subprocess.run(
            [sys.executable, __file__, args.what, "--rows", str(n), "--one"],
            capture_output=True,
            text=True,
            check=True,
        )
        load = os.getloadavg()[0]
        print(json.dumps(json.loads(out.stdout.splitlines()[-1]) | {"load": round(load, 1)}))


def bench_plan(n: int) -> dict:
    """Peak RSS and seconds of scan + removal guard + plan over a listing of n objects."""
    from lookalike.index.listing import Listing
    from lookalike.indexer import IndexReport, check_removals, plan_changes, scan_into
    from lookalike.photos import BucketPhotos

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        store = new_store(Path(tmp))
        fill_table(store, n)
        source = type("SyntheticBucket", (SyntheticListing, BucketPhotos), {})(n)
        store.update_state({"photos_root": source.root})
        base = rss_mb()
        started, cpu = time.perf_counter(), time.process_time()
        with Listing(store.root, store.db.path) as listing:
            scan_into(listing, store, source, lambda *a: None)
            check_removals(store, source, listing, prune=False)
            report = IndexReport()
            plan = plan_changes(store, source, listing, report)
            todo, removed = len(plan), len(plan.removed_ids)
            todo_seen = sum(1 for _ in plan.todo)  # the to-do list read back, as a run does
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        store.close()
    gone = n // 100  # the first 1 %; new: 1 %; changed: every 100th of the rest
    assert removed == gone and todo == todo_seen == gone + (n - gone) // 100, (removed, todo)
    return {
        "entries": n,
        "plan_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "rss_before_mb": round(base),
        "peak_rss_mb": round(peak_mb()),
        "todo": todo,
    }


def fill_table(store, n: int, chunk: int = 50_000) -> None:
    """n rows of model 1 with the paths rel(0..n-1), size 1000, mtime 1.0."""
    from lookalike.index.meta import ImageRecord

    vec = np.zeros(DIM, np.float32)
    for start in range(0, n, chunk):
        rows = [
            (ImageRecord(0, rel(i), 1000, 1.0, f"{i:064x}", 64, 48, phash=i), vec)
            for i in range(start, min(n, start + chunk))
        ]
        store.db.insert_new(rows, model=1)


class SyntheticListing:
    """A listing of n objects like BucketPhotos gives: rel(i) for i in 1 % .. n + 1 % (the first
    1 % gone, 1 % new at the end), every 100th with a new size (changed)."""

    def __init__(self, n: int):
        self.n = n
        self.root = "s3://bench/photos"

    def entries(self, suffixes):
        gone = self.n // 100
        for i in range(gone, self.n + gone):
            size = 1001 if i % 100 == 50 and i < self.n else 1000
            yield f"{self.root}/{rel(i)}", (size, 1.0)


if __name__ == "__main__":
    main()
