"""Benchmark dedupe: quality against labelled near-duplicates, and grouping time/memory at scale.

Quality (needs a store indexed from a labelled folder; groups.csv has file,group_id[,variant]):

    lookalike index ../shared/datasets/intel_neardup/images --store /tmp/nd_store
    python scripts/bench_dedupe.py quality --store /tmp/nd_store \
        --labels ../shared/datasets/intel_neardup/groups.csv

prints pair precision / recall / F1 in one run of: ``find_groups`` at the store's default
threshold fused with pHash evidence (cosine >= t or pHash distance <= PHASH_MAX, the default of
``lookalike dedupe``), the same cosine-only, the store's own pHashes alone, and pHash computed
from the files (imagehash.phash, Hamming distance <= 10, joined by the same union-find); then
both over a threshold sweep. ``--seeds N`` also re-runs the threshold calibration with N seeds.

Scale (synthetic unit vectors with planted near-duplicate clusters, no TensorFlow):

    python scripts/bench_dedupe.py scale --sizes 10000 50000 100000 --repeats 3

builds one store per size, then times ``find_groups`` in fresh processes and reports the
median time and the peak resident memory of the process (and what an n x n float32 matrix
would need).

Verification (a trained, indexed store; cold: the cache is neither read nor written):

    python scripts/bench_dedupe.py verify --store S10k --modes threads:1 threads:2 processes:2

matches every candidate pair dedupe verifies at the store's defaults once per mode, each run in
a fresh process, modes interleaved; prints wall and CPU seconds, peak RSS and the photos
described (each once with threads; processes re-read the photos two slices share).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from lookalike.dedupe.grouping import PHASH_MAX, default_threshold, find_groups
from lookalike.dedupe.pairs import hash_links
from lookalike.index.meta import ImageRecord
from lookalike.store import Store


# -- quality -----------------------------------------------------------------------------------
def pairs_of(groups: list[list[str]]) -> set[tuple[str, str]]:
    """Every unordered pair of names inside each group."""
    out = set()
    for g in groups:
        out.update(tuple(sorted(p)) for p in itertools.combinations(g, 2))
    return out


def prf(pred: set, truth: set) -> dict[str, float]:
    tp = len(pred & truth)
    p = tp / len(pred) if pred else 1.0
    r = tp / len(truth) if truth else 1.0
    return {
        "precision": p,
        "recall": r,
        "f1": 2 * p * r / (p + r) if p + r else 0.0,
        "pairs": len(pred),
    }


def phash_groups(files: list[Path], max_distance: int = 10) -> list[list[str]]:
    """Union-find components of the pairs with pHash Hamming distance <= max_distance."""
    import imagehash
    from PIL import Image

    bits = np.array([imagehash.phash(Image.open(f)).hash.ravel() for f in files], dtype=bool)
    packed = np.packbits(bits, axis=1)  # (n, 8) uint8
    table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)
    a, b = [], []
    for i in range(len(files)):
        dist = table[packed[i] ^ packed[i + 1 :]].sum(1)
        for j in np.nonzero(dist <= max_distance)[0]:
            a.append(i)
            b.append(i + 1 + int(j))
    return [[files[i].name for i in comp] for comp in components(len(files), a, b)]


def components(n: int, a, b) -> list[list[int]]:
    """Connected components (of two or more) of n items joined by the pairs (a[k], b[k])."""
    graph = coo_array((np.ones(len(a)), (np.asarray(a), np.asarray(b))), shape=(n, n))
    labels = connected_components(graph, directed=False)[1]
    comps: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        comps.setdefault(label, []).append(i)
    return [c for c in comps.values() if len(c) > 1]


def model_groups(store: Store, threshold: float, phash_max: int | None) -> list[list[str]]:
    groups = find_groups(store, threshold, phash_max=phash_max)
    return [[Path(m.path).name for m in g.members] for g in groups]


def stored_phash_groups(store: Store, max_distance: int = PHASH_MAX) -> list[list[str]]:
    """Components of the store's own pHashes (from the decoded pixels) alone."""
    ids, hashes = store.db.phashes()
    names = {rec.id: Path(rec.path).name for rec in store.db.records()}
    comps = components(len(ids), *hash_links(hashes, max_distance))
    return [[names[int(ids[i])] for i in comp] for comp in comps]


def quality(args: argparse.Namespace) -> None:
    rows = list(csv.DictReader(open(args.labels)))
    by_group: dict[str, list[str]] = {}
    for r in rows:
        by_group.setdefault(r["group_id"], []).append(r["file"])
    truth = pairs_of(list(by_group.values()))
    store = Store.open(args.store)
    names = {Path(rec.path).name for rec in store.db.records()}
    missing = {r["file"] for r in rows} - names
    if missing:
        sys.exit(f"{len(missing)} labelled files are not in the store, e.g. {sorted(missing)[:3]}")
    t = default_threshold(store)
    cal = store.info.get("dedupe_calibration")
    print(f"store {store.root}: {len(names)} images, {len(truth)} true pairs")
    print(f"calibration: {json.dumps(cal)}")

    def line(label: str, result: dict[str, float], extra: str = "") -> None:
        print(
            f"{label:<44} P={result['precision']:.3f} R={result['recall']:.3f} "
            f"F1={result['f1']:.3f} pairs={result['pairs']}{extra}"
        )

    def timed(fn, *a) -> tuple[dict[str, float], str]:
        started = time.perf_counter()
        result = prf(pairs_of(fn(*a)), truth)
        return result, f"  ({time.perf_counter() - started:.2f} s)"

    fused, fused_s = timed(model_groups, store, t, PHASH_MAX)
    cosine, cosine_s = timed(model_groups, store, t, None)
    stored, stored_s = timed(stored_phash_groups, store)
    files = sorted(store.photos_root / r["file"] for r in rows)
    ph, ph_seconds = timed(phash_groups, files)
    line(f"lookalike @ default {t:.4f} + pHash <= {PHASH_MAX}", fused, fused_s)
    line(f"lookalike @ default {t:.4f}, cosine only", cosine, cosine_s)
    line(f"stored pHash alone, Hamming <= {PHASH_MAX}", stored, stored_s)
    line("pHash of the files, Hamming <= 10", ph, ph_seconds)
    for label, ours in (("fused", fused), ("cosine only", cosine)):
        ok = ours["precision"] >= 0.95 and ours["recall"] > ph["recall"]
        print(f"done-when, {label} (P >= 0.95 and R > pHash R): {'MET' if ok else 'NOT MET'}")

    print("\nsweep (labels used here only):           cosine only  |  + pHash")
    best: dict[str, tuple[float, dict[str, float]]] = {}
    for s in np.round(np.arange(args.sweep_from, 0.9901, 0.0125), 4):
        row = []
        for label, phash_max in (("cosine only", None), ("fused", PHASH_MAX)):
            r = prf(pairs_of(model_groups(store, float(s), phash_max)), truth)
            row.append(f"P={r['precision']:.3f} R={r['recall']:.3f}")
            if r["precision"] >= 0.95 and (
                label not in best or r["recall"] > best[label][1]["recall"]
            ):
                best[label] = (float(s), r)
        print(f"  lookalike @ {s:.4f}   {row[0]}  |  {row[1]}")
    for label, (s, r) in best.items():
        print(
            f"best threshold with P >= 0.95 on these labels, {label}: {s:.4f} (R={r['recall']:.3f})"
        )

    if args.seeds:
        from lookalike.dedupe.calibration import calibrate

        embedder = store.load_embedder()
        print(f"\ncalibration with {args.seeds} seeds:")
        for seed in range(args.seeds):
            cal = calibrate(store, embedder, seed=seed)
            for label, phash_max in (("cosine only", None), ("fused", PHASH_MAX)):
                line(
                    f"  seed {seed}: threshold {cal.threshold:.4f}, {label}",
                    prf(pairs_of(model_groups(store, cal.threshold, phash_max)), truth),
                )


# -- scale -------------------------------------------------------------------------------------
def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """n unit vectors: 10 % of them in planted clusters of 2-5 near copies (cos ~0.9-0.99)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    planted, i = 0, 0
    while i < n // 10:
        size = int(rng.integers(2, 6))
        for j in range(i + 1, min(i + size, n)):
            noise = rng.standard_normal(dim).astype(np.float32)
            # base + sigma * (a near-orthogonal unit vector): cos = 1 / sqrt(1 + sigma^2)
            x[j] = x[i] + rng.uniform(0.15, 0.45) * noise / np.linalg.norm(noise)
        planted += 1
        i += size
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[rng.permutation(n)], planted


def build_store(root: Path, n: int, dim: int) -> int:
    vecs, planted = synthetic(n, dim)
    # random 64-bit pHashes, so the grouping timed includes the banded pHash search
    hashes = np.random.default_rng(1).integers(-(2**63), 2**63 - 1, n, dtype=np.int64).tolist()
    store = Store.open(root, create=True, photos=root)
    store.info["embedding_dim"] = dim
    records = (
        (
            ImageRecord(0, f"img/{i:07d}.jpg", 1000 + i, 0.0, f"{i:064x}", 64, 48, phash=h),
            vecs[i],
        )
        for i, h in enumerate(hashes)
    )
    store.db.write(records)
    store.rebuild_index("flat")
    store.close()
    return planted


def group_once(root: str, threshold: float) -> None:
    """Child process: open the store, group, print JSON facts."""
    store = Store.open(root)
    _ = store.index
    usage = resource.getrusage(resource.RUSAGE_SELF)
    base, cpu0 = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    started = time.perf_counter()
    groups = find_groups(store, threshold)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime - cpu0
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "groups": len(groups),
                "rss_before_mb": base / 1024,
                "rss_peak_mb": peak / 1024,
            }
        )
    )


def scale(args: argparse.Namespace) -> None:
    print(
        f"find_groups on synthetic {args.dim}-d unit vectors, flat index, threshold "
        f"{args.threshold}; median of {args.repeats} runs, each in a fresh process; "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'n':>8} {'planted':>8} {'groups':>8} {'seconds':>8} {'CPU s':>7} {'RSS before':>11} "
        f"{'RSS peak':>9} {'n x n f32':>10}  load"
    )
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-dedupe-") as tmp:
            root = Path(tmp) / "store"
            planted = build_store(root, n, args.dim)
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, __file__, "_group", str(root), str(args.threshold)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            secs = statistics.median(r["seconds"] for r in runs)
            cpu = statistics.median(r["cpu_seconds"] for r in runs)
            before = statistics.median(r["rss_before_mb"] for r in runs)
            peak = statistics.median(r["rss_peak_mb"] for r in runs)
            print(
                f"{n:>8} {planted:>8} {runs[0]['groups']:>8} {secs:>8.2f} {cpu:>7.2f} "
                f"{before:>9.0f}MB {peak:>7.0f}MB {n * n * 4 / 2**30:>8.1f}GB  "
                f"{os.getloadavg()[0]:.1f}",
                flush=True,
            )


# -- verification: threads vs processes, cold, on a real store --------------------------------
def _content_pairs(store: Store) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The (sha_a <= sha_b) pairs dedupe verifies at the store's defaults, in the verifier's
    order, and a path of each content."""
    from lookalike.dedupe.grouping import BAND
    from lookalike.dedupe.verification import _key, _local_order, candidates

    pairs = candidates(store, default_threshold(store) + BAND)
    records = store.db.get_many({i for p in pairs for i in p})
    keys = {_key(records[a].sha256, records[b].sha256) for a, b in pairs}
    paths = {r.sha256: r.path for r in sorted(records.values(), key=lambda r: -r.id)}
    return _local_order(sorted(keys)), paths


def _slice_worker(root: str, todo: list, paths: dict) -> int:
    """Process-pool worker: match a slice of pairs with one thread, save nothing; returns
    the photos it described."""
    from lookalike.dedupe import verification

    calls = []
    real = verification.describe
    verification.describe = lambda data: calls.append(1) or real(data)
    with Store.open(root) as store:
        verifier = verification.Verifier(store, workers=1)
        verifier._save = lambda rows: []
        verifier._match(todo, paths)
    return len(calls)


def verify_once(root: str, mode: str, limit: int | None = None) -> None:
    """Child process: match every pair dedupe verifies, cold (no cache), with mode
    'threads:N' or 'processes:N'; print JSON facts."""
    from concurrent.futures import ProcessPoolExecutor

    from lookalike.dedupe import verification

    kind, workers = mode.split(":")
    workers = int(workers)
    store = Store.open(root)
    _ = store.index
    todo, paths = _content_pairs(store)
    todo = todo[:limit]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    started = time.perf_counter()
    if kind == "threads":
        calls = []
        real = verification.describe
        verification.describe = lambda data: calls.append(1) or real(data)
        verifier = verification.Verifier(store, workers=workers)
        verifier._save = lambda rows: []
        verifier._match(todo, paths)
        described = len(calls)
    else:  # contiguous slices of the local order: photos shared by two slices are read twice
        step = -(-len(todo) // workers)
        with ProcessPoolExecutor(workers) as pool:
            done = pool.map(
                _slice_worker,
                [root] * workers,
                [todo[i : i + step] for i in range(0, len(todo), step)],
                [paths] * workers,
            )
            described = sum(done)
    seconds = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime - cpu0 + kids.ru_utime + kids.ru_stime
    print(
        json.dumps(
            {
                "mode": mode,
                "pairs": len(todo),
                "photos": len({s for p in todo for s in p}),
                "described": described,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "rss_peak_mb": own.ru_maxrss / 1024,
                "children_rss_peak_mb": kids.ru_maxrss / 1024,
            }
        )
    )


def verify(args: argparse.Namespace) -> None:
    print(
        f"verification of every pair dedupe verifies on {args.store}, cold (cache not read or "
        f"written), each run in a fresh process, modes interleaved; {os.cpu_count()} CPUs"
    )
    for _ in range(args.repeats):
        for mode in args.modes:
            out = subprocess.run(
                [sys.executable, __file__, "_verify", str(args.store), mode, str(args.limit)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            facts = json.loads(out.strip().splitlines()[-1])
            facts["load"] = round(os.getloadavg()[0], 1)
            print(json.dumps(facts), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality", help="pair precision/recall against labels, and pHash")
    q.add_argument("--store", required=True, type=Path)
    q.add_argument("--labels", required=True, type=Path)
    q.add_argument("--sweep-from", type=float, default=0.75)
    q.add_argument("--seeds", type=int, default=0, help="re-calibrate with this many seeds")
    s = sub.add_parser("scale", help="grouping time and memory on synthetic vectors")
    s.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    s.add_argument("--dim", type=int, default=128)
    s.add_argument("--threshold", type=float, default=0.85)
    s.add_argument("--repeats", type=int, default=3)
    v = sub.add_parser("verify", help="cold verification time: threads vs processes")
    v.add_argument("--store", required=True, type=Path)
    v.add_argument("--modes", nargs="+", default=["threads:1", "threads:2", "processes:2"])
    v.add_argument("--repeats", type=int, default=2)
    v.add_argument("--limit", type=int, default=0, help="the first N pairs only (0: all)")
    vo = sub.add_parser("_verify")
    vo.add_argument("root")
    vo.add_argument("mode")
    vo.add_argument("limit", type=int)
    g = sub.add_parser("_group")
    g.add_argument("root")
    g.add_argument("threshold", type=float)
    args = parser.parse_args()
    if args.cmd == "quality":
        quality(args)
    elif args.cmd == "scale":
        scale(args)
    elif args.cmd == "verify":
        verify(args)
    elif args.cmd == "_verify":
        verify_once(args.root, args.mode, args.limit or None)
    else:
        group_once(args.root, args.threshold)


if __name__ == "__main__":
    main()
