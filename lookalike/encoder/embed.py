"""Batches of pixels -> L2-normalised float32 embeddings, through one compiled function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras  # noqa: E402
import numpy as np
import tensorflow as tf  # noqa: E402

from ..config import ModelConfig
from .model import GeMPooling  # noqa: F401  (registers the layer for load_model)


@dataclass(frozen=True)
class Whitening:
    """PCA whitening fitted on the collection: e = normalise((f - mean) @ projection)."""

    mean: np.ndarray  # (D,) float32, mean pooled feature
    projection: np.ndarray  # (D, d) float32, eigenvectors scaled by 1/sqrt(eigenvalue + floor)
    explained: float = 1.0  # share of the feature variance the d components keep

    def save(self, path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, mean=self.mean, projection=self.projection, explained=self.explained)

    @classmethod
    def load(cls, path: Path) -> Whitening:
        with np.load(path) as data:
            return cls(
                data["mean"].astype(np.float32),
                data["projection"].astype(np.float32),
                float(data["explained"]),
            )


class Embedder:
    """Embeds uint8 pixel batches with the encoder's pooled features, flip-averaged and whitened.

    Without a whitening it returns the raw pooled features (used to fit the whitening).
    """

    def __init__(self, encoder: keras.Model, whitening: Whitening | None, cfg: ModelConfig):
        self.encoder = encoder
        self.whitening = whitening
        self.cfg = cfg
        size = cfg.image_size
        spec = tf.TensorSpec([None, size, size, 3], tf.uint8)
        mean = proj = None
        if whitening is not None:
            mean = tf.constant(whitening.mean)
            proj = tf.constant(whitening.projection)

        scales = tuple(cfg.tta_scales) or (1.0,)

        @tf.function(input_signature=[spec])
        def run(pixels):
            x = tf.cast(pixels, tf.float32)
            n = tf.shape(x)[0]
            views = []
            for scale in scales:  # centre crops, resized back to the input size
                if scale < 1.0:
                    o = (1.0 - scale) / 2.0
                    boxes = tf.tile(tf.constant([[o, o, 1.0 - o, 1.0 - o]]), [n, 1])
                    views.append(tf.image.crop_and_resize(x, boxes, tf.range(n), [size, size]))
                else:
                    views.append(x)
            if cfg.flip_average:
                views += [tf.reverse(v, axis=[2]) for v in views]
            # one encoder call over all views: (views * n, ...) -> mean over views
            f = encoder(tf.concat(views, axis=0), training=False)["features"]
            f = tf.reduce_mean(tf.reshape(f, [len(views), n, -1]), axis=0)
            if proj is not None:
                f = tf.matmul(f - mean, proj)
            return tf.math.l2_normalize(f, axis=1) if proj is not None else f

        self._run = run

    @property
    def dim(self) -> int:
        if self.whitening is not None:
            return int(self.whitening.projection.shape[1])
        return int(self.encoder.output["features"].shape[-1])

    def __call__(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(n, size, size, 3) uint8 -> (n, dim) float32, unit rows once whitened."""
        if pixels.ndim != 4 or pixels.shape[1:] != (self.cfg.image_size,) * 2 + (3,):
            raise ValueError(
                f"expected pixels of shape (n, {self.cfg.image_size}, {self.cfg.image_size}, 3),"
                f" got {pixels.shape}"
            )
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = [
            self._run(np.ascontiguousarray(pixels[i : i + batch_size], dtype=np.uint8)).numpy()
            for i in range(0, len(pixels), batch_size)
        ]
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    @classmethod
    def load(cls, encoder_path: Path, whitening_path: Path, cfg: ModelConfig) -> Embedder:
        encoder = keras.models.load_model(encoder_path, compile=False)
        return cls(encoder, Whitening.load(whitening_path), cfg)


def fit_whitening(features: Embedder, pixels: np.ndarray, cfg: ModelConfig) -> Whitening:
    """Fit PCA whitening on the raw features of pixels, streaming the covariance in batches.

    Eigenvalues get a floor of ``cfg.whiten_shrink`` times their mean before the 1/sqrt, so the
    near-empty directions of a small collection are not blown up into noise.
    """
    total = None
    outer = None
    n = len(pixels)
    for start in range(0, n, 512):
        f = features(pixels[start : start + 512]).astype(np.float64)
        total = f.sum(0) if total is None else total + f.sum(0)
        outer = f.T @ f if outer is None else outer + f.T @ f
    mean = total / n
    cov = outer / n - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0, None), eigvec[:, order]
    d = min(cfg.embedding_dim, len(eigval))
    floor = cfg.whiten_shrink * float(eigval.mean()) + 1e-12
    projection = eigvec[:, :d] / np.sqrt(eigval[:d] + floor)
    explained = float(eigval[:d].sum() / max(eigval.sum(), 1e-12))
    return Whitening(mean.astype(np.float32), projection.astype(np.float32), explained)
