"""Label suggestion figures: the neighbours' vote (lookalike.labels.vote) against true label sets.

Each query's k nearest others (itself excluded) vote with their labels, weighted by
max(cosine, 0), exactly as ``lookalike suggest`` does. Then, over the queries:

- ``label_p@3``: true labels among the 3 best-voted ones, over 3 (even when fewer are voted);
- ``label_r@3``: true labels among the 3 best-voted ones, over the query's true labels;
- ``label_micro_f1``: micro-averaged F1 of "every label whose confidence is >= t", at the t
  (``label_threshold``) that maximises it over the vote confidences of these same queries.

With one label per image, label_r@3 is the top-3 accuracy of the vote and label_p@3 a third of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..labels import vote

TOP = 3
Votes = Sequence[tuple[str, float]]  # (label, confidence) best first, as vote() returns
LABEL_KEYS = (f"label_p@{TOP}", f"label_r@{TOP}", "label_micro_f1", "label_threshold")
LABEL_NOTES = [
    "label_*: the k neighbours (the query excluded) vote for their labels with weight "
    "max(cosine, 0), as `lookalike suggest`; confidence = weight of a label's voters / weight "
    "of all k; ties by label name",
    f"label_p@{TOP} / label_r@{TOP}: true labels among the {TOP} best-voted, over {TOP} / over "
    "the query's true labels",
    "label_micro_f1: micro-averaged F1 of the labels voted with confidence >= label_threshold, "
    "the threshold that maximises it on these same queries (an optimistic choice)",
    "phash: no cosine to weigh the vote with, so no label_* figures",
]


def precision_recall_at_k(
    truth: Sequence[frozenset[str]], votes: Sequence[Votes], k: int = TOP
) -> tuple[float, float]:
    """Mean precision@k and recall@k of the k best-voted labels.

    Precision divides by k; recall by the query's true labels (queries without any are left out
    of the recall mean). (0.0, 0.0) for no queries.
    """
    if len(truth) != len(votes):
        raise ValueError(f"{len(truth)} true label sets but {len(votes)} votes")
    if not truth:
        return 0.0, 0.0
    found = [len({label for label, _ in v[:k]} & t) for t, v in zip(truth, votes)]
    precision = sum(found) / (k * len(truth))
    recalls = [f / len(t) for f, t in zip(found, truth) if t]
    return precision, (sum(recalls) / len(recalls) if recalls else 0.0)


def best_micro_f1(
    truth: Sequence[frozenset[str]], votes: Sequence[Votes]
) -> tuple[float, float | None]:
    """The best micro-F1 of "labels voted with confidence >= t" over thresholds t, and that t.

    Only the vote confidences themselves are candidate thresholds (a threshold can only cut
    between them); labels voted with equal confidence are taken or left together. The largest t
    wins a tie of F1. (0.0, None) when nothing true is ever voted.
    """
    if len(truth) != len(votes):
        raise ValueError(f"{len(truth)} true label sets but {len(votes)} votes")
    conf, hit = [], []
    for t, v in zip(truth, votes):
        for label, c in v:
            conf.append(c)
            hit.append(label in t)
    n_true = sum(len(t) for t in truth)
    if not conf or n_true == 0:
        return 0.0, None
    order = np.argsort(-np.asarray(conf, np.float64), kind="stable")
    c = np.asarray(conf, np.float64)[order]
    tp = np.cumsum(np.asarray(hit, bool)[order])
    taken = np.arange(1, len(c) + 1)
    f1 = 2 * tp / (taken + n_true)  # 2TP / (2TP + FP + FN), with TP + FP = taken, TP + FN = n_true
    f1 = np.where(np.r_[c[1:] != c[:-1], True], f1, -1.0)  # only at the end of a tie
    best = int(np.argmax(f1))  # the first maximum: the largest threshold
    if tp[best] == 0:
        return 0.0, None
    return float(f1[best]), float(c[best])


def suggestion_scores(truth: Sequence[frozenset[str]], votes: Sequence[Votes]) -> dict[str, float]:
    """label_p@3, label_r@3, label_micro_f1 and its label_threshold."""
    precision, recall = precision_recall_at_k(truth, votes, TOP)
    f1, threshold = best_micro_f1(truth, votes)
    return dict(zip(LABEL_KEYS, (precision, recall, f1, threshold)))


def ranker_votes(
    ranker, label_sets: Sequence[frozenset[str]], queries: np.ndarray, k: int, chunk: int = 512
) -> list[list[tuple[str, float]]]:
    """Every label's vote confidence for each query, from its k nearest others by ranker.

    ranker.neighbours(indices, k) gives (q, m) collection indices (-1 pads) and cosine scores,
    the query itself excluded; unlabelled neighbours weigh in the total as in `suggest`.
    """
    n_labels = max(1, len(set().union(*label_sets)))
    out = []
    for start in range(0, len(queries), chunk):
        idx, scores = ranker.neighbours(queries[start : start + chunk], k)
        for row, srow in zip(idx, scores):
            pairs = [(label_sets[j], float(s)) for j, s in zip(row.tolist(), srow) if j >= 0]
            out.append(vote(pairs, top=n_labels))
    return out


def ranker_suggestion_scores(
    ranker, label_sets: Sequence[frozenset[str]], queries: np.ndarray, k: int
) -> dict[str, float]:
    """suggestion_scores of the ranker's votes for the queries."""
    votes = ranker_votes(ranker, label_sets, queries, k)
    return suggestion_scores([label_sets[int(q)] for q in queries], votes)
