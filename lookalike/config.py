"""Model hyperparameters (frozen dataclasses saved with the model) and runtime settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and training of the autoencoder; saved as the store's config.json."""

    image_size: int = 64  # square input side in pixels; every image is resized to this
    input_norm: str = "image"  # unit: /255 | image, channel: per-image standardised (and target)
    filters: tuple[int, ...] = (32, 64, 128, 256)  # channels of each stride-2 conv level
    decoder_filters: tuple[int, ...] | None = None  # decoder widths per level; None: filters
    refine_levels: tuple[int, ...] = (1, 2, 3, 4)  # levels with a second, stride-1 3x3 conv
    residual: bool = True  # the second conv of a level adds to its input (a residual block)
    code_channels: int = 16  # channels of the bottleneck; code = (size/16)^2 * this floats
    pooled_levels: tuple[int, ...] = (1, 2, 3)  # 1-based levels GeM-pooled into the embedding
    gem_p: float = 3.0  # generalised-mean pooling exponent (1 = average, large = max)
    pool_grids: int = 3  # 1: GeM over the whole map; g > 1: regional GeM, grids 1..g (R-MAC)
    embedding_dim: int = 128  # dimension after PCA whitening (<= pooled feature size)
    whiten_shrink: float = 0.1  # eigenvalue floor, as a share of the mean eigenvalue
    flip_average: bool = True  # embed the image and its mirror, average the features
    tta_scales: tuple[float, ...] = (1.0, 0.8)  # centre crops (side share) averaged at embedding
    augment: bool = True  # denoising training: input an augmented view, target the clean image
    crop_min: float = 0.6  # smallest random crop side, as a share of the image side
    rotate_degrees: float = 0.0  # random rotation range (+-) of the training views
    blur: bool = False  # randomly blur half of the training views
    mask_ratio: float = 0.75  # masked reconstruction: share of patches hidden in a view (0: off)
    mask_patch: int = 16  # side of a hidden square patch, pixels (must divide image_size)
    mask_loss: str = "all"  # MSE over: all (the whole image) | masked (the hidden patches only)
    mask_mix: float = 0.5  # share of the training views that are masked (the rest unmasked)
    bn_clean_stats: bool = False  # after training, BatchNorm statistics from clean images
    epochs: int | None = None  # None: the steps train_samples asks for (at most max_epochs)
    train_samples: int = 24_000  # augmented images seen in training up to budget_images
    budget_images: int = 4_000  # training sets above this get more samples (see samples_for)
    budget_growth: float = 0.5  # samples grow as (train images / budget_images)^this; 0: fixed
    max_train_samples: int = 200_000  # cap of the grown budget
    max_train_seconds: float | None = 900.0  # wall-time cap of the epochs; None: no cap
    max_epochs: int = 60  # cap for small collections
    batch_size: int = 64  # training batch
    learning_rate: float = 2e-3  # Adam, initial
    cosine_decay: bool = True  # anneal the learning rate to ~0 over the planned epochs
    validation_split: float = 0.1  # share of the training sample held out
    patience: int = 6  # epochs without validation improvement before stopping
    max_train_images: int = 20000  # training sample cap: memory and time stay bounded
    seed: int = 0  # same seed, same sample, same augmentations, same model

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, lists become tuples.

        A complete config saved before a field existed (it has every field of that time) gets
        the value that reproduces the old model for it (``_LEGACY``), not today's default; a
        partial dict (``--model-config``) gets today's defaults.
        """
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        if _SAVED_V1_FIELDS <= data.keys():
            kwargs.update({k: v for k, v in _LEGACY.items() if k not in data})
        for key, value in data.items():
            if key in names:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    def split(self, images: int) -> tuple[int, int]:
        """(training, validation) images of a training sample of this many images."""
        n_val = min(max(1, round(images * self.validation_split)), images - 1)
        return images - n_val, n_val

    def samples_for(self, train_images: int) -> int:
        """Training budget in augmented samples: train_samples, growing sublinearly above
        budget_images training images (exponent budget_growth), at most max_train_samples."""
        grow = max(1.0, train_images / self.budget_images) ** self.budget_growth
        return int(min(self.max_train_samples, round(self.train_samples * grow)))

    def plan(self, train_images: int) -> tuple[int, int]:
        """(epochs, steps of the last epoch) of training on train_images, batch_size images a
        step: cfg.epochs whole epochs, or the budget's samples, i.e. whole epochs and then as many
        steps as the rest of the budget asks for (1..max_epochs epochs, the last may be partial)."""
        per_epoch = -(-train_images // self.batch_size)
        if self.epochs is not None:
            return self.epochs, per_epoch
        full, rest = divmod(self.samples_for(train_images), max(1, train_images))
        if full >= self.max_epochs or (rest == 0 and full > 0):
            return min(full, self.max_epochs), per_epoch
        return full + 1, -(-rest // self.batch_size)

    def with_budget(self, factor: float) -> ModelConfig:
        """The training budget (samples, their cap and the time cap) times factor."""
        if not factor > 0:
            raise ValueError(f"training budget factor must be > 0, got {factor}")
        seconds = self.max_train_seconds
        return dataclasses.replace(
            self,
            train_samples=max(1, round(self.train_samples * factor)),
            max_train_samples=max(1, round(self.max_train_samples * factor)),
            max_train_seconds=None if seconds is None else seconds * factor,
        )

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with the given fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# Fields of every config saved before the standardised input and regional pooling; a saved
# config without the newer fields was written by a model that behaves like these values.
_SAVED_V1_FIELDS = frozenset(
    "image_size filters code_channels pooled_levels gem_p embedding_dim "
    "whiten_shrink flip_average augment epochs batch_size learning_rate validation_split "
    "patience max_train_images seed".split()
)
_LEGACY = {
    "input_norm": "unit",
    "pool_grids": 1,
    "decoder_filters": None,
    "residual": False,  # residual levels came with issue 18's round 3 (session 6)
    "bn_clean_stats": False,
    # masked reconstruction and the growing, time-capped budget came later: off
    "mask_ratio": 0.0,
    "budget_growth": 0.0,
    "max_train_seconds": None,
}


@dataclass(frozen=True)
class IndexOptions:
    """How `lookalike index` walks and embeds a folder."""

    batch_size: int = 128  # images decoded and embedded together
    index_type: str = "auto"  # flat | ivf | auto (flat below AUTO_IVF_THRESHOLD images)
    retrain: bool = False  # train a new model even if the store has one
    workers: int = 2  # decoding threads
    max_pixels: int = 64_000_000  # images with more pixels are skipped as possible bombs
    max_decode_bytes: int = 100_000_000  # images whose decoding needs more memory are skipped
    labels: str | None = None  # "folders", a labels CSV path, or None to keep the store's source
    prune: bool = False  # allow a run to remove more than half of the stored rows (or all)


@dataclass(frozen=True)
class RayOptions:
    """How `lookalike index --ray` runs on a Ray cluster (see docs/scaling.md)."""

    address: str = "local"  # "local": start a Ray instance here; else a cluster's address
    workers: int | None = None  # embedding actors; None: from the cluster's CPUs
    batch_size: int = 128  # images per map_batches call
    shard_rows: int = 4096  # embedded images per shard file in STORE/shards
    index_tasks: int | None = None  # parallel IVF filling tasks; None: the cluster's CPUs


class Settings(BaseSettings):
    """Runtime settings of the service and CLI, from LOOKALIKE_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", env_file=None)

    store: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_upload_bytes: int = 20 * 1024 * 1024  # request bodies above this get 413
    body_timeout_s: float = 20.0  # a request body that stops arriving this long gets 408
    max_image_pixels: int = 64_000_000  # decoded images above this are refused (bombs)
    max_decode_bytes: int = 100_000_000  # memory one decode may hold (images.decode_cost)
    api_key: str | None = None  # when set, POST /images and DELETE need X-API-Key
    cors_origins: list[str] = []  # closed by default
    thumbnail_size: int = Field(256, ge=1, le=1024)  # default thumbnail side, pixels (served at
    # the next size of lookalike.api.thumbnails.SIZES up)
    write_timeout: float = 2.0  # seconds a write waits for the store's lock before 503
    dedupe_move_to: Path | None = None  # the review page's "move the others" folder; None: off


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
