"""Train the autoencoder with MSE on a sample of the collection and fit the embedding whitening."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig
from .augment import augment
from .backend import keras, tf
from .embed import Embedder, Whitening, fit_whitening
from .export import export_checked
from .model import NORM_EPS, build_autoencoder, normalize_pixels

log = logging.getLogger(__name__)

# progress(stage, done, total): while training, stage is "epoch <i>/<n>" and done/total count the
# steps of all n planned epochs (one bar; the last training call says why it stopped), then
# "whitening" and "export"
ProgressFn = Callable[[str, int, int], None]


@dataclass
class TrainResult:
    """What training produces: the models, the whitening, and a record of the run."""

    encoder: keras.Model
    decoder: keras.Model
    whitening: Whitening
    history: dict = field(default_factory=dict)
    preview: np.ndarray | None = None  # (2*size, m*size, 3) uint8: originals over reconstructions
    portable: bytes | None = None  # the whole embedding as ONNX (lookalike.encoder.export)
    export_check: dict = field(default_factory=dict)  # its check against the Keras embedding

    def embedder(self, cfg: ModelConfig) -> Embedder:
        return Embedder(self.encoder, self.whitening, cfg)


def train_autoencoder(
    pixels: np.ndarray, cfg: ModelConfig, progress: ProgressFn | None = None
) -> TrainResult:
    """Train on pixels, an (n, size, size, 3) uint8 array or memmap (the training sample).

    A seeded share is held out for validation; each epoch visits the rest in a new seeded order;
    the input is an augmented view when ``cfg.augment`` (denoising), the target the clean image;
    training stops after ``cfg.patience`` epochs without a lower validation MSE and keeps the
    best weights. Same pixels and seed, same model. The whole embedding is then exported to
    ONNX and checked on a seeded sample of pixels (StoreError if it does not reproduce it).
    """
    n = len(pixels)
    if n < 2:
        raise ValueError(f"need at least 2 images to train, got {n}")
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n)
    n_val = min(max(1, round(n * cfg.validation_split)), n - 1)
    val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]

    encoder, decoder, autoencoder = build_autoencoder(cfg)
    bs = cfg.batch_size
    steps = max(1, -(-len(train_idx) // bs))
    epochs = cfg.epochs_for(len(train_idx))
    learning_rate = cfg.learning_rate
    if cfg.cosine_decay:  # anneal to 0 over the planned steps: a fixed budget ends converged
        learning_rate = keras.optimizers.schedules.CosineDecay(
            cfg.learning_rate, decay_steps=epochs * steps, alpha=0.02
        )
    optimizer = keras.optimizers.Adam(learning_rate)
    variables = autoencoder.trainable_variables
    spec = tf.TensorSpec([None, cfg.image_size, cfg.image_size, 3], tf.uint8)

    @tf.function(input_signature=[spec, tf.TensorSpec([2], tf.int32)], reduce_retracing=True)
    def train_step(batch, seed):
        clean = tf.cast(batch, tf.float32)
        inputs = augment(clean, seed, cfg) if cfg.augment else clean
        with tf.GradientTape() as tape:
            recon = autoencoder(inputs, training=True)
            loss = tf.reduce_mean(tf.square(recon - normalize_pixels(clean, cfg.input_norm)))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    @tf.function(input_signature=[spec])
    def val_step(batch):
        clean = tf.cast(batch, tf.float32)
        recon = autoencoder(clean, training=False)
        target = normalize_pixels(clean, cfg.input_norm)
        return tf.reduce_sum(tf.reduce_mean(tf.square(recon - target), axis=(1, 2, 3)))

    def val_loss() -> float:
        total = 0.0
        for start in range(0, n_val, 256):
            total += float(val_step(pixels[val_idx[start : start + 256]]))
        return total / n_val

    history: dict = {"loss": [], "val_loss": [], "initial_val_loss": val_loss()}
    best, best_weights, waited = np.inf, autoencoder.get_weights(), 0
    started = time.perf_counter()
    for epoch in range(epochs):
        perm = rng.permutation(train_idx)
        losses = []
        for step in range(steps):
            idx = np.sort(perm[step * bs : (step + 1) * bs])
            if len(idx) == 0:
                continue
            seed = tf.constant([cfg.seed, epoch * 1_000_003 + step], tf.int32)
            losses.append(float(train_step(pixels[idx], seed)))
            if progress:
                progress(f"epoch {epoch + 1}/{epochs}", epoch * steps + step + 1, epochs * steps)
        vl = val_loss()
        history["loss"].append(float(np.mean(losses)))
        history["val_loss"].append(vl)
        log.info("epoch %d: loss %.5f val_loss %.5f", epoch + 1, history["loss"][-1], vl)
        if vl < best:
            best, best_weights, waited = vl, autoencoder.get_weights(), 0
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    autoencoder.set_weights(best_weights)
    run = len(history["val_loss"])
    history.update(
        best_epoch=int(np.argmin(history["val_loss"])) + 1,
        best_val_loss=float(best),
        epochs_run=run,
        epochs_planned=epochs,
        stopped_early=run < epochs,
        train_images=len(train_idx),
        val_images=int(n_val),
        seconds=round(time.perf_counter() - started, 2),
    )
    if progress:  # the bar ends where training ended, saying why
        progress(stop_reason(history), run * steps, run * steps)
        progress("whitening", 0, 1)
    whitening = fit_whitening(Embedder(encoder, None, cfg), pixels, cfg)
    if progress:
        progress("whitening", 1, 1)
    preview_src = pixels[val_idx[:8]]
    recon = np.asarray(autoencoder(tf.cast(preview_src, tf.float32), training=False))
    if cfg.input_norm != "unit":  # back to [0, 1] with each original's own statistics
        recon = _destandardize(recon, preview_src.astype(np.float32) / 255.0, cfg.input_norm)
    preview = _preview(preview_src, recon)
    if progress:
        progress("export", 0, 1)
    portable, check = export_checked(Embedder(encoder, whitening, cfg), pixels, cfg.seed)
    if progress:
        progress("export", 1, 1)
    return TrainResult(encoder, decoder, whitening, history, preview, portable, check)


def stop_reason(history: dict) -> str:
    """Why training ended, e.g. `epoch 42/60: stopped early, best val loss 0.0123 at epoch 36`."""
    run, planned = history["epochs_run"], history.get("epochs_planned", history["epochs_run"])
    why = "stopped early" if run < planned else "done"
    best = f"best val loss {history['best_val_loss']:.4g} at epoch {history['best_epoch']}"
    return f"epoch {run}/{planned}: {why}, {best}"


def _destandardize(recon: np.ndarray, src: np.ndarray, mode: str) -> np.ndarray:
    """Undo :func:`normalize_pixels` on recon with the statistics of src (in [0, 1])."""
    axes = (1, 2, 3) if mode == "image" else (1, 2)
    mean = src.mean(axis=axes, keepdims=True)
    std = np.sqrt(src.var(axis=axes, keepdims=True) + NORM_EPS**2)
    return recon * std + mean


def _preview(originals: np.ndarray, recon) -> np.ndarray:
    """Originals on the top row, their reconstructions below: (2*s, m*s, 3) uint8."""
    recon = np.clip(np.asarray(recon) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    top = np.concatenate(list(originals), axis=1)
    bottom = np.concatenate(list(recon), axis=1)
    return np.concatenate([top, bottom], axis=0)
