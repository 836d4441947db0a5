#!/usr/bin/env python
"""The embedding runtime: onnxruntime (the store's model/embed.onnx) against TensorFlow (the
Keras encoder in a tf.function, what every path ran before), on one store's model.

Each runtime runs in a fresh child process, --runs times, alternating (ort, tf, ort, tf, ...);
the table gives medians. Per child:
  import    seconds to import the runtime (onnxruntime; tensorflow + keras + the model code)
  load      seconds to load the store's model (InferenceSession; keras.models.load_model)
  first     seconds of the first call on one image (the first trace for TF)
  query     single-query latency: one image (all its views) per call, --queries calls, p50/p99 ms
  batch     throughput on --batch images per call, images/s (all cores)
  rss       peak resident memory of the child at the end, MB

Example (the store must be trained):
  python scripts/bench_runtime.py --store S --runs 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def child(runtime: str, store: Path, queries: int, batch: int) -> dict:
    t0 = time.perf_counter()
    from lookalike.config import ModelConfig  # noqa: F401  (light; counted in both)

    if runtime == "ort":
        import onnxruntime  # noqa: F401
    else:
        from lookalike.encoder import embed  # tensorflow + keras + the model code
    t1 = time.perf_counter()
    cfg = ModelConfig.from_dict(json.loads((store / "model" / "config.json").read_text()))
    if runtime == "ort":
        from lookalike.encoder.runtime import PortableEmbedder

        embedder = PortableEmbedder(store / "model" / "embed.onnx", cfg)
    else:
        embedder = embed.Embedder.load(
            store / "model" / "encoder.keras", store / "model" / "whitening.npz", cfg
        )
    t2 = time.perf_counter()
    rng = np.random.default_rng(0)
    s = cfg.image_size
    one = rng.integers(0, 256, (1, s, s, 3), dtype=np.uint8)
    embedder(one)
    t3 = time.perf_counter()
    times = []
    for _ in range(queries):
        q0 = time.perf_counter()
        embedder(one)
        times.append(time.perf_counter() - q0)
    many = rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)
    embedder(many)  # warm the batch path
    b0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        embedder(many)
    rate = reps * batch / (time.perf_counter() - b0)
    return {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "first_s": t3 - t2,
        "query_p50_ms": 1000 * float(np.percentile(times, 50)),
        "query_p99_ms": 1000 * float(np.percentile(times, 99)),
        "batch_img_s": rate,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--child", choices=("ort", "tf"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.store, args.queries, args.batch)))
        return
    results: dict[str, list[dict]] = {"ort": [], "tf": []}
    for run in range(args.runs):
        for runtime in results:
            cmd = [sys.executable, __file__, "--store", str(args.store), "--child", runtime]
            cmd += ["--queries", str(args.queries), "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[runtime].append(json.loads(out.strip().splitlines()[-1]))
            print(f"run {run + 1} {runtime}: {results[runtime][-1]}", file=sys.stderr)
    keys = list(results["ort"][0])
    print("| runtime | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for runtime, rows in results.items():
        med = [statistics.median(r[k] for r in rows) for k in keys]
        print(f"| {runtime} | " + " | ".join(f"{v:.3g}" for v in med) + " |")
    ratio = [
        statistics.median(results["tf"][i][k] / results["ort"][i][k] for i in range(args.runs))
        for k in keys
    ]
    print("| tf / ort (pairwise median) | " + " | ".join(f"{v:.3g}" for v in ratio) + " |")


if __name__ == "__main__":
    main()
