"""Label suggestion figures (lookalike.evaluation.labels) on hand-computed cases, and
`lookalike eval retrieval --labels` against the store's own suggestions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lookalike.cli import app
from lookalike.evaluation.baselines import DenseRanker
from lookalike.evaluation.labels import (
    LABEL_KEYS,
    best_micro_f1,
    precision_recall_at_k,
    ranker_votes,
    suggestion_scores,
)
from lookalike.labels import vote

TRUTH = [frozenset({"beach", "sunset"}), frozenset({"city"}), frozenset({"forest"})]
VOTES = [
    [("beach", 0.9), ("city", 0.5), ("sunset", 0.4), ("sea", 0.1)],
    [("city", 0.6), ("night", 0.3)],
    [("sea", 0.7)],
]


def test_precision_recall_at_k_hand_computed():
    # top 3: q0 finds beach and sunset (2 of 2), q1 city (1 of 1), q2 nothing (0 of 1)
    p, r = precision_recall_at_k(TRUTH, VOTES, 3)
    assert p == pytest.approx(3 / 9)  # over 3 slots each, even when fewer labels are voted
    assert r == pytest.approx((1 + 1 + 0) / 3)
    p1, r1 = precision_recall_at_k(TRUTH, VOTES, 1)
    assert p1 == pytest.approx(2 / 3)
    assert r1 == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert precision_recall_at_k([], [], 3) == (0.0, 0.0)
    # a query without true labels counts in precision, not in recall
    p, r = precision_recall_at_k([frozenset({"a"}), frozenset()], [[("a", 1.0)], [("a", 1.0)]], 1)
    assert (p, r) == (0.5, 1.0)
    with pytest.raises(ValueError):
        precision_recall_at_k(TRUTH, VOTES[:2])


def test_best_micro_f1_hand_computed():
    # by confidence: .9 T, .7 F, .6 T, .5 F, .4 T, .3 F, .1 F; 4 true labels in all.
    # t = .4 predicts {beach, city, sunset}, {city}, {sea}: TP 3, FP 2, FN 1 -> F1 = 6/9
    f1, t = best_micro_f1(TRUTH, VOTES)
    assert f1 == pytest.approx(6 / 9) and t == 0.4


def test_best_micro_f1_ties():
    truth = [frozenset({"a"}), frozenset({"b"})]
    # labels voted with the same confidence are taken together: .5 takes a (T) and c (F)
    f1, t = best_micro_f1(truth, [[("a", 0.5)], [("c", 0.5), ("b", 0.2)]])
    assert (f1, t) == (pytest.approx(4 / 5), 0.2)  # TP 2, FP 1, FN 0
    # equal F1 at .9 (TP 1, taken 1) and at .4 (TP 2, taken 4): the larger threshold
    f1, t = best_micro_f1(truth, [[("a", 0.9), ("x", 0.5)], [("y", 0.6), ("b", 0.4)]])
    assert (f1, t) == (pytest.approx(2 / 3), 0.9)
    assert best_micro_f1(truth, [[("x", 0.9)], []]) == (0.0, None)
    assert best_micro_f1([], []) == (0.0, None)
    assert best_micro_f1([frozenset()], [[("x", 0.9)]]) == (0.0, None)


def test_single_label_figures_reduce_to_top_k_accuracy():
    truth = [frozenset({"a"}), frozenset({"b"}), frozenset({"c"})]
    votes = [[("a", 0.7), ("b", 0.3)], [("a", 0.6), ("b", 0.4)], [("a", 1.0)]]
    scores = suggestion_scores(truth, votes)
    assert list(scores) == list(LABEL_KEYS)
    assert scores["label_r@3"] == pytest.approx(2 / 3)  # top-3 accuracy
    assert scores["label_p@3"] == pytest.approx(2 / 9)
    # 1.0 a F | .7 a T | .6 a F | .4 b T | .3 b F; 3 true: at .4, TP 2, taken 4 -> 4/7
    assert scores["label_micro_f1"] == pytest.approx(4 / 7)
    assert scores["label_threshold"] == 0.4


def test_ranker_votes_weigh_neighbours_by_cosine():
    vectors = np.array(
        [[1, 0], [0.8, 0.6], [0.6, 0.8], [-1, 0], [0, 1]], np.float32
    )  # cosines to row 0: 0.8, 0.6, -1, 0
    label_sets = [
        frozenset({"a"}),
        frozenset({"a", "b"}),
        frozenset({"b"}),
        frozenset({"c"}),
        frozenset(),
    ]
    ranker = DenseRanker("hand", vectors)
    (votes,) = ranker_votes(ranker, label_sets, np.array([0]), k=4)
    # weights 0.8 + 0.6 + 0 (unlabelled, cosine 0) ; c is dissimilar and has no say
    assert [lab for lab, _ in votes] == ["b", "a"]
    assert [s for _, s in votes] == pytest.approx([1.0, 0.8 / 1.4])
    (two,) = ranker_votes(ranker, label_sets, np.array([0]), k=1)
    assert two == [("a", 1.0), ("b", 1.0)]


# -- through `lookalike eval retrieval` --------------------------------------------------------
def _eval(*args):
    return CliRunner().invoke(app, ["eval", "retrieval", *[str(a) for a in args]])


def test_eval_retrieval_labels_csv_matches_suggest(photos_dir, tiny_store, tmp_path):
    from lookalike.engine import Engine

    def true_labels(path: str) -> tuple[str, ...]:  # folder, plus "png" for PNG files
        return (path.split("/")[0],) + (("png",) if path.endswith(".png") else ())

    engine = Engine.open(tiny_store)
    try:
        records = list(engine.store.db.records())
        rows = [f"{r.path},{'|'.join(true_labels(r.path))}" for r in records[:-2]]
        csv_file = tmp_path / "labels.csv"
        csv_file.write_text("path,labels\n" + "\n".join(rows) + "\n")
        # what `lookalike suggest` would say for each image, itself left out
        listed = {r.path: frozenset(true_labels(r.path)) for r in records[:-2]}
        truth, votes = [], []
        for rec in records:
            if rec.path not in listed:
                continue
            hits = engine.search_id(rec.id, 10)
            truth.append(listed[rec.path])
            votes.append(vote([(listed.get(h.path, ()), h.score) for h in hits], top=10))
    finally:
        engine.close()
    expected = suggestion_scores(truth, votes)

    result = _eval(photos_dir, "--store", tiny_store, "--labels", csv_file, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == len(records) - 2 and report["images"] == len(records)
    assert report["labels_source"] == str(csv_file.resolve())
    assert report["labels"]["png"] == sum(1 for p in listed if p.endswith(".png"))
    methods = report["methods"]
    assert list(methods) == ["lookalike", "raw_pixels", "phash"]
    assert list(methods["lookalike"]) == list(LABEL_KEYS)
    assert methods["lookalike"] == pytest.approx(expected)
    raw = methods["raw_pixels"]
    assert all(0 <= raw[key] <= 1 for key in LABEL_KEYS)
    assert set(methods["phash"].values()) == {None}

    bad = tmp_path / "bad.csv"
    bad.write_text("path,labels\na/x.jpg,one,two\n")
    result = _eval(photos_dir, "--store", tiny_store, "--labels", bad)
    assert result.exit_code == 1 and "bad.csv, line 2" in result.stderr
    none = tmp_path / "none.csv"
    none.write_text("elsewhere/x.jpg,one\n")
    result = _eval(photos_dir, "--store", tiny_store, "--labels", none)
    assert result.exit_code == 1 and "no image of the store has a label" in result.stderr


def test_eval_retrieval_folder_labels_report_label_figures(photos_dir, tiny_store):
    result = _eval(photos_dir, "--store", tiny_store, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["labels_source"] == "folders"
    for name in ("lookalike", "raw_pixels"):
        scores = report["methods"][name]
        # one label per image: p@3 is a third of r@3, the vote's top-3 accuracy
        assert scores["label_p@3"] == pytest.approx(scores["label_r@3"] / 3)
        assert 0 < scores["label_micro_f1"] <= 1 and 0 < scores["label_threshold"] <= 1
