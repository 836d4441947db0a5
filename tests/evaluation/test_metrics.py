"""The eval metrics against values worked out by hand on tiny cases; no model, no files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lookalike.evaluation import metrics
from lookalike.evaluation.baselines import (
    DenseRanker,
    HammingRanker,
    phash_codes,
    raw_pixel_vectors,
)
from lookalike.evaluation.run import label_of, neardup_scores, retrieval_scores


class FixedRanker:
    """Neighbour lists given by hand: {query: [(index, score), ...]} best first."""

    name = "fixed"

    def __init__(self, lists: dict[int, list[tuple[int, float]]]):
        self.lists = lists

    def __len__(self) -> int:
        return len(self.lists)

    def neighbours(self, queries, m):
        m = min(m, len(self) - 1)
        idx = np.array([[j for j, _ in self.lists[int(q)][:m]] for q in queries], np.int64)
        sc = np.array([[s for _, s in self.lists[int(q)][:m]] for q in queries], np.float64)
        return idx, sc


# Six labelled images: a a a b b c, each with its 3 nearest others (index, cosine), by hand.
LABELS = ["a", "a", "a", "b", "b", "c"]
LISTS = {
    0: [(1, 0.9), (3, 0.8), (2, 0.7)],  # rel 1 0 1: AP = (1 + 2/3) / 2
    1: [(3, 0.9), (4, 0.8), (0, 0.7)],  # rel 0 0 1: AP = (1/3) / 2; vote b, a
    2: [(5, 0.9), (0, 0.8), (3, 0.7)],  # rel 0 1 0: AP = (1/2) / 2; 1-1-1 vote: c, a, b by sum
    3: [(4, 0.9), (0, 0.5), (1, 0.4)],  # rel 1 0 0: AP = 1 / min(3, 1); vote a, b
    4: [(5, 0.6), (0, 0.6), (3, 0.5)],  # rel 0 0 1: AP = (1/3) / 1; c/a tie by name: a, c, b
    5: [(0, 0.9), (1, 0.8), (2, 0.7)],  # no other c: AP = 0; vote a
}


def test_retrieval_scores_on_six_images():
    got = retrieval_scores(FixedRanker(LISTS), LABELS, np.arange(6), k=3)
    assert got["p@1"] == pytest.approx(2 / 6)
    assert got["p@3"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 1 / 3 + 0) / 6)
    expected_ap = [(1 + 2 / 3) / 2, (1 / 3) / 2, (1 / 2) / 2, 1.0, 1 / 3, 0.0]
    assert got["map@3"] == pytest.approx(sum(expected_ap) / 6)
    assert got["knn_top1"] == pytest.approx(1 / 6)
    assert got["knn_top3"] == pytest.approx(5 / 6)


def test_unlabelled_images_are_never_relevant_nor_voted():
    labels = LABELS[:5] + [None]  # image 5 at the top level: a confuser, not a query
    got = retrieval_scores(FixedRanker(LISTS), labels, np.arange(5), k=3)
    assert got["p@1"] == pytest.approx(2 / 5)
    # image 4's list (c?, a, b) becomes (a, b): a wins, still a miss; image 2's (a, b): a wins
    assert got["knn_top1"] == pytest.approx(2 / 5)


def test_top1_credit_shares_ties():
    idx = np.array([[4, 2, 7], [3, 4, -1], [1, 2, 3], [5, 6, 7]])
    scores = np.array([[0.9, 0.9, 0.8], [0.5, 0.4, -np.inf], [-2, -2, -2], [0.7, 0.1, 0.0]])
    credit = metrics.top1_credit(idx, scores, np.array([2, 4, 3, 6]))
    assert credit.tolist() == [0.5, 0.0, 1 / 3, 0.0]


def test_knn_vote_tie_breaking():
    assert metrics.knn_vote(["b", "a", "b"], [0.1, 0.9, 0.1]) == ["b", "a"]  # votes first
    assert metrics.knn_vote(["c", "a", "b"], [0.9, 0.8, 0.7]) == ["c", "a", "b"]  # then sum
    assert metrics.knn_vote(["c", "a"], [0.5, 0.5]) == ["a", "c"]  # then name
    assert metrics.knn_vote([], []) == []


def test_precision_ap_recall_rr_rows():
    rel = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], bool)
    assert metrics.precision_at_k(rel, 2).tolist() == [0.5, 0.0, 0.5]
    ap = metrics.average_precision_at_k(rel, np.array([2, 0, 5]), 4)
    assert ap == pytest.approx([(1 + 2 / 3) / 2, 0.0, (1 / 2 + 2 / 3 + 3 / 4) / 4])
    assert metrics.recall_at_k(rel, np.array([2, 3, 4]), 3) == pytest.approx([1.0, 0.0, 0.5])
    assert metrics.reciprocal_rank(rel) == pytest.approx([1.0, 0.0, 0.5])


# Two near-duplicate groups, g1 = {0, 1, 2} and g2 = {3, 4}, and two distractors 5, 6.
GROUPS = ["g1", "g1", "g1", "g2", "g2", None, None]
DUP_LISTS = {
    0: [1, 5, 2, 3, 4, 6],  # recall@3 2/2, rr 1
    1: [5, 3, 0, 2, 4, 6],  # recall@3 1/2, rr 1/3
    2: [5, 6, 3, 4, 0, 1],  # recall@3 0, rr 1/5
    3: [4, 0, 1, 2, 5, 6],  # recall@3 1, rr 1
    4: [0, 1, 5, 3, 2, 6],  # recall@3 0, rr 1/4
    5: [6, 0, 1, 2, 3, 4],
    6: [5, 0, 1, 2, 3, 4],
}


def test_neardup_scores_on_two_groups():
    lists = {q: [(j, 1.0 - 0.1 * r) for r, j in enumerate(row)] for q, row in DUP_LISTS.items()}
    got, _ = neardup_scores(FixedRanker(lists), GROUPS, np.arange(5), depth=6)
    assert got["recall@3"] == pytest.approx((1 + 0.5 + 0 + 1 + 0) / 5)
    assert got["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 5 + 1 + 1 / 4) / 5)
    # the first neighbours, all scoring 1.0, join all 7 images into one group: 4 of its 21
    # pairs are true, precision < 0.95 at the top score already, so no recall is reachable
    assert got["recall@p0.95"] == 0.0


def test_recall_at_precision_counts_pairs_of_groups():
    # items 0 1 2 form a true group, 3 is alone in its group, 4 is a distractor: 3 true pairs
    group_of = np.array([0, 0, 0, 1, -1])
    pairs = np.array([(0, 1), (1, 4), (1, 2), (2, 3)])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # t=.9: {0,1} 1/1 pairs right, recall 1/3; t=.8: {0,1,4} 1/3; t=.7: {0,1,2,4} 3/6, recall 1
    assert metrics.recall_at_precision(pairs, scores, group_of, 3, 0.95) == (1 / 3, 0.9)
    assert metrics.recall_at_precision(pairs, scores, group_of, 3, 0.5) == (1.0, 0.7)
    # a cut inside a tie is not allowed: (0,1) and (1,4) at .9 come together, precision 1/3
    tied = np.array([0.9, 0.9, 0.7, 0.6])
    assert metrics.recall_at_precision(pairs, tied, group_of, 3, 0.95) == (0.0, None)
    assert metrics.recall_at_precision(pairs[:0], scores[:0], group_of, 3) == (0.0, None)


def test_pair_scores():
    got = metrics.pair_scores([["a", "b", "c"], ["d", "e"]], [["a", "b"], ["c", "d", "e"]])
    assert got == pytest.approx({"pair_precision": 0.5, "pair_recall": 0.5, "pair_f1": 0.5})
    got = metrics.pair_scores([["a", "b", "x"]], [["a", "b"], ["c", "d", "e"]])
    assert got == pytest.approx({"pair_precision": 1 / 3, "pair_recall": 1 / 4, "pair_f1": 2 / 7})
    assert metrics.pair_scores([], [["a", "b"]])["pair_f1"] == 0.0


def test_union_find_groups():
    assert metrics.union_find_groups(6, [(0, 1), (2, 1), (4, 5)]) == [[0, 1, 2], [4, 5]]
    assert metrics.union_find_groups(3, []) == []


def test_label_of():
    assert label_of("forest/1.jpg") == "forest"
    assert label_of("forest/sub/1.jpg") == "forest"
    assert label_of("1.jpg") is None
    assert label_of("@uploads/x.jpg") is None


def test_dense_ranker_excludes_self_and_breaks_ties_by_order():
    vecs = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [-1, 0]], np.float32)
    ranker = DenseRanker("t", vecs)
    idx, scores = ranker.neighbours(np.array([0, 4]), 3)
    assert idx.tolist() == [[2, 3, 1], [1, 0, 2]]
    assert scores[0].tolist() == [1.0, 1.0, 0.0]
    assert sorted(ranker.pairs_at_least(0.5)) == [(0, 2), (0, 3), (2, 3)]
    assert ranker.neighbours(np.array([1]), 100)[0].shape == (1, 4)


def test_hamming_ranker():
    codes = np.array([0b0000, 0b0001, 0b0011, 0b1111, 0b0001], np.uint64)
    ranker = HammingRanker("t", codes)
    idx, scores = ranker.neighbours(np.array([0]), 4)
    assert idx.tolist() == [[1, 4, 2, 3]]  # 1 and 4 tie at distance 1: lower index first
    assert scores.tolist() == [[-1, -1, -2, -4]]
    assert sorted(ranker.pairs_at_least(-1)) == [(0, 1), (0, 4), (1, 2), (1, 4), (2, 4)]


def test_baseline_features(tmp_path):
    import imagehash

    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(path)
        files.append(path)
    vecs = raw_pixel_vectors(files, size=8)
    assert vecs.shape == (3, 192) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vecs.sum(axis=1), 0.0, atol=1e-4)  # mean-centred
    codes = phash_codes(files)
    ref = [imagehash.phash(Image.open(f)) for f in files]
    assert int(np.bitwise_count(codes[0] ^ codes[1])) == ref[0] - ref[1]
    assert int(codes[2]) == int(str(ref[2]), 16)
