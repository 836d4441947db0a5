"""Shard files: the results of a Ray embedding job, streamed to STORE/shards as they arrive.

A shard is one ``.npz`` file (no pickles) of the columns in :data:`COLUMNS` plus ``embedding``;
rows carry the file facts the table keeps, so the driver can merge a shard into the table without
touching the image again. A row with a non-empty ``error`` is a file that could not be used.
Shards are written to a temporary name, fsynced and renamed: a shard on disk is always complete.

A job interrupted at any point (Ctrl-C, kill, a lost cluster) leaves the shards it finished; the
next run takes every row whose file still has the same size and mtime from them instead of
embedding it again, then merges them into the table and deletes them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# column -> dtype of a shard's one-dimensional columns
COLUMNS = {
    "pos": np.int64,  # position of the file in the run's to-do list (collection order)
    "rel": np.str_,  # path relative to PHOTOS (the table's path)
    "size": np.int64,
    "mtime": np.float64,
    "sha256": np.str_,
    "width": np.int32,
    "height": np.int32,
    "phash": np.int64,
    "error": np.str_,  # "" for a usable image, else why it was skipped
}


class ShardDir:
    """STORE/shards: shard files of one model (a retrained model invalidates them)."""

    def __init__(self, root: Path, model_serial: int, dim: int):
        self.root = root
        self.model_serial = model_serial
        self.dim = dim
        self._run = f"{time.time_ns():x}"  # shards of later runs never overwrite earlier ones
        self._written = 0
        job = root / "job.json"
        if root.exists():
            try:
                meta = json.loads(job.read_text())
            except (OSError, ValueError):
                meta = {}
            if meta.get("model_serial") != model_serial or meta.get("dim") != dim:
                shutil.rmtree(root)  # made by another model: of no use
        root.mkdir(parents=True, exist_ok=True)
        for tmp in root.glob("*.tmp"):  # a shard whose write was interrupted
            tmp.unlink()
        if not job.exists():
            tmp = job.with_name("job.json.tmp")
            tmp.write_text(json.dumps({"model_serial": model_serial, "dim": dim}))
            os.replace(tmp, job)

    def paths(self) -> list[Path]:
        """Complete shard files, in the order of their first row (then of their run)."""
        return sorted(self.root.glob("shard-*.npz"))

    def write(self, rows: dict[str, np.ndarray]) -> Path:
        """Write one shard atomically; rows: the COLUMNS and ``embedding`` (n, dim)."""
        n = len(rows["pos"])
        data = {name: np.asarray(rows[name]).astype(dtype) for name, dtype in COLUMNS.items()}
        emb = np.asarray(rows["embedding"], dtype=np.float32).reshape(n, self.dim)
        if any(len(v) != n for v in data.values()):
            raise ValueError("shard columns differ in length")
        first = int(data["pos"][0]) if n else 0
        self._written += 1
        path = self.root / f"shard-{first:012d}-{self._run}-{self._written:06d}.npz"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, embedding=emb, **data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def covered_rows(self) -> Iterator[tuple[str, int, float]]:
        """(rel, size, mtime) of every row in the shards, shard by shard: files that need no
        embedding."""
        for path in self.paths():
            with np.load(path) as z:
                yield from zip(z["rel"].tolist(), z["size"].tolist(), z["mtime"].tolist())

    def rows(self) -> Iterator[dict[str, np.ndarray]]:
        """Each shard's columns, shard by shard (one shard in memory at a time)."""
        for path in self.paths():
            with np.load(path) as z:
                yield {name: z[name] for name in (*COLUMNS, "embedding")}

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
