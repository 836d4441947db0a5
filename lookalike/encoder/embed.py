"""Batches of pixels -> L2-normalised float32 embeddings with the Keras encoder (TensorFlow).

This is the reference embedding: training fits the whitening with it and checks the portable
model against it (lookalike.encoder.export). Queries, indexing and dedupe run the exported
graph in lookalike.encoder.runtime, without TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ModelConfig
from .backend import keras, tf
from .model import GeMPooling  # noqa: F401  (registers the layer for load_model)
from .runtime import check_pixels
from .whitening import Whitening, fit_whitening  # noqa: F401  (re-exported)


def view_matrices(cfg: ModelConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The test-time views as (rows, cols) sampling matrices: view = rows @ image @ cols.T.

    A centre crop of ``scale`` resized back to the input size is bilinear sampling, the same
    sample positions as ``tf.image.crop_and_resize`` with the box (o, o, 1-o, 1-o), written as a
    fixed linear map per axis; a mirror reverses the columns' matrix. Matrix products export to
    any runtime as they are, where crop_and_resize does not.
    """
    size = cfg.image_size
    out = []
    for scale in tuple(cfg.tta_scales) or (1.0,):
        m = np.eye(size, dtype=np.float64)
        if scale < 1.0:
            o = (1.0 - scale) / 2.0
            pos = o * (size - 1) + np.arange(size) * (1.0 - 2 * o) * (size - 1) / max(size - 1, 1)
            top, bottom = np.floor(pos).astype(int), np.ceil(pos).astype(int)
            m = np.zeros((size, size))
            np.add.at(m, (np.arange(size), top), 1.0 - (pos - top))
            np.add.at(m, (np.arange(size), bottom), pos - top)
        out.append((m.astype(np.float32), m.astype(np.float32)))
    if cfg.flip_average:
        out += [(rows, cols[::-1].copy()) for rows, cols in out]
    return out


def embedding_function(encoder: keras.Model, whitening: Whitening | None, cfg: ModelConfig):
    """The whole embedding as one tf.function: (n, s, s, 3) uint8 -> (n, d) float32.

    Views (centre crops, mirrors), one encoder call over all of them, the mean over views, then
    the whitening and L2 normalisation (without a whitening: the raw mean pooled features).
    Constants are made inside the function so an export sees them as part of the graph.
    """
    size = cfg.image_size
    spec = tf.TensorSpec([None, size, size, 3], tf.uint8, name="pixels")
    matrices = view_matrices(cfg)
    white = None if whitening is None else (whitening.mean, whitening.projection)

    @tf.function(input_signature=[spec])
    def embed(pixels):
        x = tf.transpose(tf.cast(pixels, tf.float32), [0, 3, 1, 2])  # (n, 3, s, s)
        n = tf.shape(x)[0]
        views = [
            tf.transpose(
                tf.matmul(tf.matmul(tf.constant(rows), x), tf.constant(cols.T)), [0, 2, 3, 1]
            )
            for rows, cols in matrices
        ]
        f = encoder(tf.concat(views, axis=0), training=False)["features"]
        f = tf.reduce_mean(tf.reshape(f, [len(views), n, -1]), axis=0)
        if white is None:
            return f
        f = tf.matmul(f - tf.constant(white[0]), tf.constant(white[1]))
        return tf.math.l2_normalize(f, axis=1)

    return embed


class Embedder:
    """Embeds uint8 pixel batches with the encoder's pooled features, view-averaged and whitened.

    Without a whitening it returns the raw pooled features (used to fit the whitening).
    """

    def __init__(self, encoder: keras.Model, whitening: Whitening | None, cfg: ModelConfig):
        self.encoder = encoder
        self.whitening = whitening
        self.cfg = cfg
        self.function = embedding_function(encoder, whitening, cfg)

    @property
    def dim(self) -> int:
        if self.whitening is not None:
            return int(self.whitening.projection.shape[1])
        return int(self.encoder.output["features"].shape[-1])

    def __call__(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(n, size, size, 3) uint8 -> (n, dim) float32, unit rows once whitened."""
        check_pixels(pixels, self.cfg.image_size)
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = [
            self.function(np.ascontiguousarray(pixels[i : i + batch_size], dtype=np.uint8)).numpy()
            for i in range(0, len(pixels), batch_size)
        ]
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    @classmethod
    def load(cls, encoder_path: Path, whitening_path: Path, cfg: ModelConfig) -> Embedder:
        encoder = keras.models.load_model(encoder_path, compile=False)
        return cls(encoder, Whitening.load(whitening_path), cfg)
