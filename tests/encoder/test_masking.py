"""Tests for masked reconstruction: lookalike.encoder.augment.mask_patches and the masked loss."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY

from lookalike.config import _LEGACY, ModelConfig
from lookalike.encoder.augment import augment, mask_patches
from lookalike.encoder.backend import tf
from lookalike.encoder.embed import Embedder
from lookalike.encoder.model import build_encoder
from lookalike.encoder.train import reconstruction_loss

SIDE = TINY.image_size  # 32: a 4x4 grid of 8-px patches
MASKED = TINY.replace(mask_mix=1.0, mask_ratio=0.5, mask_patch=8)
PLAIN = TINY.replace(mask_mix=1.0, mask_ratio=0.0)


def views(n: int = 64, seed: int = 0) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(0, 255, (n, SIDE, SIDE, 3)), tf.float32)


def seed_of(a: int, b: int = 0) -> tf.Tensor:
    return tf.constant([a, b], tf.int32)


@pytest.mark.parametrize("ratio, patch", [(0.5, 8), (0.75, 8), (0.25, 4), (0.5, 16)])
def test_every_masked_view_hides_the_requested_share_of_patches(ratio, patch):
    cfg = TINY.replace(mask_mix=1.0, mask_ratio=ratio, mask_patch=patch)
    _, mask = mask_patches(views(), seed_of(1), cfg)
    grid = SIDE // patch
    share = np.asarray(mask).mean(axis=(1, 2, 3))
    np.testing.assert_array_equal(share, round(ratio * grid * grid) / grid**2)
    # whole patches: each patch-sized cell is all hidden or all visible
    cells = np.asarray(mask)[..., 0].reshape(-1, grid, patch, grid, patch)
    assert np.all(cells.min(axis=(2, 4)) == cells.max(axis=(2, 4)))


def test_hidden_pixels_hold_the_view_mean_and_the_rest_is_untouched():
    x = views()
    out, mask = mask_patches(x, seed_of(2), MASKED)
    x, out, hidden = np.asarray(x), np.asarray(out), np.asarray(mask)[..., 0] > 0
    mean = x.mean(axis=(1, 2, 3))
    for i in range(len(x)):
        np.testing.assert_allclose(out[i][hidden[i]], mean[i], rtol=1e-5)
        np.testing.assert_array_equal(out[i][~hidden[i]], x[i][~hidden[i]])


def test_masks_are_seeded():
    a = np.asarray(mask_patches(views(), seed_of(3, 7), MASKED)[1])
    b = np.asarray(mask_patches(views(), seed_of(3, 7), MASKED)[1])
    c = np.asarray(mask_patches(views(), seed_of(3, 8), MASKED)[1])
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert len({m.tobytes() for m in a}) > 32, "views of one batch should get different masks"


def test_mask_mix_masks_that_share_of_the_views():
    cfg = MASKED.replace(mask_mix=0.5)
    masked = np.asarray(mask_patches(views(400), seed_of(4), cfg)[1]).max(axis=(1, 2, 3))
    assert 0.4 < masked.mean() < 0.6, masked.mean()


def test_masking_off_leaves_the_views_as_they_were():
    x = views()
    out, mask = mask_patches(x, seed_of(5), PLAIN)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    assert not np.asarray(mask).any()
    # the masks draw from their own stream: the denoising views do not change with them
    plain = augment(x, seed_of(5), PLAIN)
    with_masks = augment(x, seed_of(5), MASKED.replace(mask_loss="masked", mask_mix=0.5))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(with_masks))


def test_a_patch_that_does_not_divide_the_image_is_refused():
    with pytest.raises(ValueError, match="mask_patch 12 must divide image_size 32"):
        mask_patches(
            views(2), seed_of(0), TINY.replace(mask_mix=1.0, mask_ratio=0.5, mask_patch=12)
        )


def test_masked_loss_averages_the_hidden_pixels_of_masked_views_only():
    rng = np.random.default_rng(0)
    error = rng.uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)
    mask = np.zeros((2, 4, 4, 1), np.float32)
    mask[0, :2] = 1  # view 0: top half hidden; view 1: not masked, all its pixels count
    expected = (error[0, :2].sum() + error[1].sum()) / (8 * 3 + 16 * 3)
    got = float(reconstruction_loss(tf.constant(error), tf.constant(mask), "masked"))
    assert got == pytest.approx(expected, rel=1e-6)
    assert float(reconstruction_loss(tf.constant(error), tf.constant(mask), "all")) == (
        pytest.approx(error.mean(), rel=1e-6)
    )


def test_masks_do_not_reach_the_embedding():
    encoder = build_encoder(PLAIN)
    pixels = np.asarray(views(8), np.uint8)
    plain = Embedder(encoder, None, PLAIN)(pixels)
    masked_cfg = MASKED.replace(mask_loss="masked", mask_mix=0.5)
    np.testing.assert_array_equal(Embedder(encoder, None, masked_cfg)(pixels), plain)


def test_the_default_hides_three_quarters_of_half_of_the_views_in_16_px_patches():
    cfg = ModelConfig()  # Round 3 of docs/quality.md: masked reconstruction is the default
    x = tf.zeros([64, cfg.image_size, cfg.image_size, 3])
    mask = np.asarray(mask_patches(x, seed_of(6), cfg)[1])[..., 0]
    cells = mask.reshape(64, 4, 16, 4, 16).max(axis=(2, 4))  # 4x4 grid of 16-px patches
    hidden = cells.sum(axis=(1, 2))
    assert set(hidden.tolist()) == {0, 12}  # a view keeps all 16 patches or loses 12
    assert 20 <= int((hidden == 12).sum()) <= 44  # about half of the views (mask_mix 0.5)
    np.testing.assert_array_equal(mask.reshape(64, 4, 16, 4, 16).min(axis=(2, 4)), cells)


def test_configs_saved_before_masking_load_with_masking_off():
    saved = ModelConfig(mask_ratio=0.75).to_dict()
    for key in ("mask_ratio", "mask_patch", "mask_loss", "mask_mix"):
        del saved[key]
    assert ModelConfig.from_dict(saved).mask_ratio == 0.0
    assert _LEGACY["mask_ratio"] == 0.0  # still off once a default turns masking on


def test_the_denoising_views_are_the_ones_of_before_masking():
    # fingerprint of augment() on this input, computed with the code of commit 4278efc (before
    # masked reconstruction existed): masking off must train on exactly the same views
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, SIDE, SIDE, 3)), tf.float32)
    for cfg in (PLAIN, MASKED):
        v = np.asarray(augment(x, seed_of(5), cfg))
        np.testing.assert_allclose(
            v.sum(axis=(1, 2, 3)), [542746.6, 532479.1, 353213.38, 522177.94], rtol=1e-5
        )
        np.testing.assert_allclose(
            v[:, 3, 7, :],
            [
                [255.0, 189.91461, 166.3733],
                [114.61143, 255.0, 45.901093],
                [146.82507, 147.09424, 91.41044],
                [115.85076, 113.908356, 113.68176],
            ],
            rtol=1e-5,
        )


def test_the_masked_default_trains_and_indexes_end_to_end(tmp_path, photos_dir):
    """index_folder with the default's masking (75 % of 16-px patches... here 8-px, the tiny
    model's 32-px input, on half of the views) and residual levels: it trains, exports and
    every photo finds itself."""
    from lookalike.engine import Engine
    from lookalike.indexer import index_folder

    defaults = ModelConfig()
    cfg = TINY.replace(
        mask_ratio=defaults.mask_ratio,
        mask_patch=8,
        mask_mix=defaults.mask_mix,
        residual=defaults.residual,
    )
    assert cfg.mask_ratio > 0 and 0 < cfg.mask_mix < 1 and cfg.residual
    report = index_folder(photos_dir, tmp_path / "store", model=cfg)
    assert report.trained and not report.failed
    engine = Engine.open(tmp_path / "store")
    try:
        assert engine.cfg.mask_ratio == cfg.mask_ratio and engine.cfg.mask_mix == cfg.mask_mix
        assert engine.cfg.residual
        for path in sorted(photos_dir.rglob("*.*"))[:5]:
            hit = engine.search_bytes(path.read_bytes(), k=1)[0]
            assert hit.path == path.relative_to(photos_dir).as_posix() and hit.score >= 0.99
    finally:
        engine.close()
