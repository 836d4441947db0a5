"""PCA whitening of the pooled features: fitted once after training, applied in every embedding.

NumPy only: the portable runtime and the store read it without TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig


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


def fit_whitening(
    features: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, cfg: ModelConfig
) -> Whitening:
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
