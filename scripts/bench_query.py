#!/usr/bin/env python
"""Query latency in-process, and exact vs approximate kNN, in the manner of faiss's
benchs/bench_hnsw.py (ms/query and recall for each index and nprobe).

1. latency: Engine.search_bytes(file bytes, k=10) on stores of --sizes images (the stores
   scripts/bench_index.py leaves under --scratch, or built here the same way): p50 / p99 per
   run, median over --runs; embed (decode + encoder) and kNN are also timed apart. FAISS on
   one OpenMP thread (what Engine sets for single queries) and, interleaved, on the process's
   OpenMP default (the "_faiss<N>threads" columns).
2. knn: --vectors synthetic unit vectors of the model's dimension (128), flat (exact) vs IVF
   built as Store.rebuild_index builds it (trained on an even sample of at most 100k, nlist and
   nprobe from lookalike.index.knn.ivf_params), with an nprobe sweep: batched ms/query over --nq
   queries (OpenMP default), single-query ms (the API's case) on the OpenMP default and on one
   thread, R@1 and recall@10 against the flat answers.
   Two distributions: "gaussian" (isotropic, like whitened embeddings) and "clustered"
   (a mixture of 1,000 Gaussians), plus the real embeddings of the largest store if it has
   20k or more.

Examples:
  python scripts/bench_query.py                                        # full
  python scripts/bench_query.py --sizes 200 --tiny --vectors 3000 --nq 50 --runs 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from bench_index import DEFAULT_SCRATCH, DEFAULT_SOURCE, machine, make_collection, markdown

DIM = 128
SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def ensure_store(size: int, args) -> Path:
    """The bench store of this size, built with bench_index's collection when missing."""
    store = args.scratch / f"store_{size}"
    if (store / "info.json").exists():
        return store
    from bench_index import model_config

    from lookalike.indexer import index_folder

    photos = make_collection(args.source, args.scratch, size)
    print(f"indexing {size} images into {store} ...", file=sys.stderr, flush=True)
    index_folder(photos, store, model=model_config(args.tiny, args.epochs))
    return store


def _openmp_default() -> int:
    import faiss

    return faiss.omp_get_max_threads()


# FAISS's OpenMP threads before anything changes them (Engine sets one thread process-wide)
OPENMP_DEFAULT = _openmp_default()


def faiss_threads() -> int:
    """The OpenMP default of this process: what FAISS uses unless told otherwise."""
    return OPENMP_DEFAULT


@contextmanager
def omp_threads(n: int):
    """FAISS's OpenMP threads set to n for the block."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _latency_run(engine, blobs: list[bytes]) -> dict:
    """One pass over the queries: whole search_bytes, and its embed and kNN halves apart."""
    total, embed, knn = [], [], []
    for data in blobs:
        t0 = time.perf_counter()
        vec = engine.embed_bytes(data)
        t1 = time.perf_counter()
        engine.search_vectors(vec[None], 10)
        t2 = time.perf_counter()
        engine.search_bytes(data, 10)
        t3 = time.perf_counter()
        total.append((t3 - t2) * 1e3)
        embed.append((t1 - t0) * 1e3)
        knn.append((t2 - t1) * 1e3)
    return {
        "p50_ms": _p(total, 50),
        "p99_ms": _p(total, 99),
        "embed_p50_ms": _p(embed, 50),
        "knn_p50_ms": _p(knn, 50),
        "knn_p99_ms": _p(knn, 99),
    }


def latency(size: int, args) -> dict:
    """p50 / p99 ms of Engine.search_bytes over a seeded sample of the store's own files."""
    from lookalike.engine import Engine

    store = ensure_store(size, args)
    engine = Engine.open(store)
    try:
        records = list(engine.store.db.records())
        rng = np.random.default_rng(0)
        pick = rng.choice(len(records), min(args.queries, len(records)), replace=False)
        blobs = [engine.store.file_path(records[i].path).read_bytes() for i in pick]
        for data in blobs[:5]:  # warm-up: tf.function tracing, caches
            engine.search_bytes(data, 10)
        runs: dict[int, list[dict]] = {}
        for _ in range(args.runs):
            for threads in (1, faiss_threads()):  # interleaved, so both see the same load
                with omp_threads(threads):
                    runs.setdefault(threads, []).append(_latency_run(engine, blobs))
        out = {
            "images": len(records),
            "queries": len(blobs),
            "index": engine.store.info["index_type"],
        }
        for threads, rs in runs.items():
            suffix = "" if threads == 1 else f"_faiss{threads}threads"  # 1: what Engine uses
            for key in rs[0]:
                out[key + suffix] = statistics.median(r[key] for r in rs)
        out["openmp_default_threads"] = faiss_threads()
        return out
    finally:
        engine.close()


# -- exact vs approximate ------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(kind: str, n: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 128) base and (nq, 128) query unit vectors, disjoint, from one distribution."""
    rng = np.random.default_rng(seed)
    total = n + nq
    if kind == "gaussian":
        x = np.empty((total, DIM), np.float32)
        for s in range(0, total, 200_000):
            x[s : s + 200_000] = rng.standard_normal((min(200_000, total - s), DIM))
    else:  # clustered: 1,000 centres, each point a centre plus noise of similar size
        centres = rng.standard_normal((1000, DIM)).astype(np.float32)
        x = np.empty((total, DIM), np.float32)
        for s in range(0, total, 200_000):
            m = min(200_000, total - s)
            x[s : s + m] = centres[rng.integers(0, 1000, m)] + 0.7 * rng.standard_normal((m, DIM))
    x = unit(x)
    return x[:n], x[n:]


def ivf_like_store(xb: np.ndarray):
    """IVF as Store.rebuild_index makes it: trained on every step-th vector (<= 100k)."""
    from lookalike.index.knn import KnnIndex

    step = max(1, len(xb) // 100_000)
    knn = KnnIndex.empty(xb.shape[1], "ivf", xb[::step])
    knn.add(xb, np.arange(len(xb)))
    return knn


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    """R@1 (the true nearest is ranked first) and recall@k (|found_k & true_k| / k), averaged."""
    r1 = float((found[:, 0] == truth[:, 0]).mean())
    rk = np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)])
    return r1, float(rk)


def single_ms(knn, xq: np.ndarray, threads: int | None = None, n: int = 100) -> float:
    """Median ms of one-query searches (what one API request does), FAISS on `threads`."""
    times = []
    with omp_threads(threads or faiss_threads()):
        knn.search(xq[:1], 10)
        for q in xq[:n]:
            t0 = time.perf_counter()
            knn.search(q[None], 10)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def batched_ms(knn, xq: np.ndarray, runs: int) -> tuple[float, np.ndarray]:
    """Median over runs of ms/query for one search of all queries (FAISS on its OpenMP
    default), and the ids found."""
    with omp_threads(faiss_threads()):
        knn.search(xq[:10], 10)  # warm-up: OpenMP threads, caches
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            _, ids = knn.search(xq, 10)
            times.append((time.perf_counter() - t0) * 1e3 / len(xq))
    return statistics.median(times), ids


def knn_bench(name: str, xb: np.ndarray, xq: np.ndarray, args) -> list[dict]:
    """Flat, then IVF at every nprobe of the sweep and the default; one row each."""
    from lookalike.index.knn import AUTO_IVF_THRESHOLD, KnnIndex, ivf_params

    n = len(xb)
    rows = []
    t0 = time.perf_counter()
    flat = KnnIndex.build(DIM, "flat", xb, np.arange(n))
    build_flat = time.perf_counter() - t0
    ms, truth = batched_ms(flat, xq, args.runs)
    rows.append(
        {
            "vectors": name,
            "n": n,
            "index": "flat",
            "nprobe": "-",
            "batched_ms_per_query": ms,
            "single_query_ms": single_ms(flat, xq),
            "single_query_ms_1thread": single_ms(flat, xq, 1),
            "R@1": 1.0,
            "recall@10": recall(truth, truth, 10)[1],
            "build_s": build_flat,
        }
    )
    del flat
    t0 = time.perf_counter()
    ivf = ivf_like_store(xb)
    build_ivf = time.perf_counter() - t0
    nlist = ivf.index.nlist
    default = ivf.index.nprobe
    probes = sorted({p for p in SWEEP if p <= nlist} | {default})
    for nprobe in probes:
        ivf.index.nprobe = nprobe
        ms, ids = batched_ms(ivf, xq, args.runs)
        r1, r10 = recall(ids, truth, 10)
        rows.append(
            {
                "vectors": name,
                "n": n,
                "index": "ivf" + (" (default)" if nprobe == default else ""),
                "nlist": nlist,
                "nprobe": nprobe,
                "batched_ms_per_query": ms,
                "single_query_ms": single_ms(ivf, xq),
                "single_query_ms_1thread": single_ms(ivf, xq, 1),
                "R@1": r1,
                "recall@10": r10,
                "build_s": build_ivf,
            }
        )
    ivf.index.nprobe = default
    build_nlist = ivf_params(n)[0]
    if build_nlist != nlist:
        rows[-1]["note"] = (
            f"KnnIndex.build on all {n} would use nlist {build_nlist}; the store trains on "
            f"a sample of {len(xb[:: max(1, n // 100_000)])} and uses nlist {nlist}"
        )
    print(f"  {name} n={n} done (auto threshold {AUTO_IVF_THRESHOLD})", file=sys.stderr, flush=True)
    return rows


def real_vectors(args) -> tuple[str, np.ndarray, np.ndarray] | None:
    """The largest bench store's embeddings: queries are its first nq, the base the rest."""
    from lookalike.store import Store

    stores = sorted(
        (int(p.name.split("_")[1]), p)
        for p in args.scratch.glob("store_*")
        if (p / "info.json").exists()
    )
    if not stores or stores[-1][0] < 20_000:
        return None
    size, path = stores[-1]
    with Store.open(path) as st:
        if st.dim != DIM:
            return None
        vecs = np.concatenate([v for _, v in st.db.embeddings(st.dim)])
    rng = np.random.default_rng(0)
    vecs = vecs[rng.permutation(len(vecs))]
    return f"real ({size} store)", vecs[args.nq :], vecs[: args.nq]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    ap.add_argument("--sizes", default="10000,50000", help="store sizes for latency")
    ap.add_argument("--queries", type=int, default=200, help="latency queries per run")
    ap.add_argument("--vectors", default="100000,1000000", help="synthetic collection sizes")
    ap.add_argument("--distributions", default="gaussian,clustered")
    ap.add_argument("--nq", type=int, default=1000, help="queries for the kNN comparison")
    ap.add_argument("--runs", type=int, default=3, help="repetitions (median)")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs of a missing store")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke tests)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()
    load_before = os.getloadavg()

    lat = []
    for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
        print(f"latency at {size} ...", file=sys.stderr, flush=True)
        lat.append(latency(size, args))
    knn_rows = []
    for n in [int(s) for s in args.vectors.split(",") if s.strip()]:
        for dist in args.distributions.split(","):
            xb, xq = synthetic(dist, n, args.nq)
            knn_rows += knn_bench(dist, xb, xq, args)
            del xb, xq
    real = real_vectors(args)
    if real is not None:
        knn_rows += knn_bench(*real, args)

    data = {
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "runs": args.runs,
        "load_average_1_5_15": {"start": load_before, "end": os.getloadavg()},
        "latency": lat,
        "knn": knn_rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    lat_keys = ["images", "index", "queries", "p50_ms", "p99_ms", "embed_p50_ms", "knn_p50_ms"]
    many = f"_faiss{faiss_threads()}threads"
    lat_keys += ["knn_p99_ms", "p50_ms" + many, "p99_ms" + many]
    lat_keys += ["knn_p50_ms" + many, "knn_p99_ms" + many]
    print(markdown(lat, lat_keys))
    print()
    keys = ["vectors", "n", "index", "nlist", "nprobe", "batched_ms_per_query", "single_query_ms"]
    keys.append("single_query_ms_1thread")
    print(markdown(knn_rows, keys + ["R@1", "recall@10", "build_s"]))
    for row in knn_rows:
        if "note" in row:
            print(f"note: {row['note']}")


if __name__ == "__main__":
    main()
