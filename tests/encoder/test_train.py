"""Tests for lookalike.encoder.train and .embed: training, determinism, embeddings, whitening.

One model is trained for the module (a second, identical one checks determinism).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY, make_photo

from lookalike.encoder.embed import Embedder, Whitening
from lookalike.encoder.train import TrainResult, stop_reason, train_autoencoder
from lookalike.store import Store

# 48 images, batch 8: 5 training steps per epoch (43 training, 5 validation images)
N_IMAGES = 48
CFG = TINY.replace(batch_size=8, epochs=4, patience=4)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    size = (CFG.image_size, CFG.image_size)
    return np.stack(
        [np.asarray(make_photo(np.random.default_rng(s), size)) for s in range(N_IMAGES)]
    )


@pytest.fixture(scope="module")
def trained(pixels) -> tuple[TrainResult, list]:
    calls: list = []
    result = train_autoencoder(pixels, CFG, lambda *a: calls.append(a))
    return result, calls


# --------------------------------------------------------------------------- training


def test_training_lowers_validation_mse_below_the_untrained_model(trained):
    h = trained[0].history
    assert h["initial_val_loss"] > h["best_val_loss"], (
        f"validation MSE went from {h['initial_val_loss']:.5f} (untrained) to "
        f"{h['best_val_loss']:.5f} at best; per epoch {h['val_loss']}, train loss {h['loss']}"
    )


def test_history_record(trained):
    h = trained[0].history
    assert 1 <= h["epochs_run"] <= CFG.epochs
    assert len(h["loss"]) == len(h["val_loss"]) == h["epochs_run"]
    assert 1 <= h["best_epoch"] <= h["epochs_run"]
    assert h["best_val_loss"] == pytest.approx(min(h["val_loss"]))
    assert h["val_images"] + h["train_images"] == N_IMAGES
    assert h["val_images"] == round(N_IMAGES * CFG.validation_split)
    assert all(np.isfinite(h["loss"])) and h["seconds"] >= 0


def test_progress_reports_epochs_whitening_and_export(trained):
    stages = [c[0] for c in trained[1]]
    assert "epoch 1/4" in stages
    assert stages[-2:] == ["export", "export"] and "whitening" in stages
    done, total = trained[1][0][1:]
    assert 1 <= done <= total


def test_training_is_one_bar_over_the_planned_epochs_that_says_why_it_stopped(trained):
    h = trained[0].history
    calls = [c for c in trained[1] if c[0].startswith("epoch")]
    steps = -(-h["train_images"] // CFG.batch_size)
    *running, last = calls
    assert {total for _, _, total in running} == {CFG.epochs * steps}  # one bar, not one an epoch
    dones = [done for _, done, _ in running]
    assert dones == sorted(dones) and dones[0] == 1 and dones[-1] == h["epochs_run"] * steps
    assert running[-1][0] == f"epoch {h['epochs_run']}/{CFG.epochs}"
    assert last[1] == last[2] == h["epochs_run"] * steps  # the bar ends complete
    assert last[0] == stop_reason(h)
    assert f"best val loss {h['best_val_loss']:.4g} at epoch {h['best_epoch']}" in last[0]
    assert h["epochs_planned"] == CFG.epochs and h["stopped_early"] is (h["epochs_run"] < 4)


def test_stop_reason_names_an_early_stop():
    history = {"epochs_run": 42, "epochs_planned": 60, "best_val_loss": 0.01234, "best_epoch": 36}
    assert stop_reason(history) == "epoch 42/60: stopped early, best val loss 0.01234 at epoch 36"
    assert "done" in stop_reason(history | {"epochs_run": 60})


def test_preview_is_originals_over_reconstructions(trained):
    preview = trained[0].preview
    s = CFG.image_size
    assert preview.dtype == np.uint8
    assert preview.shape[0] == 2 * s and preview.shape[1] % s == 0 and preview.shape[2] == 3


def test_same_seed_gives_identical_weights(pixels, trained):
    first = trained[0]
    second = train_autoencoder(pixels, CFG)
    assert second.history["val_loss"] == first.history["val_loss"]
    for model_a, model_b in ((first.encoder, second.encoder), (first.decoder, second.decoder)):
        wa, wb = model_a.get_weights(), model_b.get_weights()
        assert len(wa) == len(wb) > 0
        for a, b in zip(wa, wb):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.whitening.projection, second.whitening.projection)
    np.testing.assert_array_equal(first.whitening.mean, second.whitening.mean)


def test_needs_two_images(pixels):
    with pytest.raises(ValueError, match="at least 2"):
        train_autoencoder(pixels[:1], CFG)


# --------------------------------------------------------------------------- embeddings


def test_embeddings_are_float32_unit_norm(pixels, trained):
    embed = trained[0].embedder(CFG)
    assert embed.dim == CFG.embedding_dim
    e = embed(pixels)
    assert e.dtype == np.float32 and e.shape == (N_IMAGES, CFG.embedding_dim)
    assert e.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # distinct photos give distinct vectors
    sims = e @ e.T
    assert np.all(sims[~np.eye(N_IMAGES, dtype=bool)] < 0.999)


def test_embeddings_do_not_depend_on_batching(pixels, trained):
    embed = trained[0].embedder(CFG)
    whole = embed(pixels)
    pieces = embed(pixels, batch_size=7)
    single = np.concatenate([embed(pixels[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(pieces, whole, atol=1e-5)
    np.testing.assert_allclose(single, whole[:5], atol=1e-5)


def test_flip_average_makes_mirror_images_embed_alike(pixels, trained):
    embed = trained[0].embedder(CFG)
    mirrored = pixels[:, :, ::-1, :]
    np.testing.assert_allclose(embed(mirrored[:6]), embed(pixels[:6]), atol=1e-4)


def test_embedder_checks_shapes_and_handles_empty(trained):
    embed = trained[0].embedder(CFG)
    with pytest.raises(ValueError, match="expected pixels of shape"):
        embed(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="expected pixels of shape"):
        embed(np.zeros((32, 32, 3), np.uint8))
    empty = embed(np.zeros((0, 32, 32, 3), np.uint8))
    assert empty.shape == (0, CFG.embedding_dim) and empty.dtype == np.float32


def test_unwhitened_embedder_gives_raw_features(pixels, trained):
    raw = Embedder(trained[0].encoder, None, CFG)
    pooled = sum(CFG.filters[level - 1] for level in CFG.pooled_levels)
    assert raw.dim == pooled
    f = raw(pixels[:3])
    assert f.shape == (3, pooled)


def test_whitening_shape(trained):
    w = trained[0].whitening
    pooled = sum(CFG.filters[level - 1] for level in CFG.pooled_levels)
    assert w.mean.shape == (pooled,) and w.mean.dtype == np.float32
    assert w.projection.shape == (pooled, CFG.embedding_dim) and w.projection.dtype == np.float32
    assert 0.0 < w.explained <= 1.0 + 1e-9


def test_whitening_save_load_round_trip(tmp_path, trained):
    w = trained[0].whitening
    path = tmp_path / "whitening.npz"
    w.save(path)
    back = Whitening.load(path)
    np.testing.assert_array_equal(back.mean, w.mean)
    np.testing.assert_array_equal(back.projection, w.projection)
    assert back.explained == w.explained
    assert back.mean.dtype == back.projection.dtype == np.float32


def test_store_load_embedder_matches_the_in_memory_model(tmp_path, pixels, trained):
    result = trained[0]
    in_memory = result.embedder(CFG)(pixels)
    with Store.open(tmp_path / "store", create=True) as store:
        assert not store.is_trained
        store.save_model(result, CFG)
        assert store.is_trained and store.model_serial == 1
        assert store.model_config() == CFG
        assert store.dim == CFG.embedding_dim
        assert store.info["image_size"] == CFG.image_size
        assert store.training_record() == result.history
        names = {p.name for p in store.model_dir.iterdir()}
        assert {"config.json", "encoder.keras", "decoder.keras", "whitening.npz"} <= names
        assert {"embed.onnx", "export.json"} <= names
        assert {"training.json", "reconstructions.png"} <= names
        loaded = store.load_embedder()
        # the portable model (onnxruntime) embeds as the Keras model does, to float rounding
        assert np.sum(loaded(pixels) * in_memory, axis=1).min() >= 0.9999
        np.testing.assert_allclose(loaded(pixels), in_memory, rtol=0, atol=1e-4)
        w = Whitening.load(store.model_dir / "whitening.npz")
        np.testing.assert_array_equal(w.projection, result.whitening.projection)
        # saving again swaps the folder as a whole and leaves nothing behind
        store.save_model(result, CFG)
        assert store.model_serial == 2
        assert not (store.root / "model.old").exists()
        assert not (store.root / "model.tmp").exists()
    with Store.open(tmp_path / "store") as store:
        assert store.model_serial == 2
        np.testing.assert_allclose(store.load_embedder()(pixels), in_memory, rtol=0, atol=1e-4)


def test_clean_batchnorm_statistics_are_the_mean_of_clean_batch_statistics(pixels):
    import keras

    from lookalike.encoder.model import build_encoder
    from lookalike.encoder.train import clean_batchnorm_statistics

    keras.utils.set_random_seed(3)
    encoder = build_encoder(CFG)
    start = np.asarray(encoder.get_layer("down1_bn").moving_mean).copy()
    trainable = [np.asarray(v).copy() for v in encoder.trainable_weights]
    conv = keras.Model(encoder.input, encoder.get_layer("down1").output)
    batches = [pixels[i : i + 8].astype(np.float32) for i in range(0, N_IMAGES, 8)]
    want = np.mean([np.asarray(conv(b)).mean(axis=(0, 1, 2)) for b in batches], axis=0)
    clean_batchnorm_statistics(encoder, pixels, np.arange(N_IMAGES), 8)
    bn = encoder.get_layer("down1_bn")
    np.testing.assert_allclose(np.asarray(bn.moving_mean), want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(bn.moving_mean), start)
    assert bn.momentum == 0.9  # restored
    for before, after in zip(trainable, encoder.trainable_weights):
        np.testing.assert_array_equal(before, np.asarray(after))  # weights untouched


def test_bn_clean_stats_changes_only_the_running_statistics(pixels, trained):
    result = train_autoencoder(pixels, CFG.replace(bn_clean_stats=True))
    plain = trained[0]
    for a, b in zip(plain.encoder.trainable_weights, result.encoder.trainable_weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same training
    means = [w for w in result.encoder.weights if "moving_mean" in w.path]
    plain_means = [w for w in plain.encoder.weights if "moving_mean" in w.path]
    assert means and not all(
        np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(means, plain_means)
    )
