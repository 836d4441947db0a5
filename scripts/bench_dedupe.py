"""Benchmark dedupe: quality against labelled near-duplicates, and grouping time/memory at scale.

Quality (needs a store indexed from a labelled folder; groups.csv has file,group_id[,variant]):

    lookalike index /work/shared/datasets/intel_neardup/images --store /tmp/nd_store
    python scripts/bench_dedupe.py quality --store /tmp/nd_store \
        --labels /work/shared/datasets/intel_neardup/groups.csv

prints pair precision / recall / F1 of ``find_groups`` at the store's default threshold and
over a sweep, and of pHash (imagehash.phash, Hamming distance <= 10, joined by the same
union-find) in the same run; ``--seeds N`` also re-runs the threshold calibration with N seeds.

Scale (synthetic unit vectors with planted near-duplicate clusters, no TensorFlow):

    python scripts/bench_dedupe.py scale --sizes 10000 50000 100000 --repeats 3

builds one store per size, then times ``find_groups`` in fresh processes and reports the
median time and the peak resident memory of the process (and what an n x n float32 matrix
would need).
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

from lookalike.index.dedupe import UnionFind, default_threshold, find_groups
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
    uf = UnionFind(len(files))
    table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)
    for i in range(len(files)):
        dist = table[packed[i] ^ packed[i + 1 :]].sum(1)
        for j in np.nonzero(dist <= max_distance)[0]:
            uf.union(i, i + 1 + int(j))
    return [[files[i].name for i in comp] for comp in uf.components()]


def model_groups(store: Store, threshold: float) -> list[list[str]]:
    return [[Path(m.path).name for m in g.members] for g in find_groups(store, threshold)]


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
            f"{label:<34} P={result['precision']:.3f} R={result['recall']:.3f} "
            f"F1={result['f1']:.3f} pairs={result['pairs']}{extra}"
        )

    started = time.perf_counter()
    ours = prf(pairs_of(model_groups(store, t)), truth)
    seconds = time.perf_counter() - started
    photos = store.photos_root
    files = sorted(photos / r["file"] for r in rows)
    started = time.perf_counter()
    ph = prf(pairs_of(phash_groups(files)), truth)
    ph_seconds = time.perf_counter() - started
    line(f"lookalike @ default {t:.4f}", ours, f"  ({seconds:.2f} s)")
    line("pHash, Hamming <= 10", ph, f"  ({ph_seconds:.2f} s)")
    ok = ours["precision"] >= 0.95 and ours["recall"] > ph["recall"]
    print(f"done-when (P >= 0.95 and R > pHash R): {'MET' if ok else 'NOT MET'}")

    print("\nsweep (labels used here only):")
    best = None
    for s in np.round(np.arange(args.sweep_from, 0.9901, 0.0125), 4):
        r = prf(pairs_of(model_groups(store, float(s))), truth)
        line(f"  lookalike @ {s:.4f}", r)
        if r["precision"] >= 0.95 and (best is None or r["recall"] > best[1]["recall"]):
            best = (float(s), r)
    if best:
        print(
            f"best threshold with P >= 0.95 on these labels: {best[0]:.4f} "
            f"(R={best[1]['recall']:.3f})"
        )

    if args.seeds:
        from lookalike.calibrate import calibrate

        embedder = store.load_embedder()
        print(f"\ncalibration with {args.seeds} seeds:")
        for seed in range(args.seeds):
            cal = calibrate(store, embedder, seed=seed)
            line(
                f"  seed {seed}: threshold {cal.threshold:.4f}",
                prf(pairs_of(model_groups(store, cal.threshold)), truth),
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
    store = Store.open(root, create=True, photos=root)
    store.info["embedding_dim"] = dim
    records = (
        (ImageRecord(0, f"img/{i:07d}.jpg", 1000 + i, 0.0, f"{i:064x}", 64, 48), vecs[i])
        for i in range(n)
    )
    store.db.write(records)
    store.rebuild_index("flat")
    store.close()
    return planted


def group_once(root: str, threshold: float) -> None:
    """Child process: open the store, group, print JSON facts."""
    store = Store.open(root)
    _ = store.index
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    groups = find_groups(store, threshold)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "seconds": seconds,
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
        f"{'n':>8} {'planted':>8} {'groups':>8} {'seconds':>8} {'RSS before':>11} "
        f"{'RSS peak':>9} {'n x n f32':>10}"
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
            before = statistics.median(r["rss_before_mb"] for r in runs)
            peak = statistics.median(r["rss_peak_mb"] for r in runs)
            print(
                f"{n:>8} {planted:>8} {runs[0]['groups']:>8} {secs:>8.2f} "
                f"{before:>9.0f}MB {peak:>7.0f}MB {n * n * 4 / 2**30:>8.1f}GB",
                flush=True,
            )


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
    g = sub.add_parser("_group")
    g.add_argument("root")
    g.add_argument("threshold", type=float)
    args = parser.parse_args()
    if args.cmd == "quality":
        quality(args)
    elif args.cmd == "scale":
        scale(args)
    else:
        group_once(args.root, args.threshold)


if __name__ == "__main__":
    main()
