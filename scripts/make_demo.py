"""Generate a demo photo collection: procedural scenes in themes, plus near-duplicate copies.

    python scripts/make_demo.py demo/photos [--per-theme 30] [--seed 0]

Nothing is downloaded: every image is drawn here with Pillow from a seeded random generator.
The near-duplicates (re-encoded, resized, cropped, brightened copies) give `lookalike dedupe`
something to find.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

W, H = 192, 144


def _sky(rng, top, bottom) -> Image.Image:
    t = np.linspace(0, 1, H)[:, None, None]
    top, bottom = np.array(top, float), np.array(bottom, float)
    jitter = rng.normal(0, 12, 3)
    grad = (1 - t) * (top + jitter) + t * (bottom + jitter)
    return Image.fromarray(np.clip(np.broadcast_to(grad, (H, W, 3)), 0, 255).astype(np.uint8))


def _ridge(rng, img, color, base, rough):
    draw = ImageDraw.Draw(img)
    xs = np.linspace(0, W, 12)
    ys = base + np.cumsum(rng.normal(0, rough, len(xs)))
    draw.polygon([(0, H)] + list(zip(xs, ys)) + [(W, H)], fill=tuple(int(c) for c in color))


def beach(rng):
    img = _sky(rng, (90, 150, 230), (200, 225, 250))
    d = ImageDraw.Draw(img)
    horizon = int(rng.uniform(0.4, 0.6) * H)
    d.rectangle([0, horizon, W, H], fill=(20, 90 + int(rng.integers(40)), 160))
    d.polygon([(0, H), (0, H - 30), (W, H - rng.integers(10, 50)), (W, H)], fill=(225, 205, 150))
    r = rng.integers(8, 18)
    x, y = rng.integers(20, W - 20), rng.integers(10, horizon - 10)
    d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 230, 120))
    return img


def mountains(rng):
    img = _sky(rng, (120, 160, 210), (230, 230, 240))
    for i, shade in enumerate((110, 80, 50)):
        _ridge(rng, img, (shade, shade + 10, shade + 30), H * (0.35 + 0.15 * i), 9)
    return img


def forest(rng):
    img = _sky(rng, (170, 200, 170), (90, 130, 80))
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(12, 25)):
        x, h = rng.uniform(0, W), rng.uniform(40, 110)
        g = int(rng.uniform(60, 140))
        d.polygon([(x, H - h - 20), (x - h / 4, H - 20), (x + h / 4, H - 20)], fill=(20, g, 30))
        d.rectangle([x - 2, H - 20, x + 2, H], fill=(80, 50, 20))
    return img


def city(rng):
    img = _sky(rng, (60, 60, 90), (200, 140, 100))
    d = ImageDraw.Draw(img)
    x = 0
    while x < W:
        w, h = rng.integers(15, 35), rng.integers(40, 120)
        c = int(rng.uniform(30, 90))
        d.rectangle([x, H - h, x + w, H], fill=(c, c, c + 10))
        for wy in range(H - h + 5, H - 5, 8):
            for wx in range(x + 3, x + w - 3, 6):
                if rng.random() < 0.5:
                    d.rectangle([wx, wy, wx + 2, wy + 3], fill=(250, 220, 120))
        x += w + rng.integers(1, 6)
    return img


def flowers(rng):
    img = Image.new("RGB", (W, H), (40, int(rng.uniform(100, 150)), 40))
    d = ImageDraw.Draw(img)
    hue = rng.integers(0, 3)
    for _ in range(rng.integers(15, 40)):
        x, y, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(4, 12)
        c = [int(rng.uniform(150, 255)), int(rng.uniform(40, 120)), int(rng.uniform(40, 200))]
        c = c[hue:] + c[:hue]
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(c))
        d.ellipse([x - r / 3, y - r / 3, x + r / 3, y + r / 3], fill=(250, 220, 60))
    return img.filter(ImageFilter.GaussianBlur(0.8))


def snow(rng):
    img = _sky(rng, (200, 215, 235), (245, 245, 250))
    _ridge(rng, img, (235, 240, 250), H * 0.55, 6)
    d = ImageDraw.Draw(img)
    for _ in range(200):
        x, y = rng.uniform(0, W), rng.uniform(0, H)
        d.point((x, y), fill=(255, 255, 255))
    return img


THEMES = {f.__name__: f for f in (beach, mountains, forest, city, flowers, snow)}


def near_duplicates(img: Image.Image, rng) -> dict[str, Image.Image]:
    """The edited copies a real collection accumulates."""
    w, h = img.size
    c = rng.uniform(0.8, 0.9)
    left, top = int(rng.uniform(0, 1 - c) * w), int(rng.uniform(0, 1 - c) * h)
    return {
        "small": img.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
        "crop": img.crop((left, top, left + int(c * w), top + int(c * h))),
        "bright": ImageEnhance.Brightness(img).enhance(1.3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-theme", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    count = 0
    for name, draw in THEMES.items():
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_theme):
            img = draw(rng)
            img.save(folder / f"{name}_{i:03d}.jpg", quality=90)
            count += 1
            if i % 8 == 0:  # every eighth photo has edited copies lying around
                for kind, copy in near_duplicates(img, rng).items():
                    copy.save(folder / f"{name}_{i:03d}_{kind}.jpg", quality=35)
                    count += 1
    print(f"wrote {count} images to {args.out}")


if __name__ == "__main__":
    main()
