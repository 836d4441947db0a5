"""Build the autoencoder: a strided-conv encoder, a mirrored decoder, composed for MSE training."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
from keras import layers, ops  # noqa: E402

from ..config import ModelConfig  # noqa: E402


@keras.saving.register_keras_serializable(package="lookalike")
class GeMPooling(layers.Layer):
    """Generalised-mean pooling over height and width: (mean(x^p))^(1/p), x clipped at eps."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.p = float(p)
        self.eps = float(eps)

    def call(self, x):
        x = ops.maximum(x, self.eps)
        return ops.power(ops.mean(ops.power(x, self.p), axis=(1, 2)), 1.0 / self.p)

    def get_config(self):
        return {**super().get_config(), "p": self.p, "eps": self.eps}


def _conv(x, filters: int, strides: int, name: str):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_encoder(cfg: ModelConfig) -> keras.Model:
    """Encoder: (size, size, 3) pixels in [0, 255] -> {"code": bottleneck, "features": pooled}.

    Each level halves the resolution (stride-2 conv, then a 3x3 conv). The bottleneck ``code``
    feeds the decoder; ``features`` concatenates the L2-normalised GeM pools of the levels in
    ``cfg.pooled_levels`` and is what the embedding is made from.
    """
    side = cfg.image_size
    if side % (2 ** len(cfg.filters)):
        raise ValueError(f"image_size {side} must be divisible by 2^{len(cfg.filters)}")
    inputs = keras.Input((side, side, 3), name="pixels")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    pooled = []
    for level, filters in enumerate(cfg.filters, start=1):
        x = _conv(x, filters, 2, f"down{level}")
        if level in cfg.refine_levels:
            x = _conv(x, filters, 1, f"conv{level}")
        if level in cfg.pooled_levels:
            g = GeMPooling(cfg.gem_p, name=f"gem{level}")(x)
            pooled.append(layers.UnitNormalization(name=f"norm{level}")(g))
    code = layers.Conv2D(cfg.code_channels, 1, name="code")(x)
    features = pooled[0] if len(pooled) == 1 else layers.Concatenate(name="features")(pooled)
    return keras.Model(inputs, {"code": code, "features": features}, name="encoder")


def build_decoder(cfg: ModelConfig) -> keras.Model:
    """Decoder mirroring the encoder: code -> (size, size, 3) reconstruction in [0, 1]."""
    low = cfg.image_size // 2 ** len(cfg.filters)
    inputs = keras.Input((low, low, cfg.code_channels), name="code")
    x = _conv(inputs, cfg.filters[-1], 1, "expand")
    for level, filters in zip(range(len(cfg.filters), 0, -1), reversed(cfg.filters)):
        x = layers.Conv2DTranspose(
            filters, 3, strides=2, padding="same", use_bias=False, name=f"up{level}"
        )(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"up{level}_bn")(x)
        x = layers.ReLU(name=f"up{level}_relu")(x)
    outputs = layers.Conv2D(3, 3, padding="same", activation="sigmoid", name="reconstruction")(x)
    return keras.Model(inputs, outputs, name="decoder")


def build_autoencoder(cfg: ModelConfig) -> tuple[keras.Model, keras.Model, keras.Model]:
    """(encoder, decoder, autoencoder); the autoencoder maps pixels to their reconstruction."""
    encoder = build_encoder(cfg)
    decoder = build_decoder(cfg)
    inputs = keras.Input((cfg.image_size, cfg.image_size, 3), name="pixels")
    outputs = decoder(encoder(inputs)["code"])
    return encoder, decoder, keras.Model(inputs, outputs, name="autoencoder")
