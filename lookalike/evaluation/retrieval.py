"""`lookalike eval retrieval`: every labelled photo queries the others (p@k, map@k, kNN vote)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..engine import MAX_K, Engine
from ..errors import InvalidArgumentError
from ..labels import read_labels_csv
from ..store import UPLOAD_PREFIX
from . import metrics
from .collection import (
    NOTES,
    ProgressFn,
    all_rankers,
    finish_report,
    load_collection,
    query_chunks,
    store_for,
)
from .labels import LABEL_KEYS, LABEL_NOTES, ranker_suggestion_scores


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
    for chunk in query_chunks(queries):
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


def _queries(label_sets: list[frozenset], photos: Path, labels_csv: Path | None) -> np.ndarray:
    """The rows with a label (they query the others); none is an error that says why."""
    queries = np.array([i for i, s in enumerate(label_sets) if s], np.int64)
    if len(queries) == 0 and labels_csv is not None:
        raise InvalidArgumentError(
            f"no image of the store has a label in {labels_csv}: check that its path "
            "column holds paths relative to PHOTOS"
        )
    if len(queries) == 0:
        raise InvalidArgumentError(
            f"no labelled images in {photos}: expected one sub-folder per label, "
            "PHOTOS/<label>/<file>"
        )
    return queries


def _vote_notes(k: int) -> list[str]:
    return [
        f"knn_top1/knn_top3: majority vote of the {k} neighbours' labels, ties broken "
        "by summed similarity, then label name",
        f"map@{k}: sum of precision at each relevant rank <= {k}, over min({k}, "
        "relevant images of the query)",
    ]


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
    with store_for(photos, store, model, progress, report) as st:
        engine = Engine(st)
        coll = load_collection(st)
        labels = [label_of(p) for p in coll.paths]
        if csv_labels is None:
            label_sets = [frozenset([lab] if lab is not None else ()) for lab in labels]
        else:
            label_sets = [frozenset(csv_labels.get(p, ())) for p in coll.paths]
        queries = _queries(label_sets, photos, labels_csv)
        methods = {}
        for ranker in all_rankers(engine, coll, timings):
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
        notes=NOTES + ([] if csv_labels is not None else _vote_notes(k)) + LABEL_NOTES,
        seconds=timings,
    )
    return finish_report(report, started)
