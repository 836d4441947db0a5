#!/usr/bin/env python
"""Training time of `lookalike index` on one photo folder, for model variants run by turns.

Each run indexes PHOTOS into a new scratch store in a fresh subprocess (lookalike.indexer
.index_folder, the path of `lookalike index`) and reports the training phase's seconds (as
`lookalike index` reports them: sample decoding, epochs, whitening, export), the epochs loop's
seconds (the model's training.json), the CPU seconds of the steps (the progress callback's first
step to the whitening; the first step, with graph tracing, left out), the
epochs run and planned, the embedding phase's images/s, and the 1-minute load average before and
after. Variants alternate run by run (A B A B ...), so a change in the machine's load hits both;
the table gives each variant's median.

    python scripts/bench_train.py --runs 2 \\
        --variant default='{}' --variant light='{"decoder_filters": [16, 32, 64, 128]}'
    python scripts/bench_train.py --photos SMALL --runs 1 --variant a='{"epochs": 1}'   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = ROOT.parent / "shared" / "datasets" / "intel_scenes" / "images"

CHILD = r"""
import json, os, sys, time
from lookalike.config import ModelConfig
from lookalike.indexer import index_folder

photos, store, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = ModelConfig().replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
marks = {}

def progress(stage, done, total):
    if stage.startswith("epoch") and "train" not in marks:
        marks["train"] = (time.perf_counter(), time.process_time())
    if stage == "whitening" and "whitened" not in marks:
        marks["whitened"] = (time.perf_counter(), time.process_time())

load = os.getloadavg()[0]
report = index_folder(photos, store, model=cfg, progress=progress)
(w0, c0), (w1, c1) = marks["train"], marks["whitened"]
from lookalike.store import Store
with Store.open(store) as st:
    record = st.training_record()
print(json.dumps({
    "train_seconds": report.train_seconds, "loop_seconds": record.get("seconds"),
    "steps_wall": w1 - w0, "steps_cpu": c1 - c0, "epochs_run": record.get("epochs_run"),
    "epochs_planned": record.get("epochs_planned"), "images": report.images,
    "embed_images_per_s": report.images / report.embed_seconds if report.embed_seconds else None,
    "load_before": load, "load_after": os.getloadavg()[0],
}))
"""


def run_one(photos: Path, overrides: dict, scratch: Path) -> dict:
    store = Path(tempfile.mkdtemp(dir=scratch, prefix="store-"))
    shutil.rmtree(store)
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(photos), str(store), json.dumps(overrides)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--runs", type=int, default=2, help="runs of each variant")
    parser.add_argument("--variant", action="append", required=True, help="NAME=JSON overrides")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args()
    if not args.photos.is_dir():
        parser.error(f"photos folder not found: {args.photos}")
    variants = dict(v.split("=", 1) for v in args.variant)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(args.runs):
        for name, overrides in variants.items():
            result = run_one(args.photos, json.loads(overrides), args.scratch)
            runs[name].append(result)
            print(f"run {i + 1} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    print(
        "| variant | train s (median) | epochs loop s | steps CPU s | epochs | embed images/s | load |"
    )
    print("|---|---:|---:|---:|---|---:|---|")
    for name, rs in runs.items():
        loads = [r["load_before"] for r in rs] + [r["load_after"] for r in rs]
        print(
            f"| {name} | {statistics.median(r['train_seconds'] for r in rs):.1f} "
            f"| {statistics.median(r['loop_seconds'] for r in rs):.1f} "
            f"| {statistics.median(r['steps_cpu'] for r in rs):.1f} "
            f"| {rs[0]['epochs_run']}/{rs[0]['epochs_planned']} "
            f"| {statistics.median(r['embed_images_per_s'] or 0 for r in rs):.0f} "
            f"| {min(loads):.1f}-{max(loads):.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
