#!/usr/bin/env python
"""Index throughput, training throughput, peak memory and store size against collection size.

The collection is the shared intel_scenes photos grown to each size with seeded transformed
copies (crop, flip, small rotation, colour, JPEG), written under --scratch (never the repo).
Each measurement runs in a fresh subprocess that reports its own peak RSS:

  decode   lookalike.images.iter_batches over every file, nothing else (the indexer's decoder)
  index    lookalike.indexer.index_folder into a new store: training, embedding, FAISS + SQLite
  dedupe   lookalike.dedupe.grouping.find_groups on the index's store (FAISS range search)
  phash    imagehash.phash of every file (peer), in this venv
  imagededup  imagededup's PHash encode_images + find_duplicates (peer), in --imagededup-python

Examples:
  python scripts/bench_index.py                                  # 1k, 10k, 50k
  python scripts/bench_index.py --sizes 200 --tiny --epochs 1    # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "intel_scenes" / "images"
DEFAULT_SCRATCH = Path("/tmp/lookalike-bench")
TINY_MODEL = dict(
    image_size=32,
    filters=(8, 16, 16, 16),
    code_channels=4,
    embedding_dim=16,
    batch_size=16,
)
IMAGEDEDUP_PY = Path("/tmp/imagededup-venv/bin/python")
IMAGEDEDUP_SCRIPT = """
import json, resource, sys, time
from imagededup.methods import PHash
ph = PHash(verbose=False)
t0 = time.perf_counter()
enc = ph.encode_images(image_dir=sys.argv[1], recursive=True, num_enc_workers=int(sys.argv[2]))
t1 = time.perf_counter()
dups = ph.find_duplicates(encoding_map=enc, max_distance_threshold=10,
                          num_dist_workers=int(sys.argv[2]))
t2 = time.perf_counter()
import imagededup
print(json.dumps({"images": len(enc), "encode_seconds": t1 - t0, "find_seconds": t2 - t1,
                  "with_duplicates": sum(bool(v) for v in dups.values()),
                  "version": imagededup.__version__,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


# -- the machine -----------------------------------------------------------------------------
def machine() -> dict:
    """CPU model, cores, memory and library versions, for the benchmark record."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    from lookalike.store import library_versions

    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem_gb, 1),
        "platform": platform.platform(),
        "versions": library_versions(),
    }


# -- the collection --------------------------------------------------------------------------
def _variant(src: Path, dst: Path, variant: int, n: int) -> None:
    """A seeded look-alike of src: crop 70-95 %, maybe flip, rotate +-8 deg, colour, JPEG."""
    from PIL import Image, ImageEnhance, ImageOps

    rng = np.random.default_rng([variant, n])
    with Image.open(src) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.7, 0.95)), int(h * rng.uniform(0.7, 0.95))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = img.rotate(float(rng.uniform(-8, 8)), Image.Resampling.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.8, 1.2)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    img.save(tmp, "JPEG", quality=int(rng.integers(60, 91)))
    os.replace(tmp, dst)


def make_collection(source: Path, scratch: Path, size: int, workers: int = 2) -> Path:
    """scratch/photos_<size>: the first `size` files of a pool of source photos (v00) and
    their seeded variants (v01, v02, ...), hard-linked from scratch/pool (made once)."""
    from lookalike.images import find_images

    originals = sorted(find_images(source))
    if not originals:
        raise SystemExit(f"no photos in {source}")
    pool = scratch / "pool"
    todo, plan = [], []
    for i in range(size):
        variant, n = divmod(i, len(originals))
        src = originals[n]
        rel = src.relative_to(source)
        name = rel.as_posix().replace("/", "_")
        dst = pool / f"v{variant:02d}" / (name if variant == 0 else Path(name).stem + ".jpg")
        plan.append(dst)
        if not dst.exists():
            todo.append((src, dst, variant, n))
    if todo:
        print(f"writing {len(todo)} photos to {pool} ...", file=sys.stderr, flush=True)
        with ThreadPoolExecutor(workers) as ex:

            def one(args):
                src, dst, variant, n = args
                if variant == 0:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
                else:
                    _variant(src, dst, variant, n)

            list(ex.map(one, todo))
    photos = scratch / f"photos_{size}"
    if photos.exists() and sum(1 for _ in photos.rglob("*.jpg")) == size:
        return photos
    shutil.rmtree(photos, ignore_errors=True)
    for dst in plan:
        link = photos / dst.relative_to(pool)
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(dst, link)
        except OSError:
            shutil.copyfile(dst, link)
    return photos


def model_config(tiny: bool, epochs: int):
    from lookalike.config import ModelConfig

    base = ModelConfig(**TINY_MODEL) if tiny else ModelConfig()
    return base.replace(epochs=epochs, patience=max(epochs, base.patience))


# -- child processes -------------------------------------------------------------------------
def child(args) -> dict:
    """One measurement in this (fresh) process; returns its figures and its own peak RSS."""
    from lookalike.images import find_images

    files = sorted(find_images(args.photos))
    out: dict = {"images": len(files)}
    if args.child == "decode":
        from lookalike.config import IndexOptions
        from lookalike.images import iter_batches

        opts = IndexOptions()
        size = model_config(args.tiny, args.epochs).image_size
        t0 = time.perf_counter()
        n = 0
        for ok, _bad in iter_batches(files, size, opts.batch_size, workers=opts.workers):
            n += len(ok)
        out.update(decoded=n, decode_seconds=time.perf_counter() - t0)
    elif args.child == "phash":
        import imagehash
        from PIL import Image

        t0 = time.perf_counter()
        for path in files:
            with Image.open(path) as img:
                imagehash.phash(img)
        out.update(phash_seconds=time.perf_counter() - t0)
    elif args.child == "dedupe":
        from lookalike.dedupe.grouping import default_threshold, find_groups
        from lookalike.store import Store

        with Store.open(args.store) as st:
            _ = st.index  # load before timing
            t0 = time.perf_counter()
            groups = find_groups(st)
            out.update(
                dedupe_seconds=time.perf_counter() - t0,
                groups=len(groups),
                threshold=default_threshold(st),
            )
    elif args.child == "index":
        from lookalike.indexer import index_folder
        from lookalike.store import Store

        shutil.rmtree(args.store, ignore_errors=True)
        report = index_folder(args.photos, args.store, model=model_config(args.tiny, args.epochs))
        with Store.open(args.store) as st:
            training = st.training_record()
            parts = {
                "sqlite": sum(p.stat().st_size for p in st.root.glob("images.sqlite*")),
                "faiss": st.index_path.stat().st_size,
                "model": sum(p.stat().st_size for p in st.model_dir.rglob("*") if p.is_file()),
            }
            out.update(
                indexed=len(st.db),
                index_type=st.info.get("index_type"),
                disk_bytes=st.disk_bytes(),
                parts=parts,
            )
        out.update(
            seconds=report.seconds,
            train_seconds=report.train_seconds,
            embed_seconds=report.embed_seconds,
            failed=len(report.failed),
            training={
                k: training.get(k) for k in ("seconds", "epochs_run", "train_images", "val_images")
            },
        )
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def spawn(kind: str, photos: Path, args, store: Path | None = None) -> dict:
    """Run one child measurement in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, __file__, "--child", kind, "--photos", str(photos)]
    cmd += ["--epochs", str(args.epochs)] + (["--tiny"] if args.tiny else [])
    if store is not None:
        cmd += ["--store", str(store)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def imagededup_peer(photos: Path, python: Path, workers: int) -> dict | None:
    """imagededup PHash encode + find_duplicates, in the interpreter that has it installed."""
    if not python.exists():
        return None
    result = subprocess.run(
        [str(python), "-c", IMAGEDEDUP_SCRIPT, str(photos), str(workers)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        print(f"imagededup failed: {result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the run ---------------------------------------------------------------------------------
def bench_size(size: int, args) -> tuple[dict, dict]:
    photos = make_collection(args.source, args.scratch, size)
    store = args.scratch / f"store_{size}"
    decode = [spawn("decode", photos, args) for _ in range(args.runs)]
    runs = [spawn("index", photos, args, store) for _ in range(args.index_runs)]
    index = runs[-1]  # the store left on disk for bench_query
    tr = index["training"]
    n = index["indexed"]

    def med(fn):
        return statistics.median(fn(r) for r in runs)

    row = {
        "images": n,
        "decode_images_per_s": statistics.median(
            d["decoded"] / d["decode_seconds"] for d in decode
        ),
        "decode_peak_rss_mb": statistics.median(d["peak_rss_mb"] for d in decode),
        "embed_images_per_s": med(lambda r: n / r["embed_seconds"]),
        "index_images_per_s_excl_training": med(lambda r: n / (r["seconds"] - r["train_seconds"])),
        "index_seconds": med(lambda r: r["seconds"]),
        "train_seconds": med(lambda r: r["train_seconds"]),
        "train_images": tr["train_images"],
        "train_epochs": tr["epochs_run"],
        "train_images_per_s_epoch": med(
            lambda r: (
                r["training"]["train_images"]
                * r["training"]["epochs_run"]
                / r["training"]["seconds"]
            )
        ),
        "peak_rss_mb": med(lambda r: r["peak_rss_mb"]),
        "index_runs": len(runs),
        "store_bytes_per_image": index["disk_bytes"] / n,
        "store_bytes_per_image_excl_model": (index["disk_bytes"] - index["parts"]["model"]) / n,
        "model_bytes": index["parts"]["model"],
        "index_type": index["index_type"],
        "failed": index["failed"],
    }
    peer: dict = {"images": n}
    dd = spawn("dedupe", photos, args, store)
    peer["lookalike_dedupe_seconds"] = dd["dedupe_seconds"]
    if not args.no_peers:
        ph = [spawn("phash", photos, args) for _ in range(args.runs)]
        peer["phash_images_per_s"] = statistics.median(p["images"] / p["phash_seconds"] for p in ph)
        peer["phash_peak_rss_mb"] = statistics.median(p["peak_rss_mb"] for p in ph)
        dd = None
        if not args.no_imagededup:
            dd = imagededup_peer(photos, args.imagededup_python, os.cpu_count() or 1)
        if args.no_imagededup:
            peer["imagededup"] = "skipped (--no-imagededup)"
        elif dd is None:
            peer["imagededup"] = f"not run: no imagededup interpreter at {args.imagededup_python}"
        else:
            peer.update(
                imagededup_version=dd["version"],
                imagededup_encode_images_per_s=dd["images"] / dd["encode_seconds"],
                imagededup_find_duplicates_seconds=dd["find_seconds"],
                imagededup_peak_rss_mb=dd["peak_rss_mb"],
            )
    return row, peer


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="photos to grow from")
    ap.add_argument(
        "--scratch", type=Path, default=DEFAULT_SCRATCH, help="work folder (not the repo)"
    )
    ap.add_argument("--sizes", default="1000,10000,50000", help="comma-separated image counts")
    ap.add_argument(
        "--epochs", type=int, default=2, help="training epochs (throughput is per epoch)"
    )
    ap.add_argument("--runs", type=int, default=3, help="runs of the cheap measurements (median)")
    ap.add_argument("--index-runs", type=int, default=1, help="runs of the index measurement")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke tests)")
    ap.add_argument("--no-peers", action="store_true", help="skip pHash and imagededup")
    ap.add_argument("--no-imagededup", action="store_true", help="skip the imagededup peer")
    ap.add_argument(
        "--imagededup-python",
        type=Path,
        default=IMAGEDEDUP_PY,
        help="a Python with imagededup installed (it pulls torch: keep it out of the project venv)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument(
        "--child", choices=["decode", "index", "phash", "dedupe"], help=argparse.SUPPRESS
    )
    ap.add_argument("--photos", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows, peers = [], []
    for size in sizes:
        print(f"size {size} ...", file=sys.stderr, flush=True)
        row, peer = bench_size(size, args)
        rows.append(row)
        peers.append(peer)
    data = {
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "epochs": args.epochs,
        "runs": args.runs,
        "model": "tiny" if args.tiny else "default",
        "load_average_1_5_15": {"start": load_before, "end": os.getloadavg()},
        "sizes": rows,
        "peers": peers,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    print(
        markdown(
            rows,
            [
                "images",
                "decode_images_per_s",
                "embed_images_per_s",
                "index_images_per_s_excl_training",
                "train_images_per_s_epoch",
                "train_seconds",
                "index_seconds",
                "peak_rss_mb",
                "store_bytes_per_image",
                "store_bytes_per_image_excl_model",
            ],
        )
    )
    if not args.no_peers:
        print()
        keys = sorted({k for p in peers for k in p}, key=lambda k: (k != "images", k))
        print(markdown(peers, keys))


if __name__ == "__main__":
    main()
