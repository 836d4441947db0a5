"""The portable embedding: the store's exported graph (model/embed.onnx) on onnxruntime.

Every path that embeds -- search, suggest, serve, index, dedupe, eval, the Ray actors -- runs
this. It imports neither TensorFlow nor Keras: uint8 pixels in, unit vectors out, the views,
pooling, whitening and normalisation all inside the graph (lookalike.encoder.export).

Sessions on the same bytes, made when first needed, by the work at hand: all cores for
batches (indexing); for a query's few images, QUERY_THREADS when no other call is running
(a lone query is answered sooner) and one thread while others are (a busy server's other
requests keep the other cores busy, and a query's views are too little work to share).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..config import ModelConfig

PORTABLE_FILE = "embed.onnx"  # in STORE/model
SMALL_BATCH = 8  # batches up to this many images are a query: QUERY_THREADS alone, else 1
# threads for a lone query (its 4 views' convolutions split well in two); 1 for servers that
# run a worker per core (`serve --workers N`)
QUERY_THREADS = max(1, int(os.environ.get("LOOKALIKE_QUERY_THREADS", "2")))
# images per session run: throughput is flat from 16 to 256 (44-45 images/s at load 17), peak
# memory is not (144 MB at 16, 307 MB at 64, 955 MB at 256: the views' activations)
CHUNK = 32


class PortableEmbedder:
    """(n, s, s, 3) uint8 -> (n, d) float32 unit rows, on onnxruntime; the Embedder's interface."""

    def __init__(self, model: Path | bytes, cfg: ModelConfig, threads: int | None = None):
        self.model = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.cfg = cfg
        self.threads = threads or os.cpu_count() or 1
        self._sessions: dict[int, object] = {}
        self._running = 0  # calls in progress, in any thread
        self._count_lock = threading.Lock()
        self._session_lock = threading.Lock()
        small = self._session(1)
        self.input_name = small.get_inputs()[0].name
        self.dim = int(small.get_outputs()[0].shape[-1])

    def _session(self, threads: int):
        session = self._sessions.get(threads)
        if session is not None:
            return session
        with self._session_lock:  # two first queries at once make one session, not two
            return self._sessions.get(threads) or self._new_session(threads)

    def _new_session(self, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # errors only
        # idle threads sleep instead of spinning: a server's other work keeps the cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(self.model, opts, providers=["CPUExecutionProvider"])
        self._sessions[threads] = session
        return session

    def __call__(self, pixels: np.ndarray, batch_size: int = CHUNK) -> np.ndarray:
        """(n, size, size, 3) uint8 -> (n, dim) float32 unit rows, at most batch_size (and
        CHUNK) images a run."""
        check_pixels(pixels, self.cfg.image_size)
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float32)
        step = max(1, min(batch_size, CHUNK))
        with self._counted() as alone:
            session = self._session(self.threads_for(len(pixels), alone))
            out = [
                session.run(
                    None, {self.input_name: np.ascontiguousarray(pixels[i : i + step], np.uint8)}
                )[0]
                for i in range(0, len(pixels), step)
            ]
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def threads_for(self, images: int, alone: bool) -> int:
        """Intra-op threads for a call of that many images (module docstring)."""
        if images > SMALL_BATCH:
            return self.threads
        return min(QUERY_THREADS, self.threads) if alone else 1

    @contextmanager
    def _counted(self):
        """Counts the call while it runs; yields whether it is the only one."""
        with self._count_lock:
            self._running += 1
            alone = self._running == 1
        try:
            yield alone
        finally:
            with self._count_lock:
                self._running -= 1


def check_pixels(pixels: np.ndarray, size: int) -> None:
    """ValueError unless pixels is an (n, size, size, 3) batch."""
    if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
        raise ValueError(f"expected pixels of shape (n, {size}, {size}, 3), got {pixels.shape}")
