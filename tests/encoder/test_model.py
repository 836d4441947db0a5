"""Tests for lookalike.encoder.model: architecture, names, shapes, GeM pooling, saving."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import TINY

from lookalike.encoder.model import (
    GeMPooling,
    build_autoencoder,
    build_decoder,
    build_encoder,
)


def _pixels(n: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)


def test_encoder_and_decoder_are_separately_named_models():
    encoder, decoder, autoencoder = build_autoencoder(TINY)
    assert isinstance(encoder, keras.Model) and isinstance(decoder, keras.Model)
    assert encoder.name == "encoder"
    assert decoder.name == "decoder"
    assert autoencoder.name == "autoencoder"
    # the autoencoder is the composition of the two, sharing their weights
    names = [layer.name for layer in autoencoder.layers]
    assert "encoder" in names and "decoder" in names
    assert autoencoder.get_layer("encoder") is encoder
    assert autoencoder.get_layer("decoder") is decoder
    n_shared = len(encoder.weights) + len(decoder.weights)
    assert len(autoencoder.weights) == n_shared


def test_shapes():
    encoder, decoder, autoencoder = build_autoencoder(TINY)
    out = encoder(_pixels(3), training=False)
    low = TINY.image_size // 2 ** len(TINY.filters)
    assert tuple(out["code"].shape) == (3, low, low, TINY.code_channels)
    pooled = sum(TINY.filters[level - 1] for level in TINY.pooled_levels)
    assert tuple(out["features"].shape) == (3, pooled)
    recon = np.asarray(decoder(out["code"], training=False))
    assert recon.shape == (3, TINY.image_size, TINY.image_size, 3)
    assert np.all(np.isfinite(recon))  # the standardised image (linear output) by default
    unit = build_decoder(TINY.replace(input_norm="unit"))(out["code"], training=False)
    assert np.asarray(unit).min() >= 0.0 and np.asarray(unit).max() <= 1.0  # sigmoid output
    assert tuple(autoencoder(_pixels(3), training=False).shape) == recon.shape


def test_features_are_per_level_unit_norm():
    encoder = build_encoder(TINY)
    f = np.asarray(encoder(_pixels(4), training=False)["features"])
    start = 0
    for level in TINY.pooled_levels:
        width = TINY.filters[level - 1]
        np.testing.assert_allclose(
            np.linalg.norm(f[:, start : start + width], axis=1), 1, atol=1e-5
        )
        start += width


def test_single_pooled_level():
    cfg = TINY.replace(pooled_levels=(4,))
    f = build_encoder(cfg)(_pixels(1), training=False)["features"]
    assert tuple(f.shape) == (1, TINY.filters[-1])


def test_image_size_must_divide_by_the_number_of_levels():
    with pytest.raises(ValueError, match="divisible"):
        build_encoder(TINY.replace(image_size=40))


def test_decoder_input_matches_encoder_code():
    cfg = TINY.replace(image_size=64, code_channels=3)
    decoder = build_decoder(cfg)
    assert tuple(decoder.input_shape) == (None, 4, 4, 3)
    assert tuple(decoder.output_shape) == (None, 64, 64, 3)


# --------------------------------------------------------------------------- GeM


def test_gem_p1_is_average_pooling_and_large_p_approaches_max():
    x = np.random.default_rng(0).uniform(0.1, 2.0, (2, 5, 5, 3)).astype(np.float32)
    avg = np.asarray(GeMPooling(p=1.0)(x))
    np.testing.assert_allclose(avg, x.mean(axis=(1, 2)), rtol=1e-5)
    y = x / 2.0  # in (0, 1]: y^p stays finite in float32
    big = np.asarray(GeMPooling(p=100.0)(y))
    np.testing.assert_allclose(big, y.max(axis=(1, 2)), rtol=0.05)
    assert np.all(big <= y.max(axis=(1, 2)) + 1e-6)
    p3 = np.asarray(GeMPooling(p=3.0)(x))
    np.testing.assert_allclose(p3, np.mean(x**3, axis=(1, 2)) ** (1 / 3), rtol=1e-5)


def test_gem_clips_negative_inputs_at_eps():
    x = -np.ones((1, 2, 2, 1), np.float32)
    out = np.asarray(GeMPooling(p=3.0, eps=1e-6)(x))
    np.testing.assert_allclose(out, 1e-6, rtol=1e-3)
    assert np.all(np.isfinite(out))


def test_gem_round_trips_through_keras_save_load(tmp_path):
    inputs = keras.Input((6, 6, 4))
    outputs = GeMPooling(p=2.5, eps=1e-5, name="gem")(inputs)
    model = keras.Model(inputs, outputs)
    path = tmp_path / "gem.keras"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)  # registered: no custom_objects
    layer = loaded.get_layer("gem")
    assert isinstance(layer, GeMPooling)
    assert layer.p == 2.5 and layer.eps == 1e-5
    x = np.random.default_rng(1).uniform(0, 1, (3, 6, 6, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6)
    assert GeMPooling.from_config(layer.get_config()).p == 2.5


def test_encoder_round_trips_through_keras_save_load(tmp_path):
    encoder = build_encoder(TINY)
    path = tmp_path / "encoder.keras"
    encoder.save(path)
    loaded = keras.models.load_model(path, compile=False)
    assert loaded.name == "encoder"
    x = _pixels(2)
    a, b = encoder(x, training=False), loaded(x, training=False)
    for key in ("code", "features"):
        np.testing.assert_allclose(np.asarray(b[key]), np.asarray(a[key]), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- options


def test_old_config_without_new_fields_reproduces_the_old_model():
    from lookalike.config import ModelConfig

    old = {k: v for k, v in TINY.to_dict().items()}
    for key in ("input_norm", "decoder_filters", "pool_grids"):
        old.pop(key)
    cfg = ModelConfig.from_dict(old)
    assert cfg.input_norm == "unit" and cfg.decoder_filters is None and cfg.pool_grids == 1
    encoder, decoder, _ = build_autoencoder(cfg)
    names = {layer.name for layer in encoder.layers}
    assert "rescale" in names and "gem4" in names and "standardize" not in names
    assert decoder.get_layer("reconstruction").activation.__name__ == "sigmoid"


def test_a_config_saved_before_residual_levels_loads_without_them():
    from lookalike.config import ModelConfig

    saved = ModelConfig().to_dict()  # as session 5 saved it: masks, no residual fields
    saved.pop("residual")
    saved.pop("bn_clean_stats")
    cfg = ModelConfig.from_dict(saved)
    assert not cfg.residual and not cfg.bn_clean_stats and ModelConfig().residual
    assert not [layer for layer in build_encoder(cfg).layers if layer.name.endswith("_add")]


def test_partial_config_dicts_get_todays_defaults():
    from lookalike.config import ModelConfig

    cfg = ModelConfig.from_dict({"epochs": 3})
    assert cfg == ModelConfig(epochs=3)
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()


@pytest.mark.parametrize("mode", ["image", "channel"])
def test_standardised_input_ignores_brightness_and_contrast(mode):
    encoder = build_encoder(TINY.replace(input_norm=mode))
    x = _pixels(2) * 0.5 + 40.0
    a = np.asarray(encoder(x, training=False)["features"])
    b = np.asarray(encoder(x * 1.3 + 20.0, training=False)["features"])
    np.testing.assert_allclose(a, b, atol=2e-3)
    decoder = build_decoder(TINY.replace(input_norm=mode))
    assert decoder.get_layer("reconstruction").activation.__name__ == "linear"


def test_normalize_pixels_modes():
    from lookalike.encoder.model import normalize_pixels

    x = _pixels(2)
    np.testing.assert_allclose(np.asarray(normalize_pixels(x, "unit")), x / 255.0, rtol=1e-6)
    z = np.asarray(normalize_pixels(x, "image"))
    np.testing.assert_allclose(z.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(1, 2, 3)), 1, atol=0.01)
    z = np.asarray(normalize_pixels(x, "channel"))
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0, atol=1e-5)
    with pytest.raises(ValueError, match="input_norm"):
        normalize_pixels(x, "nope")


def test_decoder_filters_can_differ_from_the_encoder():
    cfg = TINY.replace(filters=(8, 16, 24, 32), decoder_filters=(8, 8, 16, 16))
    encoder, decoder, autoencoder = build_autoencoder(cfg)
    assert decoder.get_layer("up1").filters == 8 and decoder.get_layer("up4").filters == 16
    assert tuple(autoencoder(_pixels(1), training=False).shape) == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="decoder_filters"):
        build_decoder(cfg.replace(decoder_filters=(8, 8)))


def test_residual_levels_add_the_second_conv_to_its_input():
    plain = build_encoder(TINY)
    residual = build_encoder(TINY.replace(residual=True))
    adds = [layer.name for layer in residual.layers if layer.name.endswith("_add")]
    assert adds == [f"conv{level}_add" for level in TINY.refine_levels]
    assert not [layer for layer in plain.layers if layer.name.endswith("_add")]
    assert residual.count_params() == plain.count_params()  # a skip, no new weights
    assert residual.get_layer("conv1_add").input[0] is residual.get_layer("down1_relu").output


def test_regional_gem_sums_unit_gems_of_overlapping_regions():
    from lookalike.encoder.model import RegionalGeM

    x = np.random.default_rng(2).uniform(0.1, 2.0, (2, 8, 8, 3)).astype(np.float32)

    def unit_gem(m):
        g = np.mean(m**3, axis=(1, 2)) ** (1 / 3)
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    np.testing.assert_allclose(np.asarray(RegionalGeM(p=3.0, grids=1)(x)), unit_gem(x), rtol=1e-5)
    # grid 2 on an 8x8 map: four 5x5 regions at offsets 0 and 3, averaged
    quads = [x[:, i : i + 5, j : j + 5] for i in (0, 3) for j in (0, 3)]
    expected = unit_gem(x) + np.mean([unit_gem(q) for q in quads], axis=0)
    np.testing.assert_allclose(np.asarray(RegionalGeM(p=3.0, grids=2)(x)), expected, rtol=1e-4)


def test_regional_encoder_round_trips_and_pools_every_level(tmp_path):
    cfg = TINY.replace(pool_grids=3, input_norm="image")
    encoder = build_encoder(cfg)
    assert "rgem2" in {layer.name for layer in encoder.layers}
    path = tmp_path / "encoder.keras"
    encoder.save(path)
    loaded = keras.models.load_model(path, compile=False)
    x = _pixels(2)
    a, b = encoder(x, training=False), loaded(x, training=False)
    np.testing.assert_allclose(np.asarray(b["features"]), np.asarray(a["features"]), atol=1e-6)


def test_regional_gem_leaves_out_one_cell_regions():
    from lookalike.encoder.model import RegionalGeM

    x = np.random.default_rng(3).uniform(0.1, 2.0, (2, 2, 2, 3)).astype(np.float32)
    g = np.asarray(GeMPooling(p=3.0)(x))
    # on a 2x2 map the 2x2 and 3x3 grids would be single cells: only the whole map is pooled
    np.testing.assert_allclose(
        np.asarray(RegionalGeM(p=3.0, grids=3)(x)),
        g / np.linalg.norm(g, axis=1, keepdims=True),
        rtol=1e-5,
    )
