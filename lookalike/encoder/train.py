"""Train the autoencoder with MSE on a sample of the collection and fit the embedding whitening."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig
from .augment import augment, mask_patches
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
    plan = _Plan.of(n, cfg, rng)
    encoder, decoder, autoencoder = build_autoencoder(cfg)
    learning_rate = cfg.learning_rate
    if cfg.cosine_decay:  # anneal to 0 over the planned steps: a fixed budget ends converged
        learning_rate = TimedCosine(cfg.learning_rate, plan.planned)
    train_step, val_step = _step_functions(autoencoder, cfg, keras.optimizers.Adam(learning_rate))
    history = _fit(
        autoencoder, pixels, cfg, plan, (train_step, val_step), rng, learning_rate, progress
    )
    if cfg.bn_clean_stats:  # the embedding sees clean images, not masked, augmented views
        clean_batchnorm_statistics(encoder, pixels, plan.train_idx, cfg.batch_size)
    if progress:  # the bar ends where training ended, saying why
        progress(stop_reason(history), history["steps_run"], history["steps_run"])
    return _finish(encoder, decoder, autoencoder, pixels, plan, cfg, history, progress)


@dataclass(frozen=True)
class _Plan:
    """A run's split and steps: the budget's steps (cfg.plan), the last epoch maybe partial."""

    val_idx: np.ndarray
    train_idx: np.ndarray
    epochs: int
    steps: int  # of a whole epoch
    last_steps: int  # of the last epoch

    @classmethod
    def of(cls, n: int, cfg: ModelConfig, rng: np.random.Generator) -> _Plan:
        order = rng.permutation(n)
        n_val = cfg.split(n)[1]
        train_idx = order[n_val:]
        steps = max(1, -(-len(train_idx) // cfg.batch_size))
        epochs, last_steps = cfg.plan(len(train_idx))
        return cls(np.sort(order[:n_val]), train_idx, epochs, steps, last_steps)

    @property
    def planned(self) -> int:
        return (self.epochs - 1) * self.steps + self.last_steps

    def steps_of(self, epoch: int) -> int:
        return self.steps if epoch < self.epochs - 1 else self.last_steps


def _step_functions(autoencoder: keras.Model, cfg: ModelConfig, optimizer) -> tuple:
    """The compiled training step (augmented, maybe masked view in, MSE to the clean image,
    one Adam update) and validation step (the summed MSE of clean images)."""
    variables = autoencoder.trainable_variables
    spec = tf.TensorSpec([None, cfg.image_size, cfg.image_size, 3], tf.uint8)

    @tf.function(input_signature=[spec, tf.TensorSpec([2], tf.int32)], reduce_retracing=True)
    def train_step(batch, seed):
        clean = tf.cast(batch, tf.float32)
        inputs = augment(clean, seed, cfg) if cfg.augment else clean
        mask = None
        if cfg.mask_ratio > 0:
            inputs, mask = mask_patches(inputs, seed, cfg)
        with tf.GradientTape() as tape:
            recon = autoencoder(inputs, training=True)
            error = tf.square(recon - normalize_pixels(clean, cfg.input_norm))
            loss = reconstruction_loss(error, mask, cfg.mask_loss)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    @tf.function(input_signature=[spec])
    def val_step(batch):
        clean = tf.cast(batch, tf.float32)
        recon = autoencoder(clean, training=False)
        target = normalize_pixels(clean, cfg.input_norm)
        return tf.reduce_sum(tf.reduce_mean(tf.square(recon - target), axis=(1, 2, 3)))

    return train_step, val_step


@dataclass
class _Pace:
    """The wall-time cap (cfg.max_train_seconds). Once an epoch's pace says the run will not fit
    it, the cosine anneals by elapsed time (only then does the model depend on the machine's
    speed; otherwise same seed, same model); past it, the epoch ends there."""

    cap: float | None
    learning_rate: object
    planned: int
    started: float = field(default_factory=time.perf_counter)
    timed: bool = False  # the cap, not the steps, paces the learning rate
    timed_out: bool = False

    def after_step(self) -> bool:
        """Whether the cap is reached (then the epoch ends here, is validated, may be kept)."""
        if self.cap is None:
            return False
        elapsed = time.perf_counter() - self.started
        if self.timed:
            self.learning_rate.time_share.assign(elapsed / self.cap if self.cap > 0 else 1.0)
        self.timed_out = elapsed >= self.cap
        return self.timed_out

    def after_epoch(self, done: int) -> None:
        if self.cap is not None and isinstance(self.learning_rate, TimedCosine):
            elapsed = time.perf_counter() - self.started
            self.timed = self.timed or elapsed / max(done, 1) * self.planned > self.cap

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 2)


def _fit(autoencoder, pixels, cfg, plan: _Plan, step_fns, rng, learning_rate, progress) -> dict:
    """The epochs, with early stopping on the validation MSE; the best weights are set back.
    Returns the history (losses per epoch, best epoch, steps and why it stopped)."""
    train_step, val_step = step_fns

    def val_loss() -> float:
        n_val, idx = len(plan.val_idx), plan.val_idx
        return sum(float(val_step(pixels[idx[i : i + 256]])) for i in range(0, n_val, 256)) / n_val

    history: dict = {"loss": [], "val_loss": [], "initial_val_loss": val_loss()}
    best, best_weights, waited = np.inf, autoencoder.get_weights(), 0
    pace = _Pace(cfg.max_train_seconds, learning_rate, plan.planned)
    done = 0  # steps run
    for epoch in range(plan.epochs):
        losses = _epoch(train_step, pixels, cfg, plan, epoch, rng, pace, progress)
        done += len(losses)
        history["loss"].append(float(np.mean(losses)))
        history["val_loss"].append(val_loss())
        log.info(
            "epoch %d: loss %.5f val_loss %.5f",
            epoch + 1,
            *(history[k][-1] for k in ("loss", "val_loss")),
        )
        if history["val_loss"][-1] < best:
            best, best_weights, waited = history["val_loss"][-1], autoencoder.get_weights(), 0
        elif (waited := waited + 1) >= cfg.patience:
            break
        if pace.timed_out:
            break
        pace.after_epoch(done)
    autoencoder.set_weights(best_weights)
    return _record(history, plan, best, done, pace)


def _epoch(train_step, pixels, cfg, plan: _Plan, epoch: int, rng, pace: _Pace, progress):
    """One epoch's steps (all, or what the budget leaves of the last) in a new seeded order,
    until the time cap; returns their losses."""
    perm, losses = rng.permutation(plan.train_idx), []
    for step in range(plan.steps_of(epoch)):
        idx = np.sort(perm[step * cfg.batch_size : (step + 1) * cfg.batch_size])
        if len(idx) == 0:
            continue
        seed = tf.constant([cfg.seed, epoch * 1_000_003 + step], tf.int32)
        losses.append(float(train_step(pixels[idx], seed)))
        if progress:
            progress(
                f"epoch {epoch + 1}/{plan.epochs}", epoch * plan.steps + step + 1, plan.planned
            )
        if pace.after_step():
            break
    return losses


def _record(history: dict, plan: _Plan, best: float, done: int, pace: _Pace) -> dict:
    run = len(history["val_loss"])
    return history | dict(
        best_epoch=int(np.argmin(history["val_loss"])) + 1,
        best_val_loss=float(best),
        epochs_run=run,
        epochs_planned=plan.epochs,
        steps_planned=plan.planned,
        steps_run=done,
        stopped_early=run < plan.epochs,
        time_capped=pace.timed_out,
        train_images=len(plan.train_idx),
        val_images=len(plan.val_idx),
        seconds=pace.seconds(),
    )


def _finish(
    encoder, decoder, autoencoder, pixels, plan: _Plan, cfg, history, progress
) -> TrainResult:
    """Fit the whitening, draw the preview, export the embedding to ONNX and check it."""

    def stage(name: str, done: int) -> None:
        if progress:
            progress(name, done, 1)

    stage("whitening", 0)
    whitening = fit_whitening(Embedder(encoder, None, cfg), pixels, cfg)
    stage("whitening", 1)
    preview_src = pixels[plan.val_idx[:8]]
    recon = np.asarray(autoencoder(tf.cast(preview_src, tf.float32), training=False))
    if cfg.input_norm != "unit":  # back to [0, 1] with each original's own statistics
        recon = _destandardize(recon, preview_src.astype(np.float32) / 255.0, cfg.input_norm)
    stage("export", 0)
    portable, check = export_checked(Embedder(encoder, whitening, cfg), pixels, cfg.seed)
    stage("export", 1)
    return TrainResult(
        encoder, decoder, whitening, history, _preview(preview_src, recon), portable, check
    )


def clean_batchnorm_statistics(
    encoder: keras.Model, pixels: np.ndarray, indices: np.ndarray, batch: int, limit: int = 2048
) -> None:
    """Set the running statistics of the encoder's BatchNorm layers to the mean of their batch
    statistics over up to ``limit`` clean training images (full batches), instead of the
    moving average over the masked, augmented views training saw. Weights are unchanged."""
    norms = [
        layer for layer in encoder.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    idx = np.sort(indices[:limit])
    starts = range(0, max(1, len(idx) - batch + 1), batch)
    saved = [layer.momentum for layer in norms]
    try:
        for i, start in enumerate(starts):
            for layer in norms:  # momentum i/(i+1): the running mean of the batches so far
                layer.momentum = i / (i + 1)
            encoder(tf.cast(pixels[idx[start : start + batch]], tf.float32), training=True)
    finally:
        for layer, momentum in zip(norms, saved):
            layer.momentum = momentum


def stop_reason(history: dict) -> str:
    """Why training ended, e.g. `epoch 42/60: stopped early, best val loss 0.0123 at epoch 36`."""
    run, planned = history["epochs_run"], history.get("epochs_planned", history["epochs_run"])
    why = "stopped early" if run < planned else "done"
    if history.get("time_capped"):
        why = "stopped at the time cap"
    best = f"best val loss {history['best_val_loss']:.4g} at epoch {history['best_epoch']}"
    return f"epoch {run}/{planned}: {why}, {best}"


def reconstruction_loss(error: tf.Tensor, mask: tf.Tensor | None, over: str) -> tf.Tensor:
    """Mean of the squared error (n, s, s, c): over every pixel, or with ``over="masked"`` over
    the hidden pixels of the masked views (and every pixel of the views left unmasked)."""
    if mask is None or over == "all":
        return tf.reduce_mean(error)
    if over != "masked":
        raise ValueError(f"unknown mask_loss {over!r}: all or masked")
    unmasked = 1.0 - tf.reduce_max(mask, axis=(1, 2, 3), keepdims=True)
    weight = mask + unmasked  # (n, s, s, 1)
    total = tf.reduce_sum(weight) * tf.cast(tf.shape(error)[-1], tf.float32)
    return tf.reduce_sum(error * weight) / tf.maximum(total, 1.0)


class TimedCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine decay over the planned steps, or over the time cap when that comes first.

    ``time_share`` (elapsed / cap, set by the training loop once an epoch's pace says the run
    will not fit the cap) moves the schedule on when time, not steps, is what runs out, so a
    run stopped by the cap has still annealed. At time_share 0 it is exactly keras'
    CosineDecay (alpha 0.02).
    """

    def __init__(self, initial: float, steps: int):
        self.cosine = keras.optimizers.schedules.CosineDecay(initial, steps, alpha=0.02)
        self.steps = steps
        self.time_share = tf.Variable(0.0, trainable=False, dtype=tf.float32)

    def __call__(self, step):
        step = tf.maximum(tf.cast(step, tf.float32), self.time_share * float(self.steps))
        return self.cosine(step)

    def get_config(self):
        return {"initial": self.cosine.initial_learning_rate, "steps": self.steps}


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
