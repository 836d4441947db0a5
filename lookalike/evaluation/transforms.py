"""`lookalike eval neardup --transforms`: edited copies made here, each should find its original."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..engine import Engine
from ..errors import InvalidArgumentError
from ..images import find_images
from ..store import Store, copy_model
from . import metrics
from .collection import NOTES, QUERY_CHUNK, ProgressFn, all_rankers, finish_report, load_collection
from .neardup import TIE_DEPTH

log = logging.getLogger(__name__)


def _watermark(img):
    from PIL import ImageDraw, ImageFont

    out = img.copy()
    draw = ImageDraw.Draw(out)
    size = max(10, img.height // 8)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizing
        font = ImageFont.load_default()
    text = "(c) lookalike 2024"
    box = draw.textbbox((0, 0), text, font=font)
    x = max(0, (img.width - (box[2] - box[0])) // 2)
    y = max(0, img.height - (box[3] - box[1]) - img.height // 10)
    draw.text((x + 1, y + 1), text, fill=(0, 0, 0), font=font)
    draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return out


def _transforms() -> dict[str, Callable]:
    """name -> (PIL RGB image -> (image, JPEG quality))."""
    from PIL import Image, ImageEnhance, ImageOps

    def crop(img, share=0.8):
        w, h = img.size
        cw, ch = round(w * share), round(h * share)
        left, top = (w - cw) // 2, (h - ch) // 2
        return img.crop((left, top, left + cw, top + ch))

    def resize(img):
        return img.resize(
            (max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.LANCZOS
        )

    return {
        "resize_50": lambda img: (resize(img), 95),
        "jpeg_q30": lambda img: (img, 30),
        "crop_80": lambda img: (crop(img), 95),
        "brightness_130": lambda img: (ImageEnhance.Brightness(img).enhance(1.3), 95),
        "rotate_5": lambda img: (img.rotate(5, Image.Resampling.BILINEAR), 95),
        "flip": lambda img: (ImageOps.mirror(img), 95),
        "grayscale": lambda img: (ImageOps.grayscale(img).convert("RGB"), 95),
        "watermark": lambda img: (_watermark(img), 95),
    }


TRANSFORMS = (
    "resize_50",
    "jpeg_q30",
    "crop_80",
    "brightness_130",
    "rotate_5",
    "flip",
    "grayscale",
    "watermark",
)


def make_transformed_set(
    files: list[Path], out: Path, sample: int, seed: int = 0
) -> tuple[int, list[str]]:
    """Copy a seeded sample of files to out/original/ and write each transform to out/<name>/.

    Files: original/<n>.<suffix> (the bytes as they are), <transform>/<n>.jpg. Unreadable files
    are skipped. Returns (photos written, skipped paths).
    """
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(files), min(sample, len(files)), replace=False).tolist())
    tfs = _transforms()
    written, skipped = 0, []
    for n in pick:
        src = files[n]
        try:
            with Image.open(src) as im:
                img = ImageOps.exif_transpose(im).convert("RGB")
        except Exception as exc:  # one unreadable photo must not stop the run
            log.info("skipping %s: %s", src, exc)
            skipped.append(str(src))
            continue
        name = f"{written:05d}"
        (out / "original").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / "original" / f"{name}{src.suffix.lower()}")
        for tname in TRANSFORMS:
            copy, quality = tfs[tname](img)
            (out / tname).mkdir(exist_ok=True)
            copy.save(out / tname / f"{name}.jpg", "JPEG", quality=quality)
        written += 1
    return written, skipped


def _store_with_model(src: Path, dst: Path, photos: Path) -> None:
    """An empty store at dst that uses the trained model of the store at src."""
    copy_model(src, dst)
    with Store.open(dst) as target:
        target.update_state({"photos_root": str(Path(photos).resolve())})


RECALL_NOTE = (
    "recall@1: share of transformed copies (each a query, itself excluded) whose nearest "
    "image is their original; the other copies of the same photo are left out of its "
    "ranking (as in Copydays), copies of other photos stay; when t images tie for "
    "nearest and the original is one of them, the copy scores 1/t"
)


def _photo_files(photos: Path, store: Path | None, sample: int) -> list[Path]:
    """The images of PHOTOS (those inside the store's folder left out); a clear error for a
    missing folder, a sample under 1 or fewer than 2 photos."""
    if not photos.is_dir():
        raise InvalidArgumentError(f"photos folder not found: {photos}")
    if sample < 1:
        raise InvalidArgumentError(f"sample must be at least 1, got {sample}")
    skip_root = Path(store).expanduser().resolve() if store is not None else None
    files = [
        p
        for p in find_images(photos)
        if skip_root is None or not p.resolve().is_relative_to(skip_root)
    ]
    if len(files) < 2:
        raise InvalidArgumentError(f"need at least 2 photos in {photos}, found {len(files)}")
    return files


def evaluate_transforms(
    photos: Path,
    store: Path | None = None,
    sample: int = 200,
    seed: int = 0,
    model: ModelConfig | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """recall@1 per transform: is a transformed copy's nearest other image its original?

    A seeded sample of PHOTOS and eight transformed copies of each are written to a temporary
    folder and indexed: trained on that folder, or embedded with the model of --store.
    """
    from ..indexer import index_folder

    started = time.perf_counter()
    photos = Path(photos).expanduser().resolve()
    files = _photo_files(photos, store, sample)
    report: dict[str, Any] = {"task": "transforms", "photos": str(photos), "seed": seed}
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as tmp:
        work, store_dir = Path(tmp) / "photos", Path(tmp) / "store"
        t0 = time.perf_counter()
        written, skipped = make_transformed_set(files, work, sample, seed)
        timings["transform"] = time.perf_counter() - t0
        if written < 2:
            raise InvalidArgumentError(f"fewer than 2 readable photos among the sample of {photos}")
        if store is not None:
            _store_with_model(Path(store), store_dir, work)
        idx_report = index_folder(work, store_dir, model=model, progress=progress)
        timings["index"] = idx_report.seconds
        with Store.open(store_dir) as st:
            engine = Engine(st)
            coll = load_collection(st)
            methods: dict[str, dict[str, Any]] = {}
            for ranker in all_rankers(engine, coll, timings):
                t0 = time.perf_counter()
                methods[ranker.name] = _transform_recall(ranker, coll.paths)
                timings[ranker.name] = time.perf_counter() - t0
    report.update(
        store=str(Path(store).resolve()) if store is not None else None,
        trained=idx_report.trained,
        n=written * len(TRANSFORMS),
        images=len(coll),
        k=1,
        sample=written,
        skipped=skipped,
        transforms=list(TRANSFORMS),
        methods=methods,
        notes=[*NOTES, RECALL_NOTE],
        seconds=timings,
    )
    return finish_report(report, started)


def _transform_recall(ranker, paths: list[str]) -> dict[str, Any]:
    """recall@1 of the copies of each transform, their sibling copies left out of the ranking.

    As in Copydays, a copy should find its original among unrelated photos (and their copies);
    the other copies of the same photo are near-duplicates too, so they are not competitors.
    """
    folder = np.array([p.partition("/")[0] for p in paths] + [""])
    photo = np.array([p.partition("/")[2].split(".")[0] for p in paths] + [""])
    original = {photo[i]: i for i in range(len(paths)) if folder[i] == "original"}
    per: dict[str, float] = {}
    hits_all, total = 0.0, 0
    for tname in TRANSFORMS:
        qs = [i for i in range(len(paths)) if folder[i] == tname and photo[i] in original]
        if not qs:
            continue
        q_arr = np.array(qs, np.int64)
        want = np.array([original[photo[q]] for q in qs], np.int64)
        hits = 0.0
        for start in range(0, len(q_arr), QUERY_CHUNK):
            chunk = q_arr[start : start + QUERY_CHUNK]
            idx, scores = ranker.neighbours(chunk, TIE_DEPTH + len(TRANSFORMS))
            sibling = (photo[idx] == photo[chunk][:, None]) & (folder[idx] != "original")
            order = np.argsort(sibling, axis=1, kind="stable")  # siblings to the end, dropped
            idx = np.where(sibling, -1, idx)
            idx, scores = np.take_along_axis(idx, order, 1), np.take_along_axis(scores, order, 1)
            credit = metrics.top1_credit(idx, scores, want[start : start + QUERY_CHUNK])
            hits += float(credit.sum())
        per[tname] = hits / len(qs)
        hits_all += hits
        total += len(qs)
    return {"recall@1": hits_all / total if total else 0.0, "by_transform": per}
