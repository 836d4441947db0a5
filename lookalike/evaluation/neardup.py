"""`lookalike eval neardup`: near-duplicate search and dedupe against ground-truth groups."""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..engine import MAX_K, Engine
from ..errors import InvalidArgumentError
from ..store import Store
from . import metrics
from .baselines import (
    PHASH_DEDUPE_DISTANCE,
    RAW_PIXELS_DEDUPE_THRESHOLD,
)
from .collection import (
    NOTES,
    Collection,
    ProgressFn,
    all_rankers,
    finish_report,
    load_collection,
    query_chunks,
    store_for,
)

PAIR_CANDIDATES = 10  # nearest others per image whose pairs the recall@p0.95 sweep scores
MIN_PRECISION = 0.95
VERIFIED_SCORE = 2.0  # dedupe_recall@p0.95: a verified pair ranks above every cosine (<= 1)
NEARDUP_K = 3  # recall@3
TIE_DEPTH = 32  # neighbours read to see ties at the top (pHash distances tie often)


def read_groups(path: Path) -> dict[str, str]:
    """groups.csv (file,group_id[,...]) -> {file relative to PHOTOS: group id}."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read groups file {path}: {exc}") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"file", "group_id"} <= set(rows[0]):
        raise InvalidArgumentError(
            f"{path} must be a CSV with a header naming the columns file and group_id"
        )
    return {r["file"].strip().replace("\\", "/"): r["group_id"].strip() for r in rows}


def read_originals(path: Path) -> set[str]:
    """The files groups.csv marks as their group's original (a ``variant`` column whose value is
    ``original``); empty without that column."""
    with open(path, newline="") as f:
        return {
            r["file"].strip().replace("\\", "/")
            for r in csv.DictReader(f)
            if (r.get("variant") or "").strip().lower() == "original"
        }


def kept_originals(groups: list[list[str]], originals: set[str]) -> dict[str, int]:
    """Of the dedupe groups holding a ground-truth original (kept photo first in each group),
    how many keep it: a copy kept over its original is what moves the original away."""
    holding = [g for g in groups if originals.intersection(g)]
    return {"kept": sum(g[0] in originals for g in holding), "of": len(holding)}


def _lookalike_dedupe(
    store: Store,
) -> tuple[list[list[str]] | None, float | None, str | None, dict[tuple[int, int], int]]:
    """lookalike dedupe's groups at its default threshold, or a note why there are none, and
    the inliers of the pairs its local features verified (by id)."""
    try:
        from ..dedupe import grouping as dedupe
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith("dedupe"):
            return None, None, "lookalike.dedupe is missing: no pair metrics for lookalike", {}
        raise
    from ..dedupe.verification import verified_pairs

    verified: dict[tuple[int, int], int] = {}

    def verify(st: Store, threshold: float) -> dict[tuple[int, int], int]:
        found = verified_pairs(st, threshold)
        verified.update(found)
        return found

    threshold = float(dedupe.default_threshold(store))
    groups = dedupe.find_groups(store, threshold=threshold, verify=verify, band=dedupe.BAND)
    return [[m.path for m in g.members] for g in groups], threshold, None, verified


def _verified_evidence(verified: dict[tuple[int, int], int], coll: Collection) -> np.ndarray:
    """(v, 3) float64 rows (position a, position b, score) of dedupe's verified pairs, scored
    VERIFIED_SCORE + inliers / 1000: above every cosine, ordered by their inliers."""
    pos = {int(i): n for n, i in enumerate(coll.ids)}
    rows = [
        (pos[a], pos[b], VERIFIED_SCORE + n / 1000)
        for (a, b), n in sorted(verified.items())
        if a in pos and b in pos
    ]
    return np.array(rows, np.float64).reshape(-1, 3)


def _dedupe_links(store: Store, coll: Collection) -> tuple[np.ndarray, str]:
    """(f, 2) collection positions that lookalike dedupe joins whatever their cosine: exact
    copies (same sha256) and, where the store keeps pHashes, pairs within dedupe's PHASH_MAX."""
    pos = {int(i): n for n, i in enumerate(coll.ids)}
    by_sha: dict[str, list[int]] = {}
    for rec in store.db.records():
        if rec.id in pos:
            by_sha.setdefault(rec.sha256, []).append(pos[rec.id])
    links = [(c[0], x) for c in by_sha.values() for x in c[1:]]
    what = "exact copies"
    try:
        from ..dedupe import grouping as dedupe
    except ModuleNotFoundError:
        dedupe = None
    phash_max = getattr(dedupe, "PHASH_MAX", None)
    if phash_max is not None and hasattr(dedupe, "hash_links") and hasattr(store.db, "phashes"):
        ids, hashes = store.db.phashes()
        if len(ids) > 1:
            a, b = dedupe.hash_links(hashes, phash_max)
            links += [
                (pos[int(x)], pos[int(y)])
                for x, y in zip(ids[a], ids[b])
                if int(x) in pos and int(y) in pos
            ]
        what = f"exact copies and pHash within {phash_max} bits"
    return np.array(links, np.int64).reshape(-1, 2), what


def _keep_best(candidates: dict[tuple[int, int], float], rows) -> None:
    """Add (query, neighbours, scores) rows to candidates, each pair once (smaller id first)
    at its best score; a neighbour below 0 is none."""
    for q, row, srow in rows:
        for j, s in zip(np.asarray(row).tolist(), np.asarray(srow).tolist()):
            if j >= 0:
                key = (min(int(q), int(j)), max(int(q), int(j)))
                candidates[key] = max(s, candidates.get(key, -np.inf))


def neardup_scores(
    ranker,
    groups: list[str | None],
    members: np.ndarray,
    depth: int,
    links: np.ndarray | None = None,
    evidence: np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """recall@3, mrr, recall@p0.95 and dedupe_recall@p0.95 of one ranker; groups[i] is None
    for distractors.

    links: (f, 2) pairs the ranker's dedupe joins whatever their score (they enter both
    sweeps above every threshold). evidence: (v, 3) rows (a, b, score) of more evidence the
    ranker's dedupe has for pairs (lookalike: verified local features), scored above the
    ranker's own scores; dedupe_recall@p0.95 ranks pairs by it where given, else by the
    ranker's score, so without evidence it equals recall@p0.95.
    """
    gid = {g: n for n, g in enumerate(sorted({g for g in groups if g is not None}))}
    group_id = np.array([gid[g] if g is not None else -1 for g in groups] + [-2])
    sizes = Counter(g for g in groups if g is not None)
    is_member = np.zeros(len(groups), bool)
    is_member[members] = True
    recall = rr = 0.0
    candidates: dict[tuple[int, int], float] = {}
    everyone = np.arange(len(groups), dtype=np.int64)
    for chunk in query_chunks(everyone):
        need = depth if is_member[chunk].any() else PAIR_CANDIDATES
        idx, scores = ranker.neighbours(chunk, max(need, PAIR_CANDIDATES))
        _keep_best(candidates, zip(chunk, idx[:, :PAIR_CANDIDATES], scores[:, :PAIR_CANDIDATES]))
        sel = is_member[chunk]
        if not sel.any():
            continue
        qs, rows = chunk[sel], idx[sel]
        rel = (group_id[rows] == group_id[qs][:, None]) & (group_id[qs][:, None] >= 0)
        n_rel = np.array([sizes[groups[q]] - 1 for q in qs])
        recall += metrics.recall_at_k(rel, n_rel, NEARDUP_K).sum()
        rr += metrics.reciprocal_rank(rel).sum()
    n_true = sum(s * (s - 1) // 2 for s in sizes.values() if s > 1)
    r_at_p, threshold = _sweep(candidates, links, group_id[:-1], n_true)
    n_candidates = len(candidates)
    if evidence is not None:
        _keep_best(candidates, ((a, [b], [score]) for a, b, score in evidence))
    r_dedupe, t_dedupe = _sweep(candidates, links, group_id[:-1], n_true)
    n = len(members)
    out = {
        "recall@3": recall / n,
        "mrr": rr / n,
        "recall@p0.95": r_at_p,
        "dedupe_recall@p0.95": r_dedupe,
    }
    more: dict[str, Any] = {
        "threshold@p0.95": _threshold_fact(threshold),
        "dedupe_threshold@p0.95": _threshold_fact(t_dedupe),
        "candidate_pairs": n_candidates,
    }
    if evidence is not None:
        more["verified_pairs"] = len(evidence)
    return out, more


def _sweep(candidates: dict, links: np.ndarray | None, group_of: np.ndarray, n_true: int):
    """metrics.recall_at_precision of the scored candidate pairs and the links (scored inf)."""
    pairs = np.array(list(candidates), np.int64).reshape(-1, 2)
    scores = np.array(list(candidates.values()), np.float64)
    if links is not None and len(links):
        pairs = np.concatenate([pairs, links])
        scores = np.concatenate([scores, np.full(len(links), np.inf)])
    return metrics.recall_at_precision(pairs, scores, group_of, n_true, MIN_PRECISION)


def _threshold_fact(threshold: float | None) -> float | str | None:
    """A sweep's threshold for the report: a score, 'links only', or 'verified, N inliers'."""
    if threshold is not None and np.isinf(threshold):
        return "links only"
    if threshold is not None and threshold >= VERIFIED_SCORE:
        return f"verified, {round((threshold - VERIFIED_SCORE) * 1000)} inliers"
    return threshold


def evaluate_neardup(
    photos: Path,
    groups_csv: Path,
    store: Path | None = None,
    model: ModelConfig | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score near-duplicate search and dedupe against groups.csv (single-member groups are
    distractors: never queries, only confusers)."""
    started = time.perf_counter()
    truth = read_groups(groups_csv)
    originals = read_originals(groups_csv)
    report: dict[str, Any] = {"task": "neardup", "photos": str(Path(photos).resolve())}
    timings: dict[str, float] = {}
    notes = list(NOTES)
    with store_for(photos, store, model, progress, report) as st:
        engine = Engine(st)
        coll = load_collection(st)
        truth_here = _GroupsHere(coll, truth, groups_csv)
        depth = min(len(coll) - 1, MAX_K)
        methods: dict[str, dict[str, Any]] = {}
        extra: dict[str, dict[str, Any]] = {}
        links, linked = _dedupe_links(st, coll)
        for ranker in all_rankers(engine, coll, timings):
            t0 = time.perf_counter()
            methods[ranker.name], extra[ranker.name] = _score_ranker(
                ranker, st, coll, truth_here, depth, (links, linked), notes
            )
            kept_groups = extra[ranker.name].pop("groups", None)  # lookalike's, kept photo first
            if kept_groups is not None and originals:
                report["kept_original"] = kept_originals(kept_groups, originals)
            timings[ranker.name] = time.perf_counter() - t0
    members, true_groups = truth_here.members, truth_here.true_groups
    missing = sorted(f for f in truth if f not in set(coll.paths))
    report.update(
        n=int(len(members)),
        images=len(coll),
        groups=len(true_groups),
        distractors=len(coll) - int(len(members)),
        true_pairs=sum(len(g) * (len(g) - 1) // 2 for g in true_groups.values()),
        missing_from_store=len(missing),
        k=NEARDUP_K,
        mrr_depth=depth,
        methods=methods,
        details=extra,
        notes=notes + _neardup_notes(linked, depth),
        seconds=timings,
    )
    return finish_report(report, started)


class _GroupsHere:
    """The ground truth restricted to the store's images: groups[i] (None: a distractor), the
    positions of group members (the queries) and each group's paths."""

    def __init__(self, coll: Collection, truth: dict[str, str], groups_csv: Path):
        listed = [truth.get(p) for p in coll.paths]
        sizes = Counter(g for g in listed if g is not None)
        self.groups = [g if g is not None and sizes[g] > 1 else None for g in listed]
        self.members = np.array([i for i, g in enumerate(self.groups) if g is not None], np.int64)
        if len(self.members) == 0:
            raise InvalidArgumentError(
                f"no group of {groups_csv} has two or more images in the store: check that its "
                "file column holds paths relative to PHOTOS"
            )
        self.true_groups: dict[str, list[str]] = {}
        for path, g in zip(coll.paths, self.groups):
            if g is not None:
                self.true_groups.setdefault(g, []).append(path)


METHOD_KEYS = (
    "recall@3",
    "mrr",
    "pair_precision",
    "pair_recall",
    "pair_f1",
    "recall@p0.95",
    "dedupe_recall@p0.95",
)


def _score_ranker(
    ranker,
    st: Store,
    coll: Collection,
    truth: _GroupsHere,
    depth: int,
    links: tuple[np.ndarray, str],
    notes: list[str],
) -> tuple[dict, dict]:
    """(figures, details) of one ranker: its search figures, then its own dedupe's pairs
    (lookalike: dedupe at its default threshold; baselines: union-find at theirs)."""
    lookalike = ranker.name == "lookalike"
    evidence = None
    if lookalike:
        pred, threshold, note, verified = _lookalike_dedupe(st)
        evidence = _verified_evidence(verified, coll)
    scores, more = neardup_scores(
        ranker, truth.groups, truth.members, depth, links[0] if lookalike else None, evidence
    )
    if lookalike:
        if note:
            notes.append(note)
        more["dedupe"] = f"lookalike dedupe: cosine >= {threshold} (its default), or {links[1]}"
    elif ranker.name == "raw_pixels":
        threshold = RAW_PIXELS_DEDUPE_THRESHOLD
        pred = union_groups(ranker, threshold, coll.paths)
        more["dedupe"] = f"cosine >= {threshold}, union-find"
    else:
        threshold = -PHASH_DEDUPE_DISTANCE
        pred = union_groups(ranker, threshold, coll.paths)
        more["dedupe"] = f"Hamming <= {PHASH_DEDUPE_DISTANCE}, union-find"
    if pred is None:
        scores.update(pair_precision=None, pair_recall=None, pair_f1=None)
    else:
        scores.update(metrics.pair_scores(pred, truth.true_groups.values()))
        more["dedupe_groups"] = len(pred)
        if lookalike:
            more["groups"] = pred  # for kept_original; not in the report
    return {key: scores[key] for key in METHOD_KEYS}, more


def _neardup_notes(linked: str, depth: int) -> list[str]:
    return [
        "recall@p0.95: best pair recall over score thresholds t whose pair precision is >= "
        "0.95, the candidate pairs scoring >= t joined into groups as dedupe joins them "
        f"(lookalike: also by its {linked} links); candidates are the pairs of each image "
        f"with its {PAIR_CANDIDATES} nearest others, recall is over all true pairs",
        "dedupe_recall@p0.95: the same sweep with pairs ranked by the evidence of each "
        "method's own dedupe: for lookalike, exact copies and pHash links first, then the "
        "pairs its local features verified (by inliers), then the rest by cosine; for the "
        "baselines, whose dedupe is their score, it equals recall@p0.95 (which, for "
        "lookalike, ranks by cosine: a figure of the embedding alone)",
        f"mrr: over each member's {depth} nearest others (0 if no group-mate among them)",
    ]


def union_groups(ranker, min_score: float, paths: list[str]) -> list[list[str]]:
    comps = metrics.union_find_groups(len(paths), ranker.pairs_at_least(min_score))
    return [[paths[i] for i in comp] for comp in comps]
