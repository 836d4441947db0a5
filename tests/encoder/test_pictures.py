"""Tests for lookalike.encoder.pictures: the loss curve and the captioned reconstructions."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lookalike.encoder.pictures import (
    LOSS_CURVE,
    RECONSTRUCTIONS,
    loss_curve,
    reconstructions,
    write_pictures,
)

HISTORY = {
    "loss": [0.09, 0.05, 0.04, 0.035, 0.034, 0.036],
    "val_loss": [0.1, 0.06, 0.045, 0.044, 0.046, 0.047],
    "best_epoch": 4,
    "best_val_loss": 0.044,
    "epochs_planned": 10,
}
TRAIN_BLUE, VAL_ORANGE = (31, 119, 180), (230, 120, 20)


def _has_colour(img: Image.Image, colour) -> bool:
    return bool((np.asarray(img.convert("RGB")) == colour).all(axis=2).any())


def test_loss_curve_draws_both_series_on_a_readable_canvas():
    img = loss_curve(HISTORY)
    assert img.size[0] >= 600 and img.size[1] >= 400
    assert _has_colour(img, TRAIN_BLUE) and _has_colour(img, VAL_ORANGE)
    only_val = loss_curve({"val_loss": HISTORY["val_loss"]})  # an older training.json
    assert _has_colour(only_val, VAL_ORANGE) and not _has_colour(only_val, TRAIN_BLUE)


def test_reconstructions_are_enlarged_and_captioned():
    s, m = 32, 3
    preview = np.zeros((2 * s, m * s, 3), np.uint8)
    preview[:s] = (250, 10, 10)  # inputs red
    preview[s:] = (10, 10, 250)  # reconstructions blue
    img = np.asarray(reconstructions(preview))
    rows_red = np.where((img == (250, 10, 10)).all(axis=2).any(axis=1))[0]
    rows_blue = np.where((img == (10, 10, 250)).all(axis=2).any(axis=1))[0]
    assert len(rows_red) >= 128 and len(rows_blue) >= 128  # tiles at least 128 px
    assert rows_red.max() < rows_blue.min()  # inputs above reconstructions
    cols_red = np.where((img == (250, 10, 10)).all(axis=2).any(axis=0))[0]
    assert cols_red.min() >= 100  # room on the left for the captions
    caption = img[rows_red.min() :, : cols_red.min()]
    assert (caption < 128).any(), "no caption drawn left of the tiles"


def test_write_pictures(tmp_path):
    preview = np.full((64, 128, 3), 128, np.uint8)
    written = write_pictures(tmp_path, HISTORY, preview)
    assert [p.name for p in written] == [LOSS_CURVE, RECONSTRUCTIONS]
    for path in written:
        with Image.open(path) as img:
            assert img.format == "PNG"
    assert write_pictures(tmp_path / "none", {}, None) == []
