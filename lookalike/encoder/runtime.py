"""The portable embedding: the store's exported graph (model/embed.onnx) on onnxruntime.

Every path that embeds -- search, suggest, serve, index, dedupe, eval, the Ray actors -- runs
this. It imports neither TensorFlow nor Keras: uint8 pixels in, unit vectors out, the views,
pooling, whitening and normalisation all inside the graph (lookalike.encoder.export).

Two sessions on the same bytes, made when first needed: one thread for a query's few images
(thread start-up and hand-off cost more than they save on one 4-view batch, and a server's
other requests keep the other cores busy), all cores for batches.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import ModelConfig

PORTABLE_FILE = "embed.onnx"  # in STORE/model
SMALL_BATCH = 8  # batches up to this many images run on the one-thread session
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
        small = self._session(1)
        self.input_name = small.get_inputs()[0].name
        self.dim = int(small.get_outputs()[0].shape[-1])

    def _session(self, threads: int):
        session = self._sessions.get(threads)
        if session is None:
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
        threads = 1 if len(pixels) <= SMALL_BATCH else self.threads
        session = self._session(threads)
        step = max(1, min(batch_size, CHUNK))
        out = [
            session.run(
                None, {self.input_name: np.ascontiguousarray(pixels[i : i + step], np.uint8)}
            )[0]
            for i in range(0, len(pixels), step)
        ]
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def check_pixels(pixels: np.ndarray, size: int) -> None:
    """ValueError unless pixels is an (n, size, size, 3) batch."""
    if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
        raise ValueError(f"expected pixels of shape (n, {size}, {size}, 3), got {pixels.shape}")
