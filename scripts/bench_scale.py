#!/usr/bin/env python
"""Scale-out benchmarks for `lookalike index --ray` (see docs/scaling.md).

1. embed: images/s of `index_folder` on --size images (../shared/datasets/intel_scenes grown with
   seeded transformed copies, made by scripts/bench_index.py's make_collection under --scratch),
   in the same run: the single-process path, then the Ray path with each of --workers embedding
   actors on a local Ray instance of all this machine's CPUs. Every run starts from an empty store
   holding the same trained model (trained once, or taken from --template), so no run trains.
   Reports wall seconds, images/s, the Ray job's seconds, the driver's peak RSS and the peak
   summed RSS of Ray's worker processes (sampled every 0.5 s). ray.init is outside the timing.
2. ivf: IVF-Flat built as `lookalike index --ray` builds it (trained on an even sample of at most
   100k, nlist/nprobe from lookalike.index.knn.ivf_params, filled by Ray tasks chunk by chunk and
   merged, nprobe then tuned by measurement to recall@10 >= 0.98 on 1,000 stored vectors, as
   lookalike.index.knn.tune_nprobe does for a store) on --vectors synthetic unit vectors of the model's dimension (128; a mixture of 1,000
   Gaussians, as scripts/bench_query.py's "clustered"), generated chunk by chunk (never one big
   array). Beside it, the same index filled by one sequential add, and IVF-PQ (32 bytes/vector)
   for the memory it would save. Reports build seconds, index bytes, RSS, single-query ms on one
   FAISS thread (what the Engine uses), and recall@10 against exact search (streamed).

Examples:
  python scripts/bench_scale.py embed --size 50000 --workers 1,2
  python scripts/bench_scale.py ivf --vectors 1000000,10000000
  python scripts/bench_scale.py embed --size 300 --workers 1 --tiny    # smoke
  python scripts/bench_scale.py ivf --vectors 20000 --nq 50            # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import DEFAULT_SCRATCH, DEFAULT_SOURCE, machine, make_collection, markdown  # noqa: E402

DIM = 128
CHUNK = 200_000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ray_workers_rss_mb() -> float:
    """Summed RSS of this machine's Ray worker processes (cmdline 'ray::...')."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if not cmd.startswith(b"ray::"):
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class RssSampler:
    """Peak of ray_workers_rss_mb() while running."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, ray_workers_rss_mb())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- 1. embedding throughput ----------------------------------------------------------------
def clone_model(trained: Path, dst: Path) -> Path:
    """An empty store holding the trained store's model (any earlier one at dst removed)."""
    from lookalike.store import copy_model

    shutil.rmtree(dst, ignore_errors=True)
    return copy_model(trained, dst)


def template_store(args) -> Path:
    if args.template:
        return args.template
    from bench_index import model_config

    from lookalike.indexer import index_folder
    from lookalike.store import is_trained_store

    store = args.scratch / ("scale_template_tiny" if args.tiny else "scale_template")
    if not is_trained_store(store):
        print(f"training the template model on {args.source} ...", file=sys.stderr, flush=True)
        shutil.rmtree(store, ignore_errors=True)
        model = model_config(True, 1) if args.tiny else None
        index_folder(args.source, store, model=model)
    return store


def embed_bench(args) -> list[dict]:
    import ray

    from lookalike.config import RayOptions
    from lookalike.indexer import index_folder

    photos = make_collection(args.source, args.scratch, args.size)
    template = template_store(args)
    rows = []
    runs = [("single", None)] + [(f"ray {w} actor(s)", w) for w in args.workers]
    for rep in range(args.repeats):
        for name, workers in runs:
            store = clone_model(template, args.scratch / "scale_store")
            if workers is not None:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            with RssSampler() as rss:
                t0 = time.perf_counter()
                report = index_folder(
                    photos,
                    store,
                    ray=RayOptions(workers=workers) if workers is not None else None,
                )
                wall = time.perf_counter() - t0
            if workers is not None:
                ray.shutdown()
            row = {
                "run": name,
                "repeat": rep,
                "images": report.images,
                "failed": len(report.failed),
                "wall_s": round(wall, 1),
                "images_per_s": round(report.images / wall, 1),
                "embed_s": round(report.embed_seconds, 1),
                "driver_peak_rss_mb": round(peak_rss_mb()),
                "ray_workers_peak_rss_mb": round(rss.peak),
                "load": round(os.getloadavg()[0], 1),
            }
            if report.ray:
                row.update(actors=report.ray["actors"], actor_cpus=report.ray["actor_cpus"])
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    shutil.rmtree(args.scratch / "scale_store", ignore_errors=True)
    medians = []
    for name, _ in runs:
        mine = [r for r in rows if r["run"] == name]
        med = dict(mine[0])
        for key in ("wall_s", "images_per_s", "embed_s"):
            med[key] = round(statistics.median(r[key] for r in mine), 1)
        med["repeats"] = len(mine)
        med.pop("repeat")
        medians.append(med)
    base = medians[0]["images_per_s"]
    for med in medians:
        med["vs_single"] = round(med["images_per_s"] / base, 2)
    return medians


# -- 2. IVF at scale --------------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vector_chunks(n: int, seed: int = 0, chunk: int = CHUNK):
    """(ids, vectors) chunks of a seeded mixture of 1,000 Gaussians, regenerated on demand."""
    centres = np.random.default_rng(seed).standard_normal((1000, DIM)).astype(np.float32)
    for c, start in enumerate(range(0, n, chunk)):
        rng = np.random.default_rng([seed, c])
        m = min(chunk, n - start)
        x = centres[rng.integers(0, 1000, m)] + 0.7 * rng.standard_normal((m, DIM), np.float32)
        yield np.arange(start, start + m, dtype=np.int64), unit(x)


def queries(nq: int, seed: int = 0) -> np.ndarray:
    centres = np.random.default_rng(seed).standard_normal((1000, DIM)).astype(np.float32)
    rng = np.random.default_rng([seed, 10**9])
    return unit(
        centres[rng.integers(0, 1000, nq)] + 0.7 * rng.standard_normal((nq, DIM), np.float32)
    )


def exact_top(n: int, xq: np.ndarray, k: int) -> np.ndarray:
    import faiss

    heap = faiss.ResultHeap(len(xq), k, keep_max=True)
    for ids, x in vector_chunks(n):
        d, i = faiss.knn(xq, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, ids[i])
    heap.finalize()
    return heap.I


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return round(
        sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth))
        / (len(truth) * k),
        4,
    )


def single_query_ms(index, xq: np.ndarray, k: int = 10) -> float:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        times = []
        for q in xq[:200]:
            t0 = time.perf_counter()
            index.search(q[None], k)
            times.append((time.perf_counter() - t0) * 1000)
        return round(statistics.median(times), 3)
    finally:
        faiss.omp_set_num_threads(before)


def index_bytes(index) -> int:
    import faiss

    inv = faiss.extract_index_ivf(index).invlists
    return int(sum(inv.list_size(i) for i in range(inv.nlist)) * (inv.code_size + 8))


def ivf_bench(n: int, args) -> list[dict]:
    import faiss
    import ray

    from lookalike.index.knn import KnnIndex, ivf_params, tune_nprobe
    from lookalike.scale.ray_index import fill_ivf_on_ray

    step = max(1, n // 100_000)
    t0 = time.perf_counter()
    train = np.concatenate([x[::step] for _, x in vector_chunks(n)])
    gen_s = time.perf_counter() - t0
    nlist, nprobe = ivf_params(len(train))
    xq = queries(args.nq)
    t0 = time.perf_counter()
    truth = exact_top(n, xq, 10)
    exact_s = time.perf_counter() - t0
    rows = []

    def row(name, index, build_s, rss_before):
        _, found = index.search(xq, 10)
        return {
            "vectors": n,
            "index": name,
            "nlist": nlist,
            "nprobe": index.nprobe,
            "build_s": round(build_s, 1),
            "index_mb": round(index_bytes(index) / 2**20),
            "rss_growth_mb": round(faiss.get_mem_usage_kb() / 1024 - rss_before),
            "query_ms_1thread": single_query_ms(index, xq),
            "recall_at_10": recall_at(found, truth),
            "load": round(os.getloadavg()[0], 1),
        }

    # as `lookalike index --ray` builds it: train here, fill on Ray tasks, merge, tune nprobe
    for tasks in args.tasks:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        rss0 = faiss.get_mem_usage_kb() / 1024
        t0 = time.perf_counter()
        trained = KnnIndex.empty(DIM, "ivf", train).index
        index = fill_ivf_on_ray(trained, vector_chunks(n), tasks)
        build = time.perf_counter() - t0
        ray.shutdown()
        rows.append(row(f"IVF-Flat, Ray {tasks} task(s), nprobe nlist/8", index, build, rss0))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        tuned = tune_nprobe(KnnIndex(index, "ivf"), lambda: vector_chunks(n), n)
        tune_s = time.perf_counter() - t0
        rows.append(row(f"IVF-Flat, Ray {tasks} task(s), tuned nprobe", index, build, rss0))
        rows[-1].update(tune_s=round(tune_s, 1), tuned_recall_stored=tuned["recall_at_10"])
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del index

    if not args.peers:
        return _finish(rows, exact_s, gen_s)
    # the same index filled by one sequential add (FAISS's own OpenMP threads)
    rss0 = faiss.get_mem_usage_kb() / 1024
    t0 = time.perf_counter()
    knn = KnnIndex.empty(DIM, "ivf", train)
    for ids, x in vector_chunks(n):
        knn.add(x, ids)
    rows.append(row("IVF-Flat, sequential add", knn.index, time.perf_counter() - t0, rss0))
    del knn
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    # IVF-PQ: 32 bytes a vector instead of 512 (not what lookalike builds: scores are approximate)
    rss0 = faiss.get_mem_usage_kb() / 1024
    t0 = time.perf_counter()
    pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(DIM), DIM, nlist, 32, 8, faiss.METRIC_INNER_PRODUCT)
    pq.train(train)
    pq.nprobe = nprobe
    for ids, x in vector_chunks(n):
        pq.add_with_ids(x, ids)
    rows.append(row("IVF-PQ32, sequential add", pq, time.perf_counter() - t0, rss0))
    del pq
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return _finish(rows, exact_s, gen_s)


def _finish(rows: list[dict], exact_s: float, gen_s: float) -> list[dict]:
    for r in rows:
        r["exact_scan_s"] = round(exact_s, 1)
        r["generate_train_s"] = round(gen_s, 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    e = sub.add_parser("embed", help="images/s: single process vs Ray actors")
    e.add_argument("--size", type=int, default=50_000)
    e.add_argument("--workers", default="1,2", help="Ray embedding actors per run, e.g. 1,2")
    e.add_argument("--repeats", type=int, default=1)
    e.add_argument("--template", type=Path, help="a trained store whose model every run uses")
    e.add_argument("--tiny", action="store_true", help="a tiny 1-epoch model (smoke tests)")
    v = sub.add_parser("ivf", help="IVF build / memory / ms per query / recall at 1M, 10M")
    v.add_argument("--vectors", default="1000000,10000000")
    v.add_argument("--nq", type=int, default=1000)
    v.add_argument("--tasks", default="2", help="parallel Ray fill tasks per run, e.g. 1,2")
    v.add_argument(
        "--no-peers",
        dest="peers",
        action="store_false",
        help="skip the sequential-add and IVF-PQ comparisons",
    )
    for p in (e, v):
        p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
        p.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
        p.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.time()
    result: dict = {"machine": machine(), "load_at_start": os.getloadavg()[0]}
    if args.what == "embed":
        args.workers = [int(w) for w in args.workers.split(",")]
        result["embed"] = embed_bench(args)
        print(markdown(result["embed"], list(result["embed"][0])))
    else:
        args.tasks = [int(t) for t in args.tasks.split(",")]
        rows = []
        for n in (int(x) for x in args.vectors.split(",")):
            rows += ivf_bench(n, args)
        result["ivf"] = rows
        print(markdown(rows, list(rows[0])))
    result["seconds"] = round(time.time() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
