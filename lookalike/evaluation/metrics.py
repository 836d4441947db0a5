"""Retrieval and near-duplicate metrics on ranked neighbour lists: pure numpy, no model.

A ranked list is one row of ``relevant``, a (queries, m) bool array: ``relevant[q, r]`` says
whether the (r+1)-th nearest other image of query q is relevant to it (same label, or same
near-duplicate group). Rows shorter than m are padded with False.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np


def _rows(relevant: np.ndarray) -> np.ndarray:
    rel = np.asarray(relevant, dtype=bool)
    if rel.ndim != 2:
        raise ValueError(f"expected a (queries, m) relevance array, got shape {rel.shape}")
    return rel


def precision_at_k(relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query: the share of its k nearest others that are relevant, (queries,) float."""
    rel = _rows(relevant)
    return rel[:, :k].sum(axis=1) / float(k)


def average_precision_at_k(relevant: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query AP@k: sum over relevant ranks r <= k of precision@r, over min(k, R).

    R is the number of relevant images the query has in the whole collection (n_relevant); a
    query with R = 0 scores 0.
    """
    rel = _rows(relevant)[:, :k].astype(np.float64)
    ranks = np.arange(1, rel.shape[1] + 1)
    prec = np.cumsum(rel, axis=1) / ranks
    denom = np.minimum(np.asarray(n_relevant, dtype=np.float64), k)
    total = (prec * rel).sum(axis=1)
    return np.divide(total, denom, out=np.zeros_like(total), where=denom > 0)


def recall_at_k(relevant: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query: the share of its R relevant images found among its k nearest others."""
    rel = _rows(relevant)
    found = rel[:, :k].sum(axis=1).astype(np.float64)
    denom = np.asarray(n_relevant, dtype=np.float64)
    return np.divide(found, denom, out=np.zeros_like(found), where=denom > 0)


def reciprocal_rank(relevant: np.ndarray) -> np.ndarray:
    """Per query: 1 / rank of its first relevant neighbour, 0 if none is in the list."""
    rel = _rows(relevant)
    if rel.shape[1] == 0:
        return np.zeros(len(rel))
    hit = rel.any(axis=1)
    first = rel.argmax(axis=1) + 1.0
    return np.where(hit, 1.0 / first, 0.0)


def top1_credit(neighbours: np.ndarray, scores: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Per query: 1/t when the wanted index is among the t neighbours tied at the top score,
    else 0 -- recall@1 as the expected value over a random order of ties.

    neighbours, scores: (q, m) best first, -1 pads; wanted: (q,). Ties are only seen within the m
    neighbours given, so m should be comfortably more than the ties expected.
    """
    idx = np.asarray(neighbours)
    sc = np.asarray(scores, dtype=np.float64)
    if idx.shape[1] == 0:
        return np.zeros(len(idx))
    tied = (sc == sc[:, :1]) & (idx >= 0)
    found = (tied & (idx == np.asarray(wanted)[:, None])).any(axis=1)
    return np.where(found, 1.0 / np.maximum(tied.sum(axis=1), 1), 0.0)


def knn_vote(labels: Sequence[str], scores: Sequence[float]) -> list[str]:
    """Rank the labels of k neighbours by votes; ties by summed similarity, then label name."""
    votes: Counter[str] = Counter(labels)
    summed: dict[str, float] = {}
    for label, score in zip(labels, scores):
        summed[label] = summed.get(label, 0.0) + float(score)
    return sorted(votes, key=lambda lab: (-votes[lab], -summed[lab], lab))


def knn_top_accuracy(
    query_labels: Sequence[str], rankings: Sequence[Sequence[str]], top: int
) -> float:
    """Share of queries whose label is among the first ``top`` of its kNN vote ranking."""
    if not query_labels:
        return 0.0
    hits = sum(lab in list(rank)[:top] for lab, rank in zip(query_labels, rankings))
    return hits / len(query_labels)


# -- pairs ------------------------------------------------------------------------------------
def pairs_from_groups(groups: Iterable[Iterable[str]]) -> set[tuple[str, str]]:
    """Every unordered pair (a, b), a < b, of members that share a group."""
    pairs: set[tuple[str, str]] = set()
    for group in groups:
        members = sorted(set(group))
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                pairs.add((a, b))
    return pairs


def pair_scores(
    predicted: Iterable[Iterable[str]], truth: Iterable[Iterable[str]]
) -> dict[str, float]:
    """Pair precision, recall and F1 of predicted groups against true groups.

    A pair is two members of one group; precision is 0 when nothing is predicted, recall is 0
    when there are no true pairs.
    """
    pred, true = pairs_from_groups(predicted), pairs_from_groups(truth)
    tp = len(pred & true)
    precision = tp / len(pred) if pred else 0.0
    recall = tp / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"pair_precision": precision, "pair_recall": recall, "pair_f1": f1}


def recall_at_precision(
    pairs: np.ndarray,
    scores: np.ndarray,
    group_of: np.ndarray,
    n_true_pairs: int,
    min_precision: float = 0.95,
) -> tuple[float, float | None]:
    """The best pair recall of dedupe-style groups over thresholds whose precision is enough.

    For each threshold t, the candidate pairs scoring >= t are joined into connected components
    (as dedupe groups them) and every two members of a component count as a predicted pair;
    precision and recall compare those with the true pairs. pairs: (p, 2) item indices;
    scores: (p,), higher = more alike; group_of: (n,) true group of each item, -1 for none;
    n_true_pairs: all true pairs, found as candidates or not. Pairs with equal scores are taken
    or left together. Returns (recall, t), or (0.0, None) when no t reaches min_precision.
    Components merge small into large, so the sweep is O(p log p + n log n).
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64)
    group_of = np.asarray(group_of)
    if len(scores) == 0 or n_true_pairs <= 0:
        return 0.0, None
    parent = list(range(len(group_of)))
    size = [1] * len(group_of)
    counts: list[Counter] = [Counter([int(g)]) if g >= 0 else Counter() for g in group_of]

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    order = np.argsort(-scores, kind="stable")
    tp = predicted = 0
    best: tuple[float, float | None] = (0.0, None)
    for pos, e in enumerate(order.tolist()):
        a, b = find(int(pairs[e, 0])), find(int(pairs[e, 1]))
        if a != b:
            if size[a] < size[b]:
                a, b = b, a
            predicted += size[a] * size[b]
            tp += sum(v * counts[a].get(g, 0) for g, v in counts[b].items())
            counts[a].update(counts[b])
            counts[b] = Counter()
            size[a] += size[b]
            parent[b] = a
        end_of_tie = pos + 1 == len(order) or scores[order[pos + 1]] != scores[e]
        if end_of_tie and predicted and tp / predicted >= min_precision:
            if tp / n_true_pairs > best[0]:
                best = (tp / n_true_pairs, float(scores[e]))
    return best


def union_find_groups(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (size >= 2) of n items joined by the given index pairs."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    return [c for c in comps.values() if len(c) > 1]
