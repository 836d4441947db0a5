"""`lookalike eval`: score a store's own search, and baselines, on the same images.

Every image of the store queries lookalike through :meth:`Engine.search_vectors` with its stored
vector, itself excluded -- exactly the answers of :meth:`Engine.search_id`, which the CLI and the
HTTP API serve -- and each baseline over the same files. Without a store, PHOTOS is trained on
and indexed into a temporary one first.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..engine import MAX_K, Engine
from ..errors import InvalidArgumentError
from ..images import find_images
from ..labels import read_labels_csv
from ..store import UPLOAD_PREFIX, Store, copy_model
from . import metrics
from .baselines import (
    PHASH_DEDUPE_DISTANCE,
    RAW_PIXELS_DEDUPE_THRESHOLD,
    RAW_PIXELS_SIZE,
    DenseRanker,
    HammingRanker,
    phash_codes,
    raw_pixel_vectors,
)
from .labels import LABEL_KEYS, LABEL_NOTES, ranker_suggestion_scores

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]

PAIR_CANDIDATES = 10  # nearest others per image whose pairs the recall@p0.95 sweep scores
MIN_PRECISION = 0.95
VERIFIED_SCORE = 2.0  # dedupe_recall@p0.95: a verified pair ranks above every cosine (<= 1)
NEARDUP_K = 3  # recall@3
TIE_DEPTH = 32  # neighbours read to see ties at the top (pHash distances tie often)
QUERY_CHUNK = 512  # queries per search call
NOTES = [
    "pretrained CNN baseline left out: its weights cannot be downloaded on this machine",
    f"raw_pixels: {RAW_PIXELS_SIZE}x{RAW_PIXELS_SIZE} RGB thumbnails from "
    "lookalike.images.load_image, each minus its own mean, cosine",
    "phash: imagehash.phash (64 bits) of each file, Hamming distance (its scores and thresholds "
    "are minus the distance), ties by path",
]


# -- the images of a store --------------------------------------------------------------------
@dataclass
class Collection:
    """A store's images in path order, with the vectors lookalike stored for them."""

    ids: np.ndarray  # (n,) int64 store ids
    paths: list[str]  # relative to PHOTOS ('/' separated), or @uploads/<name>
    files: list[Path]
    vectors: np.ndarray  # (n, d) float32 unit rows, as in the index

    def __len__(self) -> int:
        return len(self.ids)


def load_collection(store: Store) -> Collection:
    """Every image of the store with its stored embedding, sorted by path."""
    by_id = {rec.id: rec.path for rec in store.db.records()}
    ids, vecs = [], []
    for chunk_ids, chunk_vecs in store.embeddings():
        ids.append(chunk_ids)
        vecs.append(chunk_vecs)
    if not ids:
        raise InvalidArgumentError(f"store {store.root} holds no images")
    all_ids, all_vecs = np.concatenate(ids), np.concatenate(vecs)
    order = sorted(range(len(all_ids)), key=lambda i: by_id[int(all_ids[i])])
    paths = [by_id[int(all_ids[i])] for i in order]
    return Collection(all_ids[order], paths, [store.file_path(p) for p in paths], all_vecs[order])


class EngineRanker:
    """lookalike's own answers: Engine.search_vectors with each stored vector, itself excluded."""

    name = "lookalike"

    def __init__(self, engine: Engine, coll: Collection):
        self.engine, self.coll = engine, coll
        self.position = {int(i): n for n, i in enumerate(coll.ids)}

    def __len__(self) -> int:
        return len(self.coll)

    def neighbours(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, m') collection indices (-1 pads a short list) and cosine scores."""
        m = max(1, min(m, len(self) - 1, MAX_K))
        hits = self.engine.search_vectors(
            self.coll.vectors[queries], m, exclude=[int(i) for i in self.coll.ids[queries]]
        )
        idx = np.full((len(queries), m), -1, np.int64)
        scores = np.full((len(queries), m), -np.inf)
        for row, row_hits in enumerate(hits):
            for col, hit in enumerate(row_hits):
                idx[row, col] = self.position[hit.id]
                scores[row, col] = hit.score
        return idx, scores


def _rankers(engine: Engine, coll: Collection, timings: dict[str, float]) -> Iterator:
    """lookalike, then the baselines; feature extraction time goes into timings."""
    yield EngineRanker(engine, coll)
    t0 = time.perf_counter()
    raw = DenseRanker("raw_pixels", raw_pixel_vectors(coll.files))
    timings["raw_pixels_features"] = time.perf_counter() - t0
    yield raw
    t0 = time.perf_counter()
    phash = HammingRanker("phash", phash_codes(coll.files))
    timings["phash_features"] = time.perf_counter() - t0
    yield phash


def _chunks(indices: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), QUERY_CHUNK):
        yield indices[start : start + QUERY_CHUNK]


# -- stores -----------------------------------------------------------------------------------
@contextmanager
def _store_for(
    photos: Path,
    store: Path | None,
    model: ModelConfig | None,
    progress: ProgressFn | None,
    info: dict[str, Any],
) -> Iterator[Store]:
    """The given store (which must index PHOTOS), or a temporary one trained on PHOTOS."""
    from ..indexer import index_folder

    photos = Path(photos).expanduser().resolve()
    if not photos.is_dir():
        raise InvalidArgumentError(f"photos folder not found: {photos}")
    if store is not None:
        st = Store.open(store)
        try:
            if st.photos_root is None or st.photos_root.resolve() != photos:
                raise InvalidArgumentError(
                    f"store {st.root} indexes {st.photos_root}, not {photos}; pass the store "
                    "of PHOTOS, or leave --store out to train a temporary one"
                )
            info.update(store=str(st.root), trained=False)
            yield st
        finally:
            st.close()
        return
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as tmp:
        report = index_folder(photos, Path(tmp) / "store", model=model, progress=progress)
        info.update(
            store=None,
            trained=True,
            index_seconds=round(report.seconds, 2),
            train_seconds=round(report.train_seconds, 2),
            skipped_files=len(report.failed),
        )
        with Store.open(Path(tmp) / "store") as st:
            yield st


def _finish(report: dict[str, Any], started: float) -> dict[str, Any]:
    report["seconds"] = {k: round(v, 2) for k, v in report["seconds"].items()}
    report["seconds"]["total"] = round(time.perf_counter() - started, 2)
    return report


# -- retrieval --------------------------------------------------------------------------------
def label_of(path: str) -> str | None:
    """A labelled image's label: the first folder of its path; None at the top level or upload."""
    if path.startswith(UPLOAD_PREFIX) or "/" not in path:
        return None
    return path.split("/", 1)[0]


def retrieval_scores(
    ranker, labels: list[str | None], queries: np.ndarray, k: int
) -> dict[str, float]:
    """p@1, p@k, map@k, knn_top1, knn_top3 of one ranker; labels[i] is None when unlabelled."""
    names = sorted({lab for lab in labels if lab is not None})
    lab_id = np.array([names.index(lab) if lab is not None else -1 for lab in labels] + [-2])
    counts = Counter(labels)
    p1 = pk = ap = 0.0
    query_labels: list[str] = []
    rankings: list[list[str]] = []
    for chunk in _chunks(queries):
        idx, scores = ranker.neighbours(chunk, k)
        pad = np.full((len(chunk), max(0, k - idx.shape[1])), -1, np.int64)
        idx = np.concatenate([idx, pad], axis=1)
        nb_lab = lab_id[idx]  # -1 maps to the sentinel -2: never relevant
        rel = nb_lab == lab_id[chunk][:, None]
        n_rel = np.array([counts[labels[q]] - 1 for q in chunk])
        p1 += metrics.precision_at_k(rel, 1).sum()
        pk += metrics.precision_at_k(rel, k).sum()
        ap += metrics.average_precision_at_k(rel, n_rel, k).sum()
        for q, row, srow in zip(chunk, idx, scores):
            votes = [(labels[j], s) for j, s in zip(row, srow) if j >= 0 and labels[j] is not None]
            rankings.append(metrics.knn_vote([v[0] for v in votes], [v[1] for v in votes]))
            query_labels.append(labels[q])
    n = len(queries)
    return {
        "p@1": p1 / n,
        f"p@{k}": pk / n,
        f"map@{k}": ap / n,
        "knn_top1": metrics.knn_top_accuracy(query_labels, rankings, 1),
        "knn_top3": metrics.knn_top_accuracy(query_labels, rankings, 3),
    }


def evaluate_retrieval(
    photos: Path,
    store: Path | None = None,
    k: int = 10,
    model: ModelConfig | None = None,
    progress: ProgressFn | None = None,
    labels_csv: Path | None = None,
) -> dict[str, Any]:
    """Score retrieval on PHOTOS/<label>/<file>: every labelled image queries the others.

    With labels_csv (`path,labels`, '|'-separated), its labels replace the folders and only the
    label suggestion figures (lookalike.evaluation.labels) are reported.
    """
    if not 1 <= k <= MAX_K:
        raise InvalidArgumentError(f"k must be between 1 and {MAX_K}, got {k}")
    csv_labels = read_labels_csv(labels_csv) if labels_csv is not None else None
    started = time.perf_counter()
    report: dict[str, Any] = {"task": "retrieval", "photos": str(Path(photos).resolve())}
    timings: dict[str, float] = {}
    with _store_for(photos, store, model, progress, report) as st:
        engine = Engine(st)
        coll = load_collection(st)
        labels = [label_of(p) for p in coll.paths]
        if csv_labels is None:
            label_sets = [frozenset([lab] if lab is not None else ()) for lab in labels]
        else:
            label_sets = [frozenset(csv_labels.get(p, ())) for p in coll.paths]
        queries = np.array([i for i, s in enumerate(label_sets) if s], np.int64)
        if len(queries) == 0 and csv_labels is not None:
            raise InvalidArgumentError(
                f"no image of the store has a label in {labels_csv}: check that its path "
                "column holds paths relative to PHOTOS"
            )
        if len(queries) == 0:
            raise InvalidArgumentError(
                f"no labelled images in {photos}: expected one sub-folder per label, "
                "PHOTOS/<label>/<file>"
            )
        methods = {}
        for ranker in _rankers(engine, coll, timings):
            t0 = time.perf_counter()
            scores = {} if csv_labels is not None else retrieval_scores(ranker, labels, queries, k)
            if ranker.name == "phash":  # minus Hamming distances: no similarity to weigh a vote
                scores.update(dict.fromkeys(LABEL_KEYS))
            else:
                scores.update(ranker_suggestion_scores(ranker, label_sets, queries, k))
            methods[ranker.name] = scores
            timings[ranker.name] = time.perf_counter() - t0
    report.update(
        n=int(len(queries)),
        images=len(coll),
        k=k,
        labels=dict(sorted(Counter(lab for s in label_sets for lab in s).items())),
        labels_source=str(Path(labels_csv).resolve()) if labels_csv is not None else "folders",
        methods=methods,
        notes=NOTES
        + (
            []
            if csv_labels is not None
            else [
                f"knn_top1/knn_top3: majority vote of the {k} neighbours' labels, ties broken "
                "by summed similarity, then label name",
                f"map@{k}: sum of precision at each relevant rank <= {k}, over min({k}, "
                "relevant images of the query)",
            ]
        )
        + LABEL_NOTES,
        seconds=timings,
    )
    return _finish(report, started)


# -- near duplicates from a ground-truth file -------------------------------------------------
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
    for chunk in _chunks(everyone):
        need = depth if is_member[chunk].any() else PAIR_CANDIDATES
        idx, scores = ranker.neighbours(chunk, max(need, PAIR_CANDIDATES))
        for q, row, srow in zip(chunk, idx[:, :PAIR_CANDIDATES], scores[:, :PAIR_CANDIDATES]):
            for j, s in zip(row.tolist(), srow.tolist()):
                if j >= 0:
                    key = (min(int(q), j), max(int(q), j))
                    candidates[key] = max(s, candidates.get(key, -np.inf))
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
    for a, b, score in evidence if evidence is not None else ():
        key = (min(int(a), int(b)), max(int(a), int(b)))
        candidates[key] = max(score, candidates.get(key, -np.inf))
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
    report: dict[str, Any] = {"task": "neardup", "photos": str(Path(photos).resolve())}
    timings: dict[str, float] = {}
    notes = list(NOTES)
    with _store_for(photos, store, model, progress, report) as st:
        engine = Engine(st)
        coll = load_collection(st)
        listed = [truth.get(p) for p in coll.paths]
        sizes = Counter(g for g in listed if g is not None)
        groups = [g if g is not None and sizes[g] > 1 else None for g in listed]
        members = np.array([i for i, g in enumerate(groups) if g is not None], np.int64)
        if len(members) == 0:
            raise InvalidArgumentError(
                f"no group of {groups_csv} has two or more images in the store: check that its "
                "file column holds paths relative to PHOTOS"
            )
        true_groups: dict[str, list[str]] = {}
        for path, g in zip(coll.paths, groups):
            if g is not None:
                true_groups.setdefault(g, []).append(path)
        depth = min(len(coll) - 1, MAX_K)
        methods: dict[str, dict[str, Any]] = {}
        extra: dict[str, dict[str, Any]] = {}
        links, linked = _dedupe_links(st, coll)
        for ranker in _rankers(engine, coll, timings):
            t0 = time.perf_counter()
            lookalike = ranker.name == "lookalike"
            evidence = None
            if lookalike:
                pred, threshold, note, verified = _lookalike_dedupe(st)
                evidence = _verified_evidence(verified, coll)
            scores, more = neardup_scores(
                ranker, groups, members, depth, links if lookalike else None, evidence
            )
            if lookalike:
                if note:
                    notes.append(note)
                more["dedupe"] = (
                    f"lookalike dedupe: cosine >= {threshold} (its default), or {linked}"
                )
            elif ranker.name == "raw_pixels":
                threshold = RAW_PIXELS_DEDUPE_THRESHOLD
                pred = _union_groups(ranker, threshold, coll.paths)
                more["dedupe"] = f"cosine >= {threshold}, union-find"
            else:
                threshold = -PHASH_DEDUPE_DISTANCE
                pred = _union_groups(ranker, threshold, coll.paths)
                more["dedupe"] = f"Hamming <= {PHASH_DEDUPE_DISTANCE}, union-find"
            if pred is None:
                scores.update(pair_precision=None, pair_recall=None, pair_f1=None)
            else:
                scores.update(metrics.pair_scores(pred, true_groups.values()))
                more["dedupe_groups"] = len(pred)
            order = [
                "recall@3",
                "mrr",
                "pair_precision",
                "pair_recall",
                "pair_f1",
                "recall@p0.95",
                "dedupe_recall@p0.95",
            ]
            methods[ranker.name] = {key: scores[key] for key in order}
            extra[ranker.name] = more
            timings[ranker.name] = time.perf_counter() - t0
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
        notes=notes
        + [
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
        ],
        seconds=timings,
    )
    return _finish(report, started)


def _union_groups(ranker, min_score: float, paths: list[str]) -> list[list[str]]:
    comps = metrics.union_find_groups(len(paths), ranker.pairs_at_least(min_score))
    return [[paths[i] for i in comp] for comp in comps]


# -- near duplicates made here: --transforms --------------------------------------------------
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
            for ranker in _rankers(engine, coll, timings):
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
        notes=NOTES
        + [
            "recall@1: share of transformed copies (each a query, itself excluded) whose nearest "
            "image is their original; the other copies of the same photo are left out of its "
            "ranking (as in Copydays), copies of other photos stay; when t images tie for "
            "nearest and the original is one of them, the copy scores 1/t"
        ],
        seconds=timings,
    )
    return _finish(report, started)


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
