#!/usr/bin/env python
"""HTTP search latency and throughput of `lookalike serve`, beside the in-process query path.

1. HTTP: --requests sequential POST /search uploads (k=10) over one keep-alive connection:
   p50 / p95 / p99 client latency, and the server's own took_ms; then throughput with 1, 4 and
   16 concurrent clients (threads, one httpx.Client each; --requests requests per level).
   With --wrk (Debian's `wrk`, a C load generator), the same runs are also made by wrk over
   --seconds each: the Python client costs about as much CPU per request as the server's HTTP
   layer, and on a 2-core machine it competes with the server for the cores it measures.
2. In-process: the same queries through Engine.search_bytes in this process, sequential and
   with the same numbers of threads, so the HTTP overhead (multipart, ASGI, JSON, loopback)
   shows as the difference.

Queries are the bytes of a seeded sample of --photos files, read into memory first. The server
is started here (`python -m lookalike serve --store STORE --port FREE`) unless --url names one
already running; either way only loopback addresses are used.

Examples:
  .venv/bin/lookalike index ../shared/datasets/intel_scenes/images --store /tmp/intel_store
  .venv/bin/python scripts/bench_api.py --store /tmp/intel_store              # full: 1,000
  .venv/bin/python scripts/bench_api.py --store /tmp/intel_store --requests 50   # smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

DEFAULT_STORE = Path("/tmp/intel_store")
DEFAULT_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared/datasets/intel_scenes/images"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 95, 99)} | {"mean": float(a.mean())}


def load_queries(photos: Path, n: int, seed: int) -> list[bytes]:
    """The bytes of n files of photos, a seeded sample (repeated when there are fewer)."""
    from lookalike.images import find_images

    paths = list(find_images(photos))
    if not paths:
        sys.exit(f"no images under {photos}")
    random.Random(seed).shuffle(paths)
    return [p.read_bytes() for p in paths[:n]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, workers: int) -> tuple[subprocess.Popen, str]:
    """`python -m lookalike serve` on a free loopback port, waited for until /health answers."""
    port = free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "lookalike", "serve", "--store", str(store), "--port", str(port)]
    cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"lookalike serve exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    sys.exit("lookalike serve did not become healthy in 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_load(
    call: Callable[[int, object], None],
    make_session: Callable[[], object],
    total: int,
    clients: int,
) -> tuple[float, list[float]]:
    """total calls spread over `clients` threads, each with its own session; (seconds, ms each).

    call(i, session) does request i. All threads start together behind a barrier.
    """
    counter = iter(range(total))
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    lat: list[list[float]] = [[] for _ in range(clients)]

    def worker(slot: int) -> None:
        session = make_session()
        try:
            start.wait()
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                call(i, session)
                lat[slot].append((time.perf_counter() - t) * 1e3)
        finally:
            close = getattr(session, "close", None)
            if close:
                close()

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(worker, s) for s in range(clients)]
        start.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
        seconds = time.perf_counter() - t0
    return seconds, [x for row in lat for x in row]


def bench_http(url: str, queries: list[bytes], args) -> list[dict]:
    took: list[float] = []

    def search(i: int, client: httpx.Client) -> None:
        data = queries[i % len(queries)]
        r = client.post(f"{url}/search", params={"k": args.k}, files={"file": ("q.jpg", data)})
        if r.status_code != 200:
            raise RuntimeError(f"POST /search -> {r.status_code}: {r.text[:200]}")
        took.append(r.json()["took_ms"])

    def session() -> httpx.Client:
        return httpx.Client(timeout=60)

    run_load(search, session, args.warmup, 1)
    took.clear()
    rows = []
    seconds, lat = run_load(search, session, args.requests, 1)
    rows.append(row("HTTP", "sequential", args.requests, seconds, lat, took))
    for clients in args.clients:
        took.clear()
        seconds, lat = run_load(search, session, args.requests, clients)
        rows.append(row("HTTP", f"{clients} clients", args.requests, seconds, lat, took))
    return rows


WRK_SCRIPT = """
local bodies = {}
local n = 0
function init(args)
  for i, path in ipairs(args) do
    local f = io.open(path, "rb"); bodies[i] = f:read("*all"); f:close()
  end
end
function request()
  n = n + 1
  local headers = {["Content-Type"] = "multipart/form-data; boundary=BOUNDARY"}
  return wrk.format("POST", nil, headers, bodies[(n % #bodies) + 1])
end
function done(summary, latency, requests)
  io.write(string.format("WRK %d %f %f %f %f %f %d\\n", summary.requests,
    summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3, latency.mean / 1e3,
    summary.errors.status + summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout))
end
"""
BOUNDARY = "lookalike-bench-boundary"


def multipart(data: bytes) -> bytes:
    """One form field `file`, as the web page's FormData sends it."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process and its waited-for children (/proc, Linux);
    nan when there is no such process to read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return float("nan")
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def bench_wrk(url: str, queries: list[bytes], args, server_pid: int | None = None) -> list[dict]:
    """The HTTP runs made by wrk: 1 connection (sequential), then each --clients level; with
    server_pid, the server's CPU time per request too (the figure the load moves least)."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        paths = []
        for i, data in enumerate(queries):
            paths.append(Path(tmp) / f"{i}.body")
            paths[-1].write_bytes(multipart(data))
        script = Path(tmp) / "search.lua"
        script.write_text(WRK_SCRIPT.replace("BOUNDARY", BOUNDARY))
        target = f"{url}/search?k={args.k}"

        def run(connections: int, seconds: int) -> dict:
            cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), target]
            cpu = cpu_seconds(server_pid)
            out = subprocess.run(cmd + ["--", *map(str, paths)], capture_output=True, text=True)
            cpu = cpu_seconds(server_pid) - cpu
            line = next((x for x in out.stdout.splitlines() if x.startswith("WRK ")), None)
            if line is None:
                sys.exit(f"wrk failed: {out.stdout[-500:]} {out.stderr[-500:]}")
            n, secs, p50, p95, p99, mean, errors = line.split()[1:]
            if int(errors):
                sys.exit(f"wrk: {errors} failed requests")
            return {
                "requests": int(n),
                "req_s": int(n) / float(secs),
                "p50": float(p50),
                "p95": float(p95),
                "p99": float(p99),
                "mean": float(mean),
                "server_p50": float("nan"),
                "server_cpu_ms": cpu / int(n) * 1e3 if int(n) else float("nan"),
            }

        run(1, 2)  # warm-up
        rows = [{"path": "HTTP (wrk)", "mode": "sequential"} | run(1, args.seconds)]
        for clients in args.clients:
            rows.append(
                {"path": "HTTP (wrk)", "mode": f"{clients} clients"} | run(clients, args.seconds)
            )
    return rows


def bench_in_process(store: Path, queries: list[bytes], args) -> list[dict]:
    from lookalike.engine import Engine

    engine = Engine.open(store)

    def search(i: int, _session: object) -> None:
        engine.search_bytes(queries[i % len(queries)], args.k)

    run_load(search, object, args.warmup, 1)
    rows = []
    seconds, lat = run_load(search, object, args.requests, 1)
    rows.append(row("in-process", "sequential", args.requests, seconds, lat, lat))
    for clients in args.clients:
        seconds, lat = run_load(search, object, args.requests, clients)
        rows.append(row("in-process", f"{clients} threads", args.requests, seconds, lat, lat))
    engine.close()
    return rows


def row(path: str, mode: str, n: int, seconds: float, lat: list[float], took: list[float]) -> dict:
    out = {"path": path, "mode": mode, "requests": n, "req_s": n / seconds}
    out |= percentiles(lat)
    out["server_p50"] = float(np.median(took)) if took else float("nan")
    return out


def markdown(rows: list[dict]) -> str:
    head = (
        "| path | load | requests | req/s | p50 ms | p95 ms | p99 ms | mean ms "
        "| server p50 ms | server CPU ms/request |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['mode']} | {r['requests']} | {r['req_s']:.1f} | {r['p50']:.1f} "
            f"| {r['p95']:.1f} | {r['p99']:.1f} | {r['mean']:.1f} | {r['server_p50']:.1f} "
            f"| {r.get('server_cpu_ms', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", type=Path, default=DEFAULT_STORE, help="store folder")
    ap.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="query images from here")
    ap.add_argument("--url", help="a running server (loopback only); default: start one")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes")
    ap.add_argument("--requests", type=int, default=1000, help="requests per measurement")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--queries", type=int, default=200, help="distinct query images")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("-k", "--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-in-process", action="store_true")
    ap.add_argument("--wrk", action="store_true", help="also load the server with wrk")
    ap.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if not (args.store / "info.json").exists():
        sys.exit(
            f"no store at {args.store}; build one with\n"
            f"  lookalike index {args.photos} --store {args.store}"
        )
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        sys.exit(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))})")
    queries = load_queries(args.photos, args.queries, args.seed)
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        print(f"starting lookalike serve --store {args.store} ...", file=sys.stderr, flush=True)
        proc, url = start_server(args.store, args.workers)
    try:
        stats = httpx.get(url + "/stats", timeout=10).json()
        print(f"HTTP against {url} ...", file=sys.stderr, flush=True)
        rows = bench_http(url, queries, args)
        if args.wrk:
            if shutil.which("wrk") is None:
                sys.exit("--wrk: no wrk on PATH (Debian: apt-get install wrk)")
            print("HTTP with wrk ...", file=sys.stderr, flush=True)
            rows += bench_wrk(url, queries, args, None if proc is None else proc.pid)
    finally:
        if proc is not None:
            stop_server(proc)  # the in-process runs get the CPUs to themselves
    if not args.skip_in_process:
        print("in-process ...", file=sys.stderr, flush=True)
        rows += bench_in_process(args.store, queries, args)

    sizes = [len(q) for q in queries]
    print(
        f"{stats['images']} images, {stats['index_type']} index, dim {stats['embedding_dim']}, "
        f"input {stats['image_size']} px; k={args.k}; {len(queries)} distinct query files "
        f"(median {np.median(sizes) / 1024:.0f} KiB); server workers: "
        f"{'?' if args.url else args.workers}; {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}\n"
    )
    print(markdown(rows))
    print(
        "\nreq/s: requests / wall time; latency: per request, at the client; "
        "server p50: the took_ms the server reports (decode + encoder + kNN)."
    )


if __name__ == "__main__":
    main()
