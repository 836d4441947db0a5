"""eval neardup's dedupe_recall@p0.95: pairs ranked by dedupe's own evidence, beside the
embedding's recall@p0.95 (cosine alone)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lookalike.evaluation.neardup import VERIFIED_SCORE, _verified_evidence, neardup_scores

# Two true groups {0, 1, 2} and {3, 4}; 5 and 6 are distractors. By cosine, 2 (a crop) is
# far from its group, under a wrong pair (1, 5): no cut of the cosine ranking reaches 2.
GROUPS = ["g1", "g1", "g1", "g2", "g2", None, None]
COSINE = {(0, 1): 0.95, (3, 4): 0.9, (1, 5): 0.7, (0, 2): 0.5, (5, 6): 0.4}


class PairRanker:
    """Each image's others ranked by the cosines above (0 for the pairs not listed)."""

    name = "pairs"

    def __len__(self) -> int:
        return len(GROUPS)

    def neighbours(self, queries, m):
        m = min(m, len(self) - 1)
        rows, scores = [], []
        for q in np.asarray(queries).tolist():
            others = [j for j in range(len(self)) if j != q]
            cos = {j: COSINE.get((min(q, j), max(q, j)), 0.0) for j in others}
            best = sorted(others, key=lambda j: (-cos[j], j))[:m]
            rows.append(best)
            scores.append([cos[j] for j in best])
        return np.array(rows, np.int64), np.array(scores, np.float64)


def scores_with(evidence):
    got, more = neardup_scores(PairRanker(), GROUPS, np.arange(5), depth=6, evidence=evidence)
    return got, more


def test_without_evidence_the_dedupe_figure_is_the_embedding_one():
    got, more = scores_with(None)
    # 4 true pairs: (0,1), (3,4) reached at 0.9 with precision 1; (1,5) breaks precision first
    assert got["recall@p0.95"] == pytest.approx(2 / 4)
    assert got["dedupe_recall@p0.95"] == got["recall@p0.95"]
    assert more["dedupe_threshold@p0.95"] == more["threshold@p0.95"] == 0.9


def test_verified_pairs_rank_above_every_cosine_by_their_inliers():
    evidence = np.array([(0, 2, VERIFIED_SCORE + 0.120), (2, 1, VERIFIED_SCORE + 0.080)])
    got, more = scores_with(evidence)
    assert got["recall@p0.95"] == pytest.approx(2 / 4)  # the embedding's figure is unchanged
    # verified (0,2), (1,2) then cosine (0,1), (3,4): all 4 true pairs before (1,5) at 0.7
    assert got["dedupe_recall@p0.95"] == pytest.approx(4 / 4)
    assert more["dedupe_threshold@p0.95"] == 0.9
    assert more["verified_pairs"] == 2


def test_a_wrongly_verified_pair_costs_the_dedupe_figure():
    evidence = np.array([(1, 5, VERIFIED_SCORE + 0.3), (0, 2, VERIFIED_SCORE + 0.1)])
    got, _ = scores_with(evidence)
    # (1,5) comes first: group {1, 5} alone is 0 of 1 pairs right, and stays in every cut
    # below, so precision never reaches 0.95 again
    assert got["dedupe_recall@p0.95"] == 0.0


def test_verified_evidence_rows_follow_the_collection_positions():
    coll = SimpleNamespace(ids=np.array([10, 11, 12, 13], np.int64))
    rows = _verified_evidence({(10, 12): 80, (11, 13): 300, (12, 99): 500}, coll)
    assert rows.tolist() == [
        [0, 2, VERIFIED_SCORE + 0.080],
        [1, 3, VERIFIED_SCORE + 0.300],
    ]  # the pair of an id outside the collection is left out


def test_kept_original_counts_the_groups_that_keep_their_original(tmp_path):
    from lookalike.evaluation.neardup import kept_originals, read_originals

    csv_file = tmp_path / "groups.csv"
    csv_file.write_text(
        "file,group_id,variant\na.jpg,g1,original\nb.jpg,g1,crop\nc.jpg,g2,Original\n"
        "d.jpg,g2,jpeg\ne.jpg,d1,distractor\n"
    )
    originals = read_originals(csv_file)
    assert originals == {"a.jpg", "c.jpg"}
    groups = [["a.jpg", "b.jpg"], ["d.jpg", "c.jpg"], ["e.jpg", "x.jpg"]]  # kept photo first
    assert kept_originals(groups, originals) == {"kept": 1, "of": 2}
    plain = tmp_path / "plain.csv"
    plain.write_text("file,group_id\na.jpg,g1\nb.jpg,g1\n")
    assert read_originals(plain) == set()
