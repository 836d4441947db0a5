"""Pictures of a training run for people: the loss curve and captioned reconstructions (PNG).

Drawn with Pillow from what training already records (``TrainResult.history`` and ``.preview``);
no TensorFlow and no plotting library needed here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LOSS_CURVE = "loss_curve.png"
RECONSTRUCTIONS = "reconstructions.png"
TRAIN_COLOUR = (31, 119, 180)
VAL_COLOUR = (230, 120, 20)
GREY = (120, 120, 120)
MIN_TILE = 128  # pixels: reconstruction tiles are enlarged to at least this side


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: the small bitmap font
        return ImageFont.load_default()


def write_pictures(folder: Path, history: dict, preview: np.ndarray | None) -> list[Path]:
    """Write LOSS_CURVE (when history has epochs) and RECONSTRUCTIONS (when preview) to folder."""
    written = []
    if history.get("val_loss"):
        path = Path(folder) / LOSS_CURVE
        loss_curve(history).save(path)
        written.append(path)
    if preview is not None:
        path = Path(folder) / RECONSTRUCTIONS
        reconstructions(preview).save(path)
        written.append(path)
    return written


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About count round values covering [low, high]."""
    span = max(high - low, 1e-12)
    raw = span / count
    step = 10 ** np.floor(np.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= mult * step:
            step *= mult
            break
    first = np.ceil(low / step) * step
    return [float(v) for v in np.arange(first, high + step / 2, step)]


def loss_curve(history: dict, width: int = 720, height: int = 440) -> Image.Image:
    """Train and validation MSE per epoch, the best epoch marked, and why training stopped."""
    train, val = list(history.get("loss", [])), list(history["val_loss"])
    run = len(val)
    planned = int(history.get("epochs_planned", run))
    best = int(history.get("best_epoch", int(np.argmin(val)) + 1))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    left, right, top, bottom = 80, width - 24, 64, height - 56
    values = [v for v in train + val if np.isfinite(v)]
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
    low, high = max(0.0, low - pad), high + pad
    xmax = max(planned, run, 2)

    def x(epoch: float) -> float:
        return left + (epoch - 1) / (xmax - 1) * (right - left)

    def y(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    draw.text((left, 12), "training loss (MSE per epoch)", fill="black", font=font)
    for tick in [t for t in _nice_ticks(low, high) if low <= t <= high]:
        draw.line([(left, y(tick)), (right, y(tick))], fill=(232, 232, 232))
        draw.text((left - 8, y(tick)), f"{tick:.3g}", fill="black", font=small, anchor="rm")
    for tick in _nice_ticks(1, xmax, 8):
        if tick >= 1 and tick == int(tick):
            draw.text((x(tick), bottom + 8), str(int(tick)), fill="black", font=small, anchor="mt")
    draw.text(((left + right) / 2, bottom + 28), "epoch", fill="black", font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    for _y in range(int(top), int(bottom), 8):  # dashed line at the best epoch
        draw.line([(x(best), _y), (x(best), min(_y + 4, bottom))], fill=GREY)
    for series, colour in ((train, TRAIN_COLOUR), (val, VAL_COLOUR)):
        points = [(x(i + 1), y(v)) for i, v in enumerate(series) if np.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    why = f"stopped early at epoch {run} of {planned}" if run < planned else f"{run} epochs"
    best_loss = history.get("best_val_loss", min(val))
    draw.text(
        (left, 36),
        f"best validation loss {best_loss:.4g} at epoch {best} (dashed); {why}",
        fill=GREY,
        font=small,
    )
    nx = right - 12
    legend = [("validation", VAL_COLOUR)] + ([("train", TRAIN_COLOUR)] if train else [])
    for text, colour in legend:
        nx -= int(draw.textlength(text, font=small)) + 20
        draw.rectangle([nx, top + 12, nx + 14, top + 24], fill=colour)
        draw.text((nx + 20, top + 18), text, fill="black", font=small, anchor="lm")
        nx -= 16
    return img


def reconstructions(preview: np.ndarray, min_tile: int = MIN_TILE) -> Image.Image:
    """preview, (2*s, m*s, 3) uint8 (inputs over reconstructions), enlarged and captioned."""
    s = preview.shape[0] // 2
    scale = max(1, -(-min_tile // s))
    tiles = Image.fromarray(preview).resize(
        (preview.shape[1] * scale, preview.shape[0] * scale), Image.Resampling.NEAREST
    )
    font = _font(16)
    title = "validation images: input over the autoencoder's reconstruction"
    label_w, title_h, gap = 150, 40, 6
    tile = s * scale
    width = max(label_w + tiles.width, int(font.getlength(title)) + 16)
    img = Image.new("RGB", (width, title_h + 2 * tile + gap), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 12), title, fill="black", font=font)
    img.paste(tiles.crop((0, 0, tiles.width, tile)), (label_w, title_h))
    img.paste(tiles.crop((0, tile, tiles.width, 2 * tile)), (label_w, title_h + tile + gap))
    for row, text in enumerate(("input", "reconstruction")):
        cy = title_h + row * (tile + gap) + tile / 2
        draw.text((label_w - 10, cy), text, fill="black", font=font, anchor="rm")
    return img
