"""scripts/eval_suggest.py (issue 8's cross-validation) in smoke form on a tiny labelled folder."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import write_photo

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_suggest.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("eval_suggest", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stratified_folds_are_seeded_and_balanced(script):
    labels = ["a"] * 7 + ["b"] * 5 + ["c"] * 3
    fold = script.stratified_folds(labels, 3, seed=0)
    assert np.array_equal(fold, script.stratified_folds(labels, 3, seed=0))
    assert not np.array_equal(fold, script.stratified_folds(labels, 3, seed=1))
    assert sorted(Counter(fold.tolist()).values()) == [5, 5, 5]
    for label in "abc":  # each label spread as evenly as its count allows
        per = Counter(int(f) for f, lab in zip(fold, labels) if lab == label)
        assert max(per.values()) - min(per.values()) <= 1 and len(per) == 3


def test_hits_and_summary(script):
    assert script.hits([["a", "b"], ["b", "a", "c"], []], ["a", "c", "d"]) == {
        "top1": pytest.approx(1 / 3),
        "top3": pytest.approx(2 / 3),
    }
    folds = [{"scores": {m: {"top1": t, "top3": 1.0} for m in script.METHODS}} for t in (0.5, 0.7)]
    summary = script.summarise(folds)
    assert summary["lookalike"]["top1"]["mean"] == pytest.approx(0.6)
    assert summary["lookalike"]["top1"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summary["majority"]["top3"] == {"mean": 1.0, "std": 0.0}


@pytest.mark.slow
def test_script_smoke(script, tmp_path, capsys):
    photos = tmp_path / "photos"
    for n, label in enumerate(["red", "green", "blue"] * 6):
        write_photo(photos / label / f"p{n:02d}.jpg", 9000 + n)
    write_photo(photos / "top_level.jpg", 9100)  # unlabelled: left out
    out_json = tmp_path / "cv.json"
    args = ["--photos", str(photos), "--folds", "3", "--epochs", "1", "--tiny", "-k", "5"]
    assert script.main([*args, "--json", str(out_json)]) == 0
    stdout = capsys.readouterr().out.splitlines()
    table = [line for line in stdout if line.startswith("|")]
    assert len(table) == 2 + 3 and "18 images, 3-fold CV" in table[0]
    report = json.loads(stdout[-1])
    assert report == json.loads(out_json.read_text())
    assert report["images"] == 18 and report["folds"] == 3 and report["epochs"] == 1
    assert report["labels"] == {"blue": 6, "green": 6, "red": 6}
    assert [f["test"] for f in report["per_fold"]] == [6, 6, 6]
    assert all(f["indexed"] == 12 and f["skipped"] == 0 for f in report["per_fold"])
    for method in ("lookalike", "raw_pixels", "majority"):
        for metric in ("top1", "top3"):
            cell = report["summary"][method][metric]
            assert 0 <= cell["mean"] <= 1 and cell["std"] >= 0
    # three balanced labels: the majority class is right a third of the time, its top 3 always
    assert report["summary"]["majority"]["top1"]["mean"] == pytest.approx(1 / 3)
    assert report["summary"]["majority"]["top3"]["mean"] == pytest.approx(1.0)
