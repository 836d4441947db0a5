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

With --eval PHOTOS (labelled photos, PHOTOS/<label>/<file>), instead: every photo embedded by
both runtimes in this process, the lowest cosine between the two embeddings of a photo, and the
retrieval figures of `lookalike eval retrieval` (p@1, p@10, map@10, knn_top1, knn_top3; each
photo queries the others, exact inner product) computed on each runtime's embeddings.

Example (the store must be trained):
  python scripts/bench_runtime.py --store S --runs 5
  python scripts/bench_runtime.py --store S --eval ../shared/datasets/intel_scenes/images
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


def model_dir(store: Path) -> Path:
    """The folder of the store's current model (STORE/model-N)."""
    state = json.loads((store / "info.json").read_text())
    return store / f"model-{state.get('model_serial', 0)}"


def child(runtime: str, store: Path, queries: int, batch: int) -> dict:
    t0 = time.perf_counter()
    from lookalike.config import ModelConfig  # noqa: F401  (light; counted in both)

    if runtime == "ort":
        import onnxruntime  # noqa: F401
    else:
        from lookalike.encoder import embed  # tensorflow + keras + the model code
    t1 = time.perf_counter()
    model = model_dir(store)
    cfg = ModelConfig.from_dict(json.loads((model / "config.json").read_text()))
    if runtime == "ort":
        from lookalike.encoder.runtime import PortableEmbedder

        embedder = PortableEmbedder(model / "embed.onnx", cfg)
    else:
        embedder = embed.Embedder.load(model / "encoder.keras", model / "whitening.npz", cfg)
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


class ExactRanker:
    """Each row's nearest other rows by inner product (what eval's rankers answer)."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def neighbours(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        sims = self.vectors[queries] @ self.vectors.T
        sims[np.arange(len(queries)), queries] = -np.inf  # not itself
        idx = np.argsort(-sims, axis=1, kind="stable")[:, :m]
        return idx, np.take_along_axis(sims, idx, axis=1)


def eval_both(store: Path, photos: Path) -> dict:
    """Retrieval figures of the same photos embedded by onnxruntime and by TensorFlow."""
    from lookalike.config import ModelConfig
    from lookalike.encoder.embed import Embedder
    from lookalike.encoder.runtime import PortableEmbedder
    from lookalike.evaluation.run import label_of, retrieval_scores
    from lookalike.images import find_images, iter_batches

    model = model_dir(store)
    cfg = ModelConfig.from_dict(json.loads((model / "config.json").read_text()))
    runtimes = {
        "ort": PortableEmbedder(model / "embed.onnx", cfg),
        "tf": Embedder.load(model / "encoder.keras", model / "whitening.npz", cfg),
    }
    paths = sorted(find_images(photos))
    rels, out = [], {name: [] for name in runtimes}
    for ok, _bad in iter_batches(paths, cfg.image_size, 256):
        pixels = np.stack([im.pixels for im in ok])
        rels += [im.path.relative_to(photos).as_posix() for im in ok]
        for name, embedder in runtimes.items():
            out[name].append(embedder(pixels))
    vectors = {name: np.concatenate(v) for name, v in out.items()}
    cosine = np.sum(vectors["ort"] * vectors["tf"], axis=1)
    labels = [label_of(r) for r in rels]
    queries = np.array([i for i, lab in enumerate(labels) if lab is not None])
    result = {"photos": len(rels), "lowest_cosine": float(cosine.min())}
    for name, v in vectors.items():
        result[name] = retrieval_scores(ExactRanker(v), labels, queries, 10)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--child", choices=("ort", "tf"))
    ap.add_argument("--eval", type=Path, metavar="PHOTOS", help="compare eval figures instead")
    args = ap.parse_args()
    if args.eval:
        print(json.dumps(eval_both(args.store, args.eval), indent=1))
        return
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
