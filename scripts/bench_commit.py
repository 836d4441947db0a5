"""Index throughput of the commit path at a large store, without the model: how fast batches of
new photos go into the table and the FAISS index once the store holds N vectors.

Compares, in the same run and interleaved, the path as it is (new rows are only added) with the
old one (every batch first removed its ids from the index, which scans the whole index: FAISS
`remove_ids` is O(n) per call, so a first index of n photos was O(n^2)).

    python scripts/bench_commit.py --vectors 200000 --batches 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike.index.meta import ImageRecord
from lookalike.indexer import Committer, IndexReport
from lookalike.store import Store


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_store(
    root: Path, n: int, dim: int, rng: np.random.Generator, index_type: str = "flat"
) -> Store:
    """A store with n synthetic rows of model 1 and its index (flat: exact, as below 200k)."""
    store = Store.open(root, create=True, photos=root)
    state = {"model_serial": 1, "embedding_dim": dim, "image_size": 64}
    store.update_state({**state, "index_type_requested": index_type}, bump=True)
    for start in range(0, n, 10_000):
        m = min(10_000, n - start)
        rows = [
            (ImageRecord(0, f"p/{start + i}.jpg", 1, 1.0, f"{start + i:064x}", 1, 1), v)
            for i, v in enumerate(unit(rng, m, dim))
        ]
        store.db.write(rows, model=1)
    _ = store.index  # built and saved
    return store


class OldCommitter(Committer):
    """The commit of the previous version: every batch's ids removed from the index first."""

    def commit(self, rows):
        vectors = np.stack([v for _, v, _ in rows])
        ids = self.store.db.write([(r, v) for r, v, _ in rows], model=self.serial)
        self.index.remove(np.array(ids))
        self.index.add(vectors, np.array(ids))


def run(store: Store, batches: int, batch: int, rng, old: bool, offset: int) -> float:
    """Rows/s of committing `batches` batches of new rows through the indexer's Committer."""
    committer = (OldCommitter if old else Committer)(store, store.index, IndexReport())
    took = 0.0
    for b in range(batches):
        rows = []
        for i, v in enumerate(unit(rng, batch, store.dim)):
            n = offset + b * batch + i
            rows.append((ImageRecord(0, f"new/{n}.jpg", 1, 1.0, f"{n:064x}", 1, 1), v, "added"))
        started = time.perf_counter()
        committer.commit(rows)
        took += time.perf_counter() - started
    return batches * batch / took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vectors", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--index-type", default="flat", choices=["flat", "ivf", "auto"])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "s", args.vectors, args.dim, rng, args.index_type)
        out: dict[str, list[float]] = {"now": [], "old": []}
        offset = 0
        with store.writing():
            run(store, 5, args.batch, rng, False, offset)  # warm-up: caches, allocator
            offset += 5 * args.batch
            for r in range(args.repeats):
                for name in ("now", "old") if r % 2 else ("old", "now"):
                    out[name].append(
                        run(store, args.batches, args.batch, rng, name == "old", offset)
                    )
                    offset += args.batches * args.batch
        store.close()
    result = {
        "vectors": args.vectors,
        "batch": args.batch,
        "index": store.info.get("index_type"),
        "load": os.getloadavg()[0],
        **{f"{k}_rows_per_s": [round(x) for x in v] for k, v in out.items()},
        **{f"{k}_median": round(statistics.median(v)) for k, v in out.items()},
    }
    result["ratio"] = round(result["now_median"] / result["old_median"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
