"""Issue 3's end-to-end check, as a user would run it, with the figures the closing note needs.

    python scripts/e2e_core.py [--photos ../shared/datasets/intel_scenes/images] [--n 600]

1. Copies N photos (seeded sample) plus a few bad files into a scratch folder.
2. `lookalike index` (trains, indexes; reports the bad files).
3. Every indexed photo searched by its own file comes back first.
4. Adds 10, changes 1, deletes 5 files; re-indexes; the report must say exactly that, untrained.
Everything runs through the installed `lookalike` command; peak RSS is that of the child.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parents[1]
LOOKALIKE = [sys.executable, "-m", "lookalike"]


def run(*args: str) -> tuple[dict | list, float, float]:
    """Run lookalike with --json; (parsed output, wall seconds, child peak RSS in MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    proc = subprocess.run([*LOOKALIKE, *args, "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        sys.exit(f"lookalike {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rss = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return (lines[0] if len(lines) == 1 else lines), wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--photos", type=Path, default=HERE.parent / "shared/datasets/intel_scenes/images"
    )
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=None, help="override training epochs")
    args = ap.parse_args()
    files = sorted(args.photos.rglob("*.jpg"))
    random.Random(0).shuffle(files)
    with tempfile.TemporaryDirectory(prefix="lookalike-e2e-") as tmp:
        photos, store = Path(tmp) / "photos", Path(tmp) / "store"
        for f in files[: args.n]:
            dst = photos / f.relative_to(args.photos)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
        bad = photos / "bad"
        bad.mkdir()
        (bad / "empty.jpg").write_bytes(b"")
        (bad / "text.jpg").write_text("not an image")
        data = files[0].read_bytes()
        (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
        bomb = Image.new("1", (20000, 20000))
        bomb.save(bad / "bomb.png")
        extra = ["--epochs", str(args.epochs)] if args.epochs else []
        report, wall, rss = run("index", str(photos), "--store", str(store), *extra)
        print(
            f"index: {report['images']} images, trained={report['trained']}, "
            f"{len(report['failed'])} failed, {wall:.1f} s, peak RSS {rss:.0f} MB"
        )
        for f in report["failed"]:
            print(f"  skipped {Path(f['path']).name}: {f['error']}")
        assert report["images"] == args.n and len(report["failed"]) == 4, report

        indexed = sorted(p for p in photos.rglob("*.jpg") if p.parent.name != "bad")
        t = time.perf_counter()
        results, wall, _ = run("search", *map(str, indexed), "--store", str(store), "-k", "1")
        first = sum(
            1
            for r in results
            if r["results"]
            and (photos / r["results"][0]["path"]).resolve() == Path(r["query"]).resolve()
            and r["results"][0]["score"] >= 0.99
        )
        print(
            f"self-search: {first}/{len(indexed)} come back first with score >= 0.99 "
            f"({(time.perf_counter() - t) / len(indexed) * 1e3:.1f} ms/query incl. start-up)"
        )

        for f in files[args.n : args.n + 10]:
            dst = photos / f.relative_to(args.photos)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
        changed = indexed[0]
        Image.open(indexed[1]).save(changed, quality=70)
        os.utime(changed, (time.time() + 5, time.time() + 5))
        for p in indexed[-5:]:
            p.unlink()
        report, wall, rss = run("index", str(photos), "--store", str(store))
        summary = {k: report[k] for k in ("added", "updated", "removed", "trained")}
        print(f"re-index: {summary}, unchanged {report['unchanged']}, {wall:.1f} s")
        assert summary == {"added": 10, "updated": 1, "removed": 5, "trained": False}, report
        info, _, _ = run("info", "--store", str(store))
        print(f"info: {info['images']} images, store {info['disk_bytes'] / 1e6:.1f} MB")
    print("OK")


if __name__ == "__main__":
    main()
