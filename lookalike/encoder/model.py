"""Build the autoencoder: a strided-conv encoder, a mirrored decoder, composed for MSE training."""

from __future__ import annotations

from ..config import ModelConfig
from .backend import keras

layers, ops = keras.layers, keras.ops


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


@keras.saving.register_keras_serializable(package="lookalike")
class RegionalGeM(layers.Layer):
    """R-MAC-like pooling: GeM over overlapping regions at several grid sizes, unit-normalised.

    Grid g = 1..grids cuts the map into g x g overlapping square regions of about 2/(g+1) of its
    side (1: the whole map; 2: four of 2/3; 3: nine of 1/2). Each region is GeM-pooled and
    L2-normalised, the regions of a grid are averaged, the grids summed, the sum L2-normalised.
    A crop of a photo then still shares whole regions with the photo's descriptor. Grids whose
    regions would be under 2x2 cells (maps of side 2 or 3) are left out.
    """

    def __init__(self, p: float = 3.0, grids: int = 3, eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.p = float(p)
        self.grids = int(grids)
        self.eps = float(eps)

    def call(self, x):
        side = int(x.shape[1])
        xp = ops.power(ops.maximum(x, self.eps), self.p)
        total = None
        for g in range(1, self.grids + 1):
            size = side if g == 1 else round(side * 2 / (g + 1))
            if g > 1 and size < 2:  # a one-cell "region" is a single activation: noise
                continue
            stride = 1 if g == 1 else max(1, (side - size) // (g - 1))
            region = ops.power(ops.average_pool(xp, size, stride, "valid"), 1.0 / self.p)
            region = region / ops.maximum(ops.norm(region, axis=-1, keepdims=True), 1e-12)
            grid = ops.mean(region, axis=(1, 2))
            total = grid if total is None else total + grid
        return total

    def get_config(self):
        return {**super().get_config(), "p": self.p, "grids": self.grids, "eps": self.eps}


NORM_EPS = 0.02  # std floor (in [0, 1] units) so a flat image's noise is not blown up


def normalize_pixels(x, mode: str):
    """Pixels in [0, 255] -> the encoder's input (and the decoder's target) for ``mode``.

    "unit": x / 255. "image": per image, minus its mean and over its standard deviation taken
    over all pixels and channels, so brightness and contrast are gone but the colour balance
    stays. "channel": the same per channel, so a colour cast goes too.
    """
    x = x / 255.0
    if mode == "unit":
        return x
    if mode not in ("image", "channel"):
        raise ValueError(f"unknown input_norm {mode!r}: unit, image or channel")
    axes = (1, 2, 3) if mode == "image" else (1, 2)
    mean = ops.mean(x, axis=axes, keepdims=True)
    var = ops.mean(ops.square(x - mean), axis=axes, keepdims=True)
    return (x - mean) / ops.sqrt(var + NORM_EPS**2)


@keras.saving.register_keras_serializable(package="lookalike")
class Standardize(layers.Layer):
    """Per-image standardisation of [0, 255] pixels (see :func:`normalize_pixels`)."""

    def __init__(self, mode: str = "image", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):
        return normalize_pixels(x, self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _conv(x, filters: int, strides: int, name: str, residual: bool = False):
    """3x3 conv, BatchNorm, ReLU; ``residual``: the ReLU of input + BatchNorm(conv(input))."""
    y = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=name)(x)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(y)
    if residual:
        y = layers.Add(name=f"{name}_add")([x, y])
    return layers.ReLU(name=f"{name}_relu")(y)


def build_encoder(cfg: ModelConfig) -> keras.Model:
    """Encoder: (size, size, 3) pixels in [0, 255] -> {"code": bottleneck, "features": pooled}.

    Each level halves the resolution (stride-2 conv, then a 3x3 conv, residual with
    ``cfg.residual``). The bottleneck ``code``
    feeds the decoder; ``features`` concatenates the L2-normalised GeM pools of the levels in
    ``cfg.pooled_levels`` and is what the embedding is made from.
    """
    side = cfg.image_size
    if side % (2 ** len(cfg.filters)):
        raise ValueError(f"image_size {side} must be divisible by 2^{len(cfg.filters)}")
    inputs = keras.Input((side, side, 3), name="pixels")
    if cfg.input_norm == "unit":
        x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    else:
        x = Standardize(cfg.input_norm, name="standardize")(inputs)
    pooled = []
    for level, filters in enumerate(cfg.filters, start=1):
        x = _conv(x, filters, 2, f"down{level}")
        if level in cfg.refine_levels:
            x = _conv(x, filters, 1, f"conv{level}", cfg.residual)
        if level in cfg.pooled_levels:
            if cfg.pool_grids > 1:
                g = RegionalGeM(cfg.gem_p, cfg.pool_grids, name=f"rgem{level}")(x)
            else:
                g = GeMPooling(cfg.gem_p, name=f"gem{level}")(x)
            pooled.append(layers.UnitNormalization(name=f"norm{level}")(g))
    code = layers.Conv2D(cfg.code_channels, 1, name="code")(x)
    features = pooled[0] if len(pooled) == 1 else layers.Concatenate(name="features")(pooled)
    return keras.Model(inputs, {"code": code, "features": features}, name="encoder")


def build_decoder(cfg: ModelConfig) -> keras.Model:
    """Decoder mirroring the encoder: code -> (size, size, 3) reconstruction.

    In [0, 1] (sigmoid) for ``input_norm="unit"``, else unbounded (the standardised image).
    """
    low = cfg.image_size // 2 ** len(cfg.filters)
    widths = tuple(cfg.decoder_filters or cfg.filters)
    if len(widths) != len(cfg.filters):
        raise ValueError(f"decoder_filters {widths} needs one width per level of {cfg.filters}")
    inputs = keras.Input((low, low, cfg.code_channels), name="code")
    x = _conv(inputs, widths[-1], 1, "expand")
    for level, filters in zip(range(len(widths), 0, -1), reversed(widths)):
        x = layers.Conv2DTranspose(
            filters, 3, strides=2, padding="same", use_bias=False, name=f"up{level}"
        )(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"up{level}_bn")(x)
        x = layers.ReLU(name=f"up{level}_relu")(x)
    activation = "sigmoid" if cfg.input_norm == "unit" else None
    outputs = layers.Conv2D(3, 3, padding="same", activation=activation, name="reconstruction")(x)
    return keras.Model(inputs, outputs, name="decoder")


def build_autoencoder(cfg: ModelConfig) -> tuple[keras.Model, keras.Model, keras.Model]:
    """(encoder, decoder, autoencoder); the autoencoder maps pixels to their reconstruction."""
    encoder = build_encoder(cfg)
    decoder = build_decoder(cfg)
    inputs = keras.Input((cfg.image_size, cfg.image_size, 3), name="pixels")
    outputs = decoder(encoder(inputs)["code"])
    return encoder, decoder, keras.Model(inputs, outputs, name="autoencoder")
