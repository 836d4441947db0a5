"""The store's dedupe thresholds as its calibration recorded them: the lowest layer of
lookalike.dedupe, read by grouping, verification and calibration alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..store import Store

# Used when a store has no calibrated threshold for its current model (lookalike.dedupe.calibration sets
# one at every training; `lookalike dedupe` measures one when it is missing). It is the lowest
# threshold with pair precision >= 0.95 on intel_neardup for the default model, measured with
# the labels by scripts/bench_dedupe.py (docs/dedupe.md): a cautious value for any model.
FALLBACK_THRESHOLD = 0.925
# pHash alone joins nothing the embedding calls different: a pHash pair also needs this cosine,
# or the store's calibrated impostor score where that is higher (phash_floor; docs/dedupe.md:
# on the demo set two different beach photos are 8 bits apart at cosine 0.848, under its
# impostor score 0.936)
PHASH_COS_FLOOR = 0.7


def calibrated_threshold(store: Store) -> float | None:
    """The threshold measured for the store's current model (lookalike.dedupe.calibration), or None."""
    cal = store.info.get("dedupe_calibration") or {}
    if "dedupe_threshold" in store.info and cal.get("model_serial") == store.model_serial:
        return float(store.info["dedupe_threshold"])
    return None


def capped_note(calibration: dict) -> str:
    """Why the calibrated threshold is 1.0 and what that leaves (cosine alone joins nothing)."""
    q = calibration.get("impostor_quantile")
    seen = (
        f": 10 % of photos without a verified copy have a nearest neighbour at cosine {q:.3f} "
        "or more"
        if q
        else ""
    )
    return (
        f"note: the calibrated threshold is 1.0, because this collection's photos look alike to "
        f"its model{seen}. Only exact copies, close perceptual hashes and matching local "
        "features group photos; a lower threshold (--threshold, or ?threshold= over HTTP) finds "
        "more, at the risk of grouping different photos: review them before moving any."
    )


def default_threshold(store: Store) -> float:
    """The store's calibrated threshold for its current model, else FALLBACK_THRESHOLD."""
    t = calibrated_threshold(store)
    return FALLBACK_THRESHOLD if t is None else t


def phash_floor(store: Store) -> float:
    """The cosine a pHash pair needs: PHASH_COS_FLOOR, or the nearest-neighbour impostor score
    the calibration measured for the store's model where that is higher."""
    cal = store.info.get("dedupe_calibration") or {}
    q = cal.get("impostor_quantile") if cal.get("model_serial") == store.model_serial else None
    return max(PHASH_COS_FLOOR, float(q)) if q is not None else PHASH_COS_FLOOR
