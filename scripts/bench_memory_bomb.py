#!/usr/bin/env python
"""Memory of decoding: one decode's peak, and a real server under concurrent bomb searches.

The bomb: a 1-bit PNG of 7999 x 7999 (under the 64 Mpx pixel limit, ~8 KB on disk).

1. decode: each case is decoded in a fresh subprocess (`--one CASE`), which prints its peak RSS
   (VmHWM, reset just before) minus its RSS before the decode: Pillow's C allocations, which
   tracemalloc does not see. Cases: the bomb (1-bit), a palette bomb of the same size (each also
   with the decode budget lifted: what the decoding path itself costs), a 24 Mpx
   camera-like JPEG (baseline) at the embedding size and as a 1024 thumbnail, and a 24 Mpx RGB
   PNG (no draft mode).
2. serve: `python -m lookalike serve` on a small store (built here with a tiny model unless
   --store is given); the server's RSS (from /proc) before, at its peak during, and after
   --clients concurrent POST /search of the bomb, and the status codes they got.

Run it against another checkout (the code before a change) with PYTHONPATH=THAT_CHECKOUT.

Examples:
  PYTHONPATH=$PWD .venv/bin/python scripts/bench_memory_bomb.py
  PYTHONPATH=/tmp/old .venv/bin/python scripts/bench_memory_bomb.py --only serve
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BOMB_SIDE = 7999


def bomb_png(side: int = BOMB_SIDE, palette: bool = False) -> bytes:
    """A PNG of side x side, all zero: 1-bit grey, or 8-bit palette (two colours)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    depth, colour, row = (8, 3, side + 1) if palette else (1, 0, (side + 7) // 8 + 1)
    raw = zlib.compress(b"\x00" * (row * side), 9)
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, depth, colour, 0, 0, 0))
    if palette:
        body += chunk(b"PLTE", bytes([0, 0, 0, 255, 255, 255]))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def photo(width: int, height: int, fmt: str, seed: int = 0) -> bytes:
    """A camera-like seeded image: smooth colour fields plus sensor-like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    img = small.resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + rng.integers(-6, 7, (height, 1, 1), dtype=np.int16)  # cheap banding noise
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


NO_BUDGET = 10**12
CASES = {  # name: (make the file, decode size (negative: thumbnail), decode budget or None)
    "bomb-1bit-64": (lambda: bomb_png(), 64, None),
    "bomb-palette-64": (lambda: bomb_png(palette=True), 64, None),
    "bomb-1bit-64-nobudget": (lambda: bomb_png(), 64, NO_BUDGET),
    "bomb-palette-64-nobudget": (lambda: bomb_png(palette=True), 64, NO_BUDGET),
    "jpeg-24mpx-64": (lambda: photo(6000, 4000, "JPEG"), 64, None),
    "jpeg-24mpx-thumb1024": (lambda: photo(6000, 4000, "JPEG"), -1024, None),
    "png-24mpx-64": (lambda: photo(6000, 4000, "PNG"), 64, None),
}


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def one(case: str, path: Path) -> None:
    """In this (fresh) process: decode one case's file, print its peak RSS growth as JSON."""
    from lookalike import images

    _, size, budget = CASES[case]
    kwargs = {"max_bytes": budget} if budget and hasattr(images, "DEFAULT_MAX_DECODE_BYTES") else {}
    data = path.read_bytes()
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak RSS, to now
        f.write("5")
    started = time.perf_counter()
    try:
        if size < 0:
            images.thumbnail(data, -size, **kwargs)
        else:
            images.decode(data, size, **kwargs)
        outcome = "decoded"
    except images.ImageError as exc:
        outcome = f"refused: {exc}"
    took = time.perf_counter() - started
    peak = status_kb("VmHWM")  # not ru_maxrss: it keeps the forking parent's peak
    print(
        json.dumps(
            {
                "case": case,
                "file_bytes": len(data),
                "peak_mb": (peak - before) / 1024,
                "seconds": round(took, 3),
                "outcome": outcome[:140],
            }
        )
    )


def bench_decode(tmp: Path) -> list[dict]:
    rows = []
    for case, (make, *_) in CASES.items():
        path = tmp / case
        path.write_bytes(make())  # made here: the child's peak is its decode's alone
        out = subprocess.run(
            [sys.executable, __file__, "--one", case, str(path)],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(
            f"  {rows[-1]['case']:26s} {rows[-1]['file_bytes']:>11,} B  peak +"
            f"{rows[-1]['peak_mb']:7.1f} MB  {rows[-1]['seconds']:6.2f} s  {rows[-1]['outcome']}"
        )
    return rows


def tiny_store(root: Path) -> Path:
    """A small store: 40 seeded photos indexed with a tiny model (a few seconds)."""
    from lookalike.config import ModelConfig
    from lookalike.indexer import index_folder

    photos = root / "photos"
    photos.mkdir()
    for i in range(40):
        (photos / f"p{i:02d}.jpg").write_bytes(photo(96, 72, "JPEG", seed=i))
    model = ModelConfig(
        image_size=32,
        filters=(8, 16, 16, 16),
        code_channels=4,
        pooled_levels=(2, 3, 4),
        embedding_dim=16,
        epochs=2,
        batch_size=16,
    )
    index_folder(photos, root / "store", model=model)
    return root / "store"


def server_rss_kb(pid: int) -> int:
    """RSS of the server process and its children (uvicorn may fork workers)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def bench_serve(store: Path, clients: int) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lookalike", "serve", "--store", str(store), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ,
        cwd=store.parent,  # `-m` puts the working folder first: PYTHONPATH picks the checkout
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("the server did not start")
        ok_query = photo(96, 72, "JPEG", seed=3)
        httpx.post(f"{url}/search", files={"file": ("q.jpg", ok_query)}, timeout=30)
        idle = server_rss_kb(proc.pid)
        peak, stop = [idle], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], server_rss_kb(proc.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        bomb = bomb_png()

        def post(_):
            with httpx.Client(timeout=300) as c:
                r = c.post(f"{url}/search", files={"file": ("bomb.png", bomb)})
                return r.status_code, r.text[:160]

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(post, range(clients)))
        took = time.perf_counter() - started
        time.sleep(1.0)
        stop.set()
        sampler.join()
        after = server_rss_kb(proc.pid)
        ok = httpx.post(f"{url}/search", files={"file": ("q.jpg", ok_query)}, timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    codes: dict[int, int] = {}
    for code, _ in answers:
        codes[code] = codes.get(code, 0) + 1
    return {
        "clients": clients,
        "rss_idle_mb": idle / 1024,
        "rss_peak_mb": peak[0] / 1024,
        "rss_after_mb": after / 1024,
        "seconds": round(took, 2),
        "codes": codes,
        "first_answer": answers[0][1],
        "search_after": ok.status_code,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["decode", "serve"])
    ap.add_argument("--store", type=Path, help="a store to serve (default: a tiny one made here)")
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    if args.one:
        return one(args.one[0], Path(args.one[1]))
    import lookalike

    print(
        f"lookalike from {Path(lookalike.__file__).parent}; cpus {os.cpu_count()}; "
        f"load {os.getloadavg()[0]:.2f}"
    )
    if args.only != "serve":
        print("one decode, peak RSS growth in a fresh process:")
        with tempfile.TemporaryDirectory() as tmp:
            bench_decode(Path(tmp))
    if args.only != "decode":
        with tempfile.TemporaryDirectory() as tmp:
            store = args.store or tiny_store(Path(tmp))
            result = bench_serve(store, args.clients)
        print(f"serve, {args.clients} concurrent bomb searches:")
        print(json.dumps(result, indent=1))
        print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
