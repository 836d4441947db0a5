"""Seeded, batched image augmentations for denoising training (TensorFlow ops, no Python loop)."""

from __future__ import annotations

from collections.abc import Callable

from ..config import ModelConfig
from .backend import tf


def augment(x: tf.Tensor, seed: tf.Tensor, cfg: ModelConfig) -> tf.Tensor:
    """A random view of each image: crop, rotation, blur, flip, colour jitter, grayscale, noise.

    x: (n, s, s, 3) float32 in [0, 255]; seed: (2,) int32. Same seed, same views (each step
    draws from its own numbered keys of the seed).
    """
    n = tf.shape(x)[0]
    keys = tf.random.experimental.stateless_split(seed, 13)

    def uniform(i, low, high):
        return tf.random.stateless_uniform([n], keys[i], low, high)

    x = _crop(x, uniform, cfg)
    if cfg.rotate_degrees > 0:
        x = _rotate(x, uniform, cfg)
    if cfg.blur:  # blend towards a 3x3 box blur, per image 0..1, half of the views
        blurred = tf.nn.avg_pool2d(x, 3, 1, "SAME")
        t = uniform(11, 0.0, 1.0) * tf.cast(uniform(12, 0.0, 1.0) < 0.5, tf.float32)
        x = x + (blurred - x) * t[:, None, None, None]
    flip = uniform(4, 0.0, 1.0) < 0.5
    x = tf.where(flip[:, None, None, None], tf.reverse(x, axis=[2]), x)
    x = _colour(x, uniform)
    sigma = tf.random.stateless_uniform([n, 1, 1, 1], keys[9], 0.0, 8.0)
    noise = tf.random.stateless_normal(
        tf.shape(x), tf.random.experimental.stateless_fold_in(keys[9], 1)
    )
    return tf.clip_by_value(x + noise * sigma, 0.0, 255.0)


def _crop(x: tf.Tensor, uniform: Callable, cfg: ModelConfig) -> tf.Tensor:
    """A random crop of crop_min..1 of the side, aspect ratio jittered by up to +-15 %, resized
    back to the model's side (keys 0-3)."""
    side = uniform(0, cfg.crop_min, 1.0)
    aspect = tf.exp(uniform(1, -0.15, 0.15))
    h = tf.minimum(side * aspect, 1.0)
    w = tf.minimum(side / aspect, 1.0)
    y0 = uniform(2, 0.0, 1.0) * (1.0 - h)
    x0 = uniform(3, 0.0, 1.0) * (1.0 - w)
    boxes = tf.stack([y0, x0, y0 + h, x0 + w], axis=1)
    s = cfg.image_size
    return tf.image.crop_and_resize(x, boxes, tf.range(tf.shape(x)[0]), [s, s])


def _rotate(x: tf.Tensor, uniform: Callable, cfg: ModelConfig) -> tf.Tensor:
    """A small rotation about the centre, corners filled by the edge (key 10)."""
    angle = uniform(10, -1.0, 1.0) * (cfg.rotate_degrees * 3.14159265 / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    c = (cfg.image_size - 1) / 2.0
    zeros = tf.zeros_like(angle)
    transforms = tf.stack(
        [cos, -sin, c - c * cos + c * sin, sin, cos, c - c * sin - c * cos, zeros, zeros], axis=1
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=[cfg.image_size, cfg.image_size],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )


def _colour(x: tf.Tensor, uniform: Callable) -> tf.Tensor:
    """Saturation 0.6-1.4 (grayscale for 10 % of the views), contrast 0.7-1.3 about the
    image's mean, brightness +-20 % (keys 5-8)."""
    gray = tf.reduce_mean(x, axis=3, keepdims=True)
    saturation = uniform(5, 0.6, 1.4)[:, None, None, None]
    to_gray = (uniform(6, 0.0, 1.0) < 0.1)[:, None, None, None]
    saturation = tf.where(to_gray, 0.0, saturation)
    x = gray + (x - gray) * saturation
    mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
    contrast = uniform(7, 0.7, 1.3)[:, None, None, None]
    brightness = uniform(8, -0.2, 0.2)[:, None, None, None] * 255.0
    return (x - mean) * contrast + mean + brightness


# an offset folded into the batch seed, so the masks draw from their own stream and the views
# above stay exactly what they were before masking existed
_MASK_STREAM = 7919


def mask_patches(x: tf.Tensor, seed: tf.Tensor, cfg: ModelConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """Hide random square patches of the views for masked reconstruction: (views, mask).

    A share ``cfg.mask_mix`` of the views (each drawn with that probability) get exactly
    round(mask_ratio * patches) of their ``cfg.mask_patch``-pixel patches filled with the view's
    mean, which the per-image standardisation turns into ~0: no signal, as in MAE's empty tokens.
    mask: (n, s, s, 1) float32, 1 where hidden. Same seed, same masks.
    """
    s, p = cfg.image_size, cfg.mask_patch
    if p < 1 or s % p:
        raise ValueError(f"mask_patch {p} must divide image_size {s}")
    grid = s // p
    hide = round(cfg.mask_ratio * grid * grid)
    n = tf.shape(x)[0]
    keys = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, _MASK_STREAM), 2
    )
    if hide <= 0:
        return x, tf.zeros_like(x[..., :1])
    scores = tf.random.stateless_uniform([n, grid * grid], keys[0])
    kth = tf.math.top_k(scores, hide).values[:, -1:]  # the hide highest scores per view
    chosen = tf.random.stateless_uniform([n, 1], keys[1]) < cfg.mask_mix
    hidden = tf.cast((scores >= kth) & chosen, tf.float32)
    hidden = tf.reshape(hidden, [n, grid, grid, 1])
    mask = tf.repeat(tf.repeat(hidden, p, axis=1), p, axis=2)
    mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
    return x + (mean - x) * mask, mask
