#!/usr/bin/env python
"""`lookalike serve` start-up and memory: seconds until GET /health answers, and the server's
resident memory (VmRSS, and VmHWM: its peak) after --searches POST /search uploads.

Runs --runs fresh servers (one worker, loopback, a free port) and prints the medians. With
--python and --pythonpath another checkout's lookalike can be measured the same way.

Example:
  python scripts/bench_serve.py --store S --photos PHOTOS --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_run(args, files: list[Path]) -> dict:
    port = free_port()
    env = dict(os.environ, **({"PYTHONPATH": args.pythonpath} if args.pythonpath else {}))
    cmd = [args.python, "-m", "lookalike", "serve", "--store", str(args.store), "--port", str(port)]
    started = time.perf_counter()
    # cwd "/": `python -m` puts the working directory first on sys.path, before PYTHONPATH
    proc = subprocess.Popen(
        cmd, env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read().decode()}")
            time.sleep(0.05)
        health = time.perf_counter() - started
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(args.searches):
                data = files[i % len(files)].read_bytes()
                r = client.post("/search", files={"file": ("q.jpg", data)}, params={"k": 10})
                r.raise_for_status()
        return {
            "health_s": health,
            "rss_mb": status_mb(proc.pid, "VmRSS"),
            "peak_mb": status_mb(proc.pid, "VmHWM"),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--photos", type=Path, required=True, help="query images (jpg) from here")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--searches", type=int, default=60)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--pythonpath", help="PYTHONPATH of the server (another checkout)")
    args = ap.parse_args()
    files = sorted(args.photos.rglob("*.jpg"))[: args.searches]
    rows = [one_run(args, files) for _ in range(args.runs)]
    for row in rows:
        print(json.dumps(row), file=sys.stderr)
    print(json.dumps({k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}))


if __name__ == "__main__":
    main()
