"""Tests for the training budget: samples growing with the collection, and the time cap."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import TINY, make_photo

from lookalike.config import ModelConfig
from lookalike.encoder.train import stop_reason, train_autoencoder


def plan(cfg: ModelConfig, photos: int) -> tuple[int, int, int, int]:
    """(training images, budget, epochs, samples seen) `lookalike index` plans for photos."""
    train = cfg.split(min(photos, cfg.max_train_images))[0]
    epochs, last_steps = cfg.plan(train)
    last = min(train, last_steps * cfg.batch_size)  # the last epoch may be partial
    return train, cfg.samples_for(train), epochs, (epochs - 1) * train + last


@pytest.mark.parametrize(
    "photos, expected",
    [
        (1_000, (900, 24_000, 27, 24_040)),  # small: the fixed 24,000 samples, 27 epochs
        (4_258, (3_832, 24_000, 7, 24_016)),  # intel_scenes: six epochs and 16 steps
        (10_000, (9_000, 36_000, 4, 36_000)),  # 24,000 x (9,000 / 4,000)^0.5
        (60_000, (18_000, 50_912, 3, 50_912)),  # the sample stops at 20,000 photos
        (1_000_000, (18_000, 50_912, 3, 50_912)),
    ],
)
def test_the_default_budget_grows_with_the_collection(photos, expected):
    assert plan(ModelConfig(), photos) == expected


def test_the_last_epoch_runs_only_the_steps_left_of_the_budget():
    cfg = ModelConfig(train_samples=1_000, batch_size=100)
    assert cfg.plan(300) == (4, 1)  # 3 epochs of 300, then one step for the last 100
    assert cfg.plan(250) == (4, 3)  # 4 x 250 = 1,000: whole epochs
    assert cfg.plan(2_000) == (1, 10)  # half an epoch
    assert ModelConfig(epochs=5, batch_size=100).plan(250) == (5, 3)  # whole epochs asked
    assert ModelConfig(train_samples=10**6, max_epochs=8).plan(100) == (8, 2)  # capped


def test_the_budget_is_capped():
    cfg = ModelConfig(max_train_images=10**6, max_train_samples=100_000)
    assert cfg.samples_for(10**6) == 100_000
    assert cfg.samples_for(3_000) == 24_000


def test_configs_saved_before_the_growing_budget_keep_the_fixed_one():
    saved = ModelConfig().to_dict()
    for key in ("budget_images", "budget_growth", "max_train_samples", "max_train_seconds"):
        del saved[key]
    old = ModelConfig.from_dict(saved)
    assert old.max_train_seconds is None
    assert [old.samples_for(n) for n in (900, 9_000, 18_000)] == [24_000] * 3


def test_train_budget_scales_samples_and_time_cap():
    cfg = ModelConfig().with_budget(2)
    assert (cfg.train_samples, cfg.max_train_samples, cfg.max_train_seconds) == (
        48_000,
        400_000,
        1800.0,
    )
    assert plan(cfg, 10_000)[1] == 72_000
    with pytest.raises(ValueError, match="budget factor must be > 0"):
        ModelConfig().with_budget(0)


def test_training_stops_at_the_budget_within_the_last_epoch():
    pixels = np.stack(
        [np.asarray(make_photo(np.random.default_rng(s), (32, 32))) for s in range(24)]
    )
    cfg = dataclasses.replace(
        TINY, batch_size=8, epochs=None, train_samples=30, max_train_seconds=None, patience=9
    )
    seen = []
    result = train_autoencoder(pixels, cfg, progress=lambda *a: seen.append(a))
    h = result.history  # 22 training images, 3 steps an epoch: 22 samples, then one step of 8
    assert (h["train_images"], h["epochs_planned"], h["epochs_run"]) == (22, 2, 2)
    assert h["steps_planned"] == h["steps_run"] == 4
    assert [a[1:] for a in seen if a[0].startswith("epoch")][-1] == (4, 4)


def test_the_time_cap_stops_training_and_keeps_a_usable_model():
    pixels = np.stack(
        [np.asarray(make_photo(np.random.default_rng(s), (32, 32))) for s in range(24)]
    )
    # a zero cap: one step, then validation, the best weights and the usual export
    cfg = dataclasses.replace(TINY, batch_size=8, epochs=None, max_train_seconds=0.0)
    result = train_autoencoder(pixels, cfg)
    h = result.history
    assert h["time_capped"] and h["epochs_run"] == 1 and h["epochs_planned"] > 1
    assert "time cap" in stop_reason(h)
    assert h["best_val_loss"] < h["initial_val_loss"]
    vectors = result.embedder(cfg)(pixels[:4])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-4)
    assert result.portable and result.export_check


def test_index_train_budget_flag_scales_the_budget(monkeypatch, tmp_path, photos_dir):
    from typer.testing import CliRunner

    import lookalike.indexer
    from lookalike.cli import app

    seen = {}

    def fake_index_folder(photos, store, model, **kwargs):
        seen["model"] = model
        raise SystemExit(0)

    monkeypatch.setattr(lookalike.indexer, "index_folder", fake_index_folder)
    args = ["index", str(photos_dir), "--store", str(tmp_path / "s"), "--train-budget", "0.5"]
    CliRunner().invoke(app, args)
    assert seen["model"] == ModelConfig().with_budget(0.5)
    refused = CliRunner().invoke(app, [*args[:-1], "0"])
    assert refused.exit_code == 2 and "train-budget" in refused.output
    assert not (tmp_path / "s").exists()


def test_the_schedule_is_keras_cosine_until_time_paces_it():
    from lookalike.encoder.backend import keras
    from lookalike.encoder.train import TimedCosine

    timed = TimedCosine(2e-3, 100)
    cosine = keras.optimizers.schedules.CosineDecay(2e-3, 100, alpha=0.02)
    for step in (0, 1, 50, 99, 100):
        assert float(timed(step)) == float(cosine(step))
    timed.time_share.assign(0.5)  # half the time spent: at least half-way through the decay
    assert float(timed(10)) == pytest.approx(float(cosine(50)))
    assert float(timed(80)) == pytest.approx(float(cosine(80)))
