"""`lookalike eval` end to end on tiny generated sets, and the bench scripts in smoke form."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_photo  # noqa: E402
from typer.testing import CliRunner

from lookalike.cli import app
from lookalike.evaluation.run import TRANSFORMS, label_of

ROOT = Path(__file__).resolve().parents[2]
RETRIEVAL_KEYS = ["p@1", "p@10", "map@10", "knn_top1", "knn_top3"]
LABEL_KEYS = ["label_p@3", "label_r@3", "label_micro_f1", "label_threshold"]  # issue 8
NEARDUP_KEYS = [
    *("recall@3", "mrr", "pair_precision", "pair_recall", "pair_f1"),
    *("recall@p0.95", "dedupe_recall@p0.95"),
]
METHODS = ["lookalike", "raw_pixels", "phash"]
TINY_JSON = json.dumps(TINY.replace(epochs=2).to_dict())
HAS_DEDUPE = importlib.util.find_spec("lookalike.dedupe.grouping") is not None


def invoke(*args: str):
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def neardup_set(tmp_path_factory) -> tuple[Path, Path]:
    """4 groups of 3 (original, JPEG q15, centre crop 85 %) and 4 distractors, with groups.csv."""
    import numpy as np

    root = tmp_path_factory.mktemp("neardup")
    photos = root / "photos"
    photos.mkdir()
    rows = []
    for g in range(4):
        img = make_photo(np.random.default_rng(100 + g), (64, 48))
        img.save(photos / f"g{g}_original.jpg", quality=92)
        img.save(photos / f"g{g}_jpeg.jpg", quality=15)
        img.crop((5, 4, 59, 44)).save(photos / f"g{g}_crop.jpg", quality=92)
        rows += [(f"g{g}_{v}.jpg", f"g{g}", v) for v in ("original", "jpeg", "crop")]
    for d in range(4):
        make_photo(np.random.default_rng(200 + d), (64, 48)).save(photos / f"d{d}.jpg")
        rows.append((f"d{d}.jpg", f"d{d}", "distractor"))
    groups = root / "groups.csv"
    with open(groups, "w", newline="") as fh:
        csv.writer(fh).writerows([("file", "group_id", "variant"), *rows])
    return photos, groups


def test_retrieval_matches_the_stores_own_search(photos_dir, tiny_store):
    report = invoke("retrieval", str(photos_dir), "--store", str(tiny_store), "--json")
    assert report["task"] == "retrieval" and report["k"] == 10
    assert report["n"] == report["images"] == 30
    assert report["labels"] == {"a": 15, "b": 15}
    assert list(report["methods"]) == METHODS
    for scores in report["methods"].values():
        assert list(scores) == RETRIEVAL_KEYS + LABEL_KEYS
        assert all(0.0 <= v <= 1.0 for v in scores.values() if v is not None)  # phash: no vote
    assert any("pretrained CNN" in note for note in report["notes"])

    from lookalike.engine import Engine

    engine = Engine.open(tiny_store)
    try:
        p1 = p10 = 0.0
        for rec in list(engine.store.db.records()):
            hits = engine.search_id(rec.id, 10)
            same = [label_of(h.path) == label_of(rec.path) for h in hits]
            p1 += same[0]
            p10 += sum(same) / 10
    finally:
        engine.close()
    assert report["methods"]["lookalike"]["p@1"] == pytest.approx(p1 / 30, abs=1e-12)
    assert report["methods"]["lookalike"]["p@10"] == pytest.approx(p10 / 30, abs=1e-12)


def test_neardup_trains_a_temporary_store(neardup_set):
    photos, groups = neardup_set
    report = invoke(
        "neardup", str(photos), "--groups", str(groups), "--json", "--model-config", TINY_JSON
    )
    assert report["trained"] is True and report["store"] is None
    assert (report["n"], report["images"], report["groups"]) == (12, 16, 4)
    assert report["true_pairs"] == 12 and report["mrr_depth"] == 15
    assert list(report["methods"]) == METHODS
    for name, scores in report["methods"].items():
        assert list(scores) == NEARDUP_KEYS
        for key, value in scores.items():
            if value is None:  # only lookalike's dedupe pairs, while dedupe does not exist
                assert name == "lookalike" and key.startswith("pair_") and not HAS_DEDUPE
            else:
                assert 0.0 <= value <= 1.0
    # the sweep joins pairs as dedupe does, so dedupe's own operating point is within its reach
    look = report["methods"]["lookalike"]
    if HAS_DEDUPE and look["pair_precision"] >= 0.95:
        assert look["recall@p0.95"] >= look["pair_recall"]
    # pHash finds JPEG re-encodes and the crop's group-mates easily on these flat drawings
    assert report["methods"]["phash"]["recall@3"] > 0.5
    if HAS_DEDUPE:  # groups.csv has variants: the dedupe groups that keep their original
        kept = report["kept_original"]
        assert 0 <= kept["kept"] <= kept["of"] <= 4
    assert "groups" not in report["details"]["lookalike"]  # the groups stay out of the report


def test_neardup_transforms_with_a_stores_model(photos_dir, tiny_store):
    report = invoke(
        "neardup",
        str(photos_dir),
        "--transforms",
        "--sample",
        "3",
        "--store",
        str(tiny_store),
        "--json",
    )
    assert report["task"] == "transforms" and report["trained"] is False
    assert (report["sample"], report["n"], report["images"]) == (3, 24, 27)
    for scores in report["methods"].values():
        assert list(scores["by_transform"]) == list(TRANSFORMS)
        assert 0.0 <= scores["recall@1"] <= 1.0
    # a JPEG re-encode of a flat drawing keeps its pHash and its thumbnail
    assert report["methods"]["phash"]["by_transform"]["jpeg_q30"] == 1.0
    assert report["methods"]["raw_pixels"]["by_transform"]["jpeg_q30"] == 1.0


def test_neardup_table_and_flag_errors(neardup_set, photos_dir, tiny_store):
    photos, groups = neardup_set
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "neardup", str(photos)])
    assert result.exit_code == 2 and "--groups" in result.output
    result = runner.invoke(
        app, ["eval", "neardup", str(photos), "--groups", str(groups), "--store", str(tiny_store)]
    )
    assert result.exit_code == 1 and "not" in result.output  # the store indexes another folder
    result = runner.invoke(app, ["eval", "retrieval", str(photos_dir), "--store", str(tiny_store)])
    assert result.exit_code == 0, result.output
    assert "lookalike" in result.stdout and "raw_pixels" in result.stdout


def test_transforms_refuse_bad_input_in_one_line(tmp_path):
    from lookalike.errors import InvalidArgumentError
    from lookalike.evaluation.transforms import evaluate_transforms

    rng = np.random.default_rng(0)
    for name, count in (("one", 1), ("two", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            make_photo(rng).save(tmp_path / name / f"{i}.png")
    for folder, message in (("nope", "photos folder not found"), ("one", "need at least 2")):
        result = CliRunner().invoke(
            app, ["eval", "neardup", "--transforms", str(tmp_path / folder)]
        )
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    with pytest.raises(InvalidArgumentError, match="sample must be at least 1"):
        evaluate_transforms(tmp_path / "two", sample=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # nothing written


# -- benchmark scripts, smoke configuration ---------------------------------------------------
def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_bench_index_smoke(tmp_path, photos_dir):
    out = tmp_path / "index.json"
    run_script(
        "scripts/bench_index.py",
        "--source",
        str(photos_dir),
        "--scratch",
        str(tmp_path / "scratch"),
        "--sizes",
        "40",
        "--tiny",
        "--epochs",
        "1",
        "--no-imagededup",
        "--runs",
        "1",
        "--json",
        str(out),
    )
    data = json.loads(out.read_text())
    row = data["sizes"][0]
    assert row["images"] == 40
    for key in ("decode_images_per_s", "embed_images_per_s", "train_images_per_s_epoch"):
        assert row[key] > 0
    assert row["peak_rss_mb"] > 0 and row["store_bytes_per_image"] > 0
    assert data["peers"][0]["phash_images_per_s"] > 0


@pytest.mark.slow
def test_bench_query_smoke(tmp_path, photos_dir):
    out = tmp_path / "query.json"
    run_script(
        "scripts/bench_query.py",
        "--source",
        str(photos_dir),
        "--scratch",
        str(tmp_path / "scratch"),
        "--sizes",
        "40",
        "--tiny",
        "--queries",
        "10",
        "--vectors",
        "3000",
        "--distributions",
        "gaussian",
        "--nq",
        "50",
        "--runs",
        "1",
        "--json",
        str(out),
    )
    data = json.loads(out.read_text())
    assert data["latency"][0]["p50_ms"] > 0
    kinds = {row["index"] for row in data["knn"]}
    assert {"flat", "ivf"} <= kinds
    assert all(row["recall@10"] == 1.0 for row in data["knn"] if row["index"] == "flat")


@pytest.mark.slow
def test_bench_train_smoke(tmp_path, photos_dir):
    out = tmp_path / "train.json"
    tiny = json.dumps(
        {
            "image_size": 32,
            "filters": [8, 16, 16, 16],
            "code_channels": 4,
            "embedding_dim": 16,
            "pooled_levels": [2, 3, 4],
            "mask_patch": 8,
            "epochs": 1,
            "batch_size": 16,
        }
    )
    result = run_script(
        "scripts/bench_train.py",
        "--photos",
        str(photos_dir),
        "--scratch",
        str(tmp_path),
        "--runs",
        "1",
        "--variant",
        f"tiny={tiny}",
        "--json",
        str(out),
    )
    (run,) = json.loads(out.read_text())["tiny"]
    assert run["epochs_run"] == run["epochs_planned"] == 1 and run["images"] == 30
    assert run["train_seconds"] > 0 and run["embed_images_per_s"] > 0
    assert "| tiny |" in result.stdout
    assert not list(tmp_path.glob("store-*"))  # the scratch stores are removed
