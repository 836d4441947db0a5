"""Calibrate a store's dedupe threshold from edited copies of its own photos.

The cosine scale of near-duplicates depends on the trained model, so every (re)training
measures it again (docs/dedupe.md gives the method, its validation and its limits):

1. Copies: a seeded sample of the store's photos is edited the way people edit photos
   (random crop, resize, brightness and contrast, mirror, JPEG re-compression; see
   ``edited_copies``) and embedded; ``recall(t)`` is the share of copies whose cosine to their
   original is >= t.
2. Pairs: ``pairs(t)``, the number of pairs in the store at or above t (exact copies left out),
   is counted from the k nearest neighbours of a seeded sample of the store's photos.
3. Duplicates in the store: at the anchor ``t0``, the median copy score, nearly every pair is a
   true duplicate and about ``recall(t0)`` of the duplicates are above it, so the store holds
   about ``dups = pairs(t0) / recall(t0)`` duplicate pairs (at least PRIOR_SHARE per photo, so
   a store without duplicates still gets a cautious threshold).
4. Expected precision at t is ``dups * recall(t) / pairs(t)``; scanning down from t0, the
   threshold is the lowest t where it is >= ESTIMATE_TARGET; the scan ends once it has stayed
   below for PATIENCE (so a dip of a pair or two in a small store does not end it).
5. Resampling: keeping the lowest t where a noisy estimate meets the target favours the low
   side of the noise, so steps 3-4 are repeated on RESAMPLES bootstrap resamples of the copies
   and of the sampled photos' neighbour rows, and the threshold is the RESAMPLE_QUANTILE
   quantile of their thresholds (never below the one of the full samples).
6. Impostors: where the store has few pairs the estimate has no evidence and can fall far
   below the scores at which an edited copy already matches an unrelated photo; when fewer
   than MIN_EVIDENCE sampled pair scores lie above it, the threshold is kept above the score
   where more than IMPOSTOR_RATE of the copies match a photo (among their nearest) that their
   original does not match at that score.

Since v4 the default threshold comes first from the store's own nearest-neighbour impostors
(``nn_impostor_threshold``), and steps 1-6 only where a store has too few of them:

7. Impostors: a seeded sample of photos, each with its nearest other photo (exact copies left
   out). Local features (``verification``) check each sampled photo and its neighbour against
   their NEIGHBOURS_CHECKED nearest others: a photo with a verified near-duplicate, or whose
   neighbour has one, is left out. The rest are photos whose nearest other photo is, nearly
   always, a different photo: their nearest-neighbour scores are the impostor scores of this
   collection, with this model. The threshold is their IMPOSTOR_QUANTILE quantile plus MARGIN
   (the quantile is not the maximum because a few strong edits that local features cannot
   verify remain in the sample, at its top; the margin covers the tail above the quantile).

Imports TensorFlow (through the embedder); lookalike.index never does.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ..errors import ImageError
from ..images import decode, read_file

if TYPE_CHECKING:
    from ..encoder.embed import Embedder
    from ..store import Store

log = logging.getLogger(__name__)

METHOD = "nn-impostors-v4"  # v2: bootstrap (5); v3: impostor floor (6); v4: nn impostors (7)
TARGET_PRECISION = 0.95  # the pair precision the default threshold is meant to reach
# What the estimate above is asked for. It is optimistic: real edits are often harder than the
# copies, connected components chain pairs, and photos that merely look alike to the model
# cannot be told from copies without labels. On intel_neardup (scripts/bench_dedupe.py), asking
# it for 0.95 gave a measured pair precision of 0.90 and asking for 0.99 gave 0.96 over six
# seeds with the model of commit 019d1a8; docs/dedupe.md has the figures for later models.
ESTIMATE_TARGET = 0.99
COPY_SAMPLE = 512  # photos edited into copies
COPIES_PER_PHOTO = 4
PAIR_SAMPLE = 2000  # photos whose neighbours are counted
NEIGHBOURS = 100  # k of the neighbour count; a lower t that saturates it is not trusted
PRIOR_SHARE = 0.02  # duplicate pairs per photo assumed at least
PATIENCE = 0.02  # the scan ends this far (cosine) below the last threshold meeting the target
GRID = np.round(np.arange(1.0, 0.2999, -0.0025), 4)  # thresholds tried, high to low
# Step 5. On intel_neardup with the default model of 26 Nov, 13:15, the thresholds of six
# calibration seeds spread over 0.8575-0.885 around a precision cliff at 0.87 (labels): two
# seeds in six fell below 0.95; with the 0.9 quantile of 40 resamples none did (docs/dedupe.md).
RESAMPLES = 40
RESAMPLE_QUANTILE = 0.9
# Step 6. The estimate of steps 3-4 has no evidence where the store has (almost) no pairs: on a
# small collection it can fall far below the scores at which an edited copy already matches an
# unrelated photo. The threshold is kept above the score where more than IMPOSTOR_RATE of the
# copies match one of their IMPOSTORS nearest other photos that their original does not.
IMPOSTORS = 10
IMPOSTOR_RATE = 0.01
# The floor applies only where the estimate rests on fewer sampled pair scores than this: in a
# collection full of near-duplicates, a copy also matches its original's other copies, which
# the floor would count as impostors (on intel_neardup it raised 0.9725 to 0.985).
MIN_EVIDENCE = 20
# Step 7 (docs/dedupe.md has the measurements on intel_neardup, intel_scenes, the demo set and
# Fashion-MNIST)
IMPOSTOR_SAMPLE = 400  # photos whose nearest neighbour is looked at
NEIGHBOURS_CHECKED = 3  # nearest others verified for each photo (cosine >= VERIFY_FLOOR)
VERIFY_FLOOR = 0.5
# a few near-duplicates that local features cannot verify (strong edits) stay in the impostor
# sample (about 3 % on intel_neardup, all at the top): a lower quantile with a wider margin is
# robust to them. The margin was set on intel_neardup (0.12 let one distractor in at cosine
# 0.795; 0.15 none) and checked on intel_scenes, the demo set and Fashion-MNIST (docs/dedupe.md)
IMPOSTOR_QUANTILE = 0.9
MARGIN = 0.15
MIN_IMPOSTORS = 30  # fewer impostor scores than this: steps 1-6 decide
LOWEST = 0.6  # never below this cosine, whatever the impostors say


@dataclass(frozen=True)
class Calibration:
    """A store's measured dedupe threshold and the evidence behind it."""

    threshold: float
    model_serial: int
    method: str
    estimate_target: float  # asked of the precision estimate (ESTIMATE_TARGET)
    expected_precision: float | None  # at the threshold, by the estimate above
    copy_recall: float | None  # share of the edited copies at or above the threshold
    copies: int  # edited copies embedded
    pair_sample: int  # photos whose neighbours were counted
    anchor: float | None  # t0
    duplicate_pairs: float | None  # estimated duplicate pairs in the store
    photos: int
    seconds: float
    point_threshold: float | None = None  # steps 1-4 on the full samples, before resampling
    impostor_floor: float | None = None  # step 6: the threshold is never below it
    impostors: int | None = None  # step 7: impostor scores found
    impostor_quantile: float | None = None  # step 7: their IMPOSTOR_QUANTILE quantile

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (round(float(v), 6) if isinstance(v, float) else v) for k, v in asdict(self).items()
        }


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def edited_copies(
    data: bytes, work_side: int, rng: np.random.Generator, n: int = COPIES_PER_PHOTO
) -> list[bytes]:
    """n randomly edited copies of one image, as JPEG files.

    Each copy: with p=0.5 a crop of 60-95 % of the side at a random place; a resize to 40-100 %;
    with p=0.5 brightness and contrast x0.8-1.25; with p=0.2 a mirror; JPEG quality 20-90.
    The image is first reduced to about work_side pixels on its long side (JPEG draft mode),
    so editing a 24-megapixel photo costs what editing a thumbnail does.
    """
    img = Image.open(io.BytesIO(data))
    if img.format in ("JPEG", "MPO"):
        img.draft("RGB", (work_side, work_side))
    img = img.convert("RGB")
    if max(img.size) > work_side:
        img.thumbnail((work_side, work_side), Image.Resampling.BILINEAR)
    out = []
    for _ in range(n):
        copy = img
        if rng.random() < 0.5:
            side = rng.uniform(0.6, 0.95)
            cw, ch = max(1, int(copy.width * side)), max(1, int(copy.height * side))
            left = int(rng.uniform(0, copy.width - cw + 1))
            top = int(rng.uniform(0, copy.height - ch + 1))
            copy = copy.crop((left, top, left + cw, top + ch))
        f = rng.uniform(0.4, 1.0)
        size = (max(1, int(copy.width * f)), max(1, int(copy.height * f)))
        copy = copy.resize(size, Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            copy = ImageEnhance.Brightness(copy).enhance(rng.uniform(0.8, 1.25))
            copy = ImageEnhance.Contrast(copy).enhance(rng.uniform(0.8, 1.25))
        if rng.random() < 0.2:
            copy = ImageOps.mirror(copy)
        out.append(_jpeg(copy, int(rng.integers(20, 91))))
    return out


def copy_scores(
    store: Store, embedder: Embedder, ids: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edited copies against the store: (copy-to-original cosine (c,), and for each copy's
    IMPOSTORS nearest other photos, their cosine to the copy (c, m) and to the copy's original
    (c, m); -2 where there is none)."""
    size = store.model_config().image_size
    pixels, originals = [], []
    for image_id in ids.tolist():
        rec = store.db.get(image_id)
        if rec is None:
            continue
        try:
            copies = edited_copies(read_file(store.file_path(rec.path)), 4 * size, rng)
            pixels.extend(decode(c, size)[0] for c in copies)
        except (ImageError, OSError, ValueError) as exc:
            log.info("calibration skips %s: %s", rec.path, exc)
            continue
        originals.extend([image_id] * len(copies))
    empty = np.zeros((0, IMPOSTORS), np.float32)
    if not pixels:
        return np.zeros(0, np.float32), empty, empty
    index = store.index
    vectors = embedder(np.stack(pixels))
    own = np.array(originals, dtype=np.int64)
    refs = index.reconstruct(own)
    scores, found = index.search(vectors, min(IMPOSTORS + 1, len(index)))
    to_copy = np.full((len(own), IMPOSTORS), -2.0, np.float32)
    to_original = np.full((len(own), IMPOSTORS), -2.0, np.float32)
    for row in range(len(own)):
        others = [(s, i) for s, i in zip(scores[row], found[row]) if i >= 0 and i != own[row]]
        others = others[:IMPOSTORS]
        if others:
            vecs = index.reconstruct(np.array([i for _, i in others], dtype=np.int64))
            to_copy[row, : len(others)] = [s for s, _ in others]
            to_original[row, : len(others)] = vecs @ refs[row]
    return np.einsum("nd,nd->n", vectors, refs), to_copy, to_original


def impostor_floor(to_copy: np.ndarray, to_original: np.ndarray, limit: float = IMPOSTOR_RATE):
    """The lowest threshold above which at most ``limit`` of the edited copies match a photo
    that their original does not match (a false link only an edit creates): scanning down the
    grid, it stops where that share first exceeds the limit. None without copies."""
    if len(to_copy) == 0:
        return None
    floor = float(GRID[0])
    for t in GRID:
        wrong = ((to_copy >= t) & (to_original < t)).any(axis=1).mean()
        if wrong > limit:
            break
        floor = float(t)
    return floor


def neighbour_scores(store: Store, ids: np.ndarray, k: int) -> np.ndarray:
    """(m, k) cosine of each sampled photo's k nearest others, exact copies left out (-2)."""
    index = store.index
    vecs = index.reconstruct(ids)
    scores, found = index.search(vecs, min(k + 1, len(index)))
    shas = store.db.get_many({int(i) for i in found.ravel() if i >= 0} | set(ids.tolist()))
    out = np.full((len(ids), k), -2.0, np.float32)
    for row, (own, srow, irow) in enumerate(zip(ids.tolist(), scores, found)):
        own_sha = shas[own].sha256 if own in shas else None
        kept = [
            s
            for s, i in zip(srow.tolist(), irow.tolist())
            if i >= 0 and i != own and i in shas and shas[i].sha256 != own_sha
        ][:k]
        out[row, : len(kept)] = kept
    return out


def choose_threshold(
    copies: np.ndarray,
    neighbours: np.ndarray,
    photos: int,
    target: float = ESTIMATE_TARGET,
) -> tuple[float, dict[str, float]]:
    """The lowest threshold with expected pair precision >= target (module docstring, 1-4).

    copies: (c,) copy-to-original scores; neighbours: (m, k) scores of m sampled photos to
    their k nearest other photos (-2 for none); photos: the store's size.
    """
    k = neighbours.shape[1]
    recall, precision, anchor, dups = _estimate(copies, neighbours, photos)
    best, best_prec = anchor, 1.0
    for t in GRID[GRID <= anchor]:
        if k and (neighbours[:, -1] >= t).any():
            break  # some photo has k neighbours above t: pairs(t) would be undercounted
        if t < best - PATIENCE:
            break  # below the target all the way down from best: not a dip of a few pairs
        prec = precision(t)
        if prec >= target:
            best, best_prec = float(t), prec
    return best, {
        "anchor": anchor,
        "duplicate_pairs": dups,
        "expected_precision": best_prec,
        "copy_recall": recall(best),
    }


def _estimate(copies: np.ndarray, neighbours: np.ndarray, photos: int):
    """recall(t), precision(t), the anchor t0 and the duplicate pairs of steps 1-4."""
    m = neighbours.shape[0]
    anchor = float(np.median(copies))
    scale = photos / (2.0 * max(m, 1))  # sample counts -> store pairs (each pair seen twice)
    sorted_copies = np.sort(copies)

    def recall(t: float) -> float:
        return 1.0 - np.searchsorted(sorted_copies, t, side="left") / len(sorted_copies)

    def pairs(t: float) -> float:
        return float((neighbours >= t).sum()) * scale

    dups = max(pairs(anchor) / max(recall(anchor), 1e-9), PRIOR_SHARE * photos)

    def precision(t: float) -> float:
        found = pairs(t)
        return 1.0 if found == 0 else min(1.0, dups * recall(t) / found)

    return recall, precision, anchor, dups


def resampled_threshold(
    copies: np.ndarray,
    neighbours: np.ndarray,
    photos: int,
    rng: np.random.Generator,
    target: float = ESTIMATE_TARGET,
    resamples: int = RESAMPLES,
    quantile: float = RESAMPLE_QUANTILE,
) -> tuple[float, dict[str, float]]:
    """choose_threshold made robust to the noise of its samples (module docstring, step 5):
    the quantile of its thresholds on bootstrap resamples of copies and neighbour rows, and
    never below its threshold on the full samples. The facts are those of the full samples
    at the returned threshold, plus "point_threshold"."""
    point, facts = choose_threshold(copies, neighbours, photos, target)
    found = [
        choose_threshold(
            copies[rng.integers(0, len(copies), len(copies))],
            neighbours[rng.integers(0, len(neighbours), len(neighbours))],
            photos,
            target,
        )[0]
        for _ in range(resamples)
    ]
    t = max(point, float(np.quantile(found, quantile, method="higher"))) if found else point
    recall, precision, _, _ = _estimate(copies, neighbours, photos)
    facts.update(expected_precision=precision(t), copy_recall=recall(t), point_threshold=point)
    return t, facts


def _nearest(store: Store, ids: np.ndarray, k: int) -> dict[int, list[tuple[int, float]]]:
    """Each id's k nearest other photos (id, cosine), exact copies left out."""
    index = store.index
    scores, found = index.search(index.reconstruct(ids), min(k + 1, len(index)))
    records = store.db.get_many({int(i) for i in found.ravel() if i >= 0} | set(ids.tolist()))
    out = {}
    for own, srow, frow in zip(ids.tolist(), scores.tolist(), found.tolist()):
        sha = records[own].sha256 if own in records else None
        out[own] = [
            (j, s)
            for s, j in zip(srow, frow)
            if j >= 0 and j != own and j in records and records[j].sha256 != sha
        ][:k]
    return out


def nn_impostor_threshold(
    store: Store, ids: np.ndarray, verify_pairs
) -> tuple[float | None, dict[str, Any]]:
    """Step 7: (threshold, facts), threshold None when fewer than MIN_IMPOSTORS impostor
    scores were found. verify_pairs(pairs) -> {pair: verified?}."""
    near = _nearest(store, ids, NEIGHBOURS_CHECKED)
    firsts = np.array(sorted({n[0][0] for n in near.values() if n} - set(near)), np.int64)
    if len(firsts):
        near |= _nearest(store, firsts, NEIGHBOURS_CHECKED)
    pairs = {(min(a, j), max(a, j)) for a, ns in near.items() for j, s in ns if s >= VERIFY_FLOOR}
    verified = verify_pairs(sorted(pairs))
    has_dup = {i for p, ok in verified.items() if ok for i in p}
    scores = [
        near[i][0][1]
        for i in ids.tolist()
        if near.get(i) and i not in has_dup and near[i][0][0] not in has_dup
    ]
    facts: dict[str, Any] = {"impostors": len(scores)}
    if len(scores) < MIN_IMPOSTORS:
        return None, facts
    q = float(np.quantile(scores, IMPOSTOR_QUANTILE))
    facts["impostor_quantile"] = q
    return float(np.clip(q + MARGIN, LOWEST, GRID[0])), facts


def _verify_with_features(store: Store):
    from .verification import MIN_MATCHES, Verifier

    verifier = Verifier(store)
    return lambda pairs: {p: n >= MIN_MATCHES for p, n in verifier.count(pairs).items()}


def _copies_threshold(
    store, ids, copies, to_copy, to_original, pick_pairs, rng, target=ESTIMATE_TARGET
):
    """Steps 1-6: (threshold, facts) from edited copies and the pairs of the store."""
    if len(copies) == 0 or len(ids) < 2:
        from .thresholds import FALLBACK_THRESHOLD

        log.warning("calibration found no usable photos; using %.3f", FALLBACK_THRESHOLD)
        return FALLBACK_THRESHOLD, {}
    neighbours = neighbour_scores(store, pick_pairs, min(NEIGHBOURS, len(ids) - 1))
    threshold, facts = resampled_threshold(copies, neighbours, len(ids), rng, target)
    floor = impostor_floor(to_copy, to_original)
    facts["impostor_floor"] = floor
    evidence = int((neighbours >= threshold).sum())  # sampled pair scores it rests on
    if floor is not None and floor > threshold and evidence < MIN_EVIDENCE:
        threshold = floor
        recall, precision, _, _ = _estimate(copies, neighbours, len(ids))
        facts.update(expected_precision=precision(threshold), copy_recall=recall(threshold))
    return threshold, facts


def calibrate(
    store: Store,
    embedder: Embedder | None = None,
    *,
    seed: int = 0,
    target: float = ESTIMATE_TARGET,
    copy_sample: int = COPY_SAMPLE,
    pair_sample: int = PAIR_SAMPLE,
    verify=None,
) -> Calibration:
    """Measure the store's threshold; needs a trained, indexed store (nothing is saved)."""
    started = time.perf_counter()
    ids = np.fromiter((r[0] for r in store.db.conn.execute("SELECT id FROM images")), np.int64)
    rng = np.random.default_rng(seed)
    facts: dict[str, Any] = {}
    threshold = None
    if len(ids) >= 2:
        pick = np.sort(rng.choice(ids, min(IMPOSTOR_SAMPLE, len(ids)), replace=False))
        threshold, facts = nn_impostor_threshold(
            store, pick, verify or _verify_with_features(store)
        )
    copies, pick_pairs = np.zeros(0), np.zeros(0)
    if threshold is None:  # too few impostors: steps 1-6
        embedder = embedder or store.load_embedder()
        pick_copies = np.sort(rng.choice(ids, min(copy_sample, len(ids)), replace=False))
        pick_pairs = np.sort(rng.choice(ids, min(pair_sample, len(ids)), replace=False))
        copies, to_copy, to_original = copy_scores(store, embedder, pick_copies, rng)
        threshold = _copies_threshold(store, ids, copies, to_copy, to_original, pick_pairs, rng)
        facts.update(threshold[1])
        threshold = threshold[0]
    return Calibration(
        threshold=round(float(threshold), 4),
        model_serial=store.model_serial,
        method=METHOD,
        estimate_target=target,
        expected_precision=facts.get("expected_precision"),
        copy_recall=facts.get("copy_recall"),
        copies=len(copies),
        pair_sample=len(pick_pairs),
        anchor=facts.get("anchor"),
        duplicate_pairs=facts.get("duplicate_pairs"),
        photos=len(ids),
        seconds=time.perf_counter() - started,
        point_threshold=facts.get("point_threshold"),
        impostor_floor=facts.get("impostor_floor"),
        impostors=facts.get("impostors"),
        impostor_quantile=facts.get("impostor_quantile"),
    )


def calibrate_store(store: Store, embedder: Embedder | None = None, **kwargs: Any) -> Calibration:
    """Calibrate and record the result in the store's info (dedupe_threshold, _calibration)."""
    cal = calibrate(store, embedder, **kwargs)
    with store.writing():
        store.update_state({"dedupe_threshold": cal.threshold, "dedupe_calibration": cal.to_dict()})
    log.info("dedupe threshold %.4f (%s)", cal.threshold, cal.to_dict())
    return cal
