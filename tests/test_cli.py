"""Tests for lookalike.cli through typer's CliRunner: JSON output and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import PHOTO_SEEDS, photo_name, write_photo
from typer.testing import CliRunner

from lookalike.cli import app

N = len(PHOTO_SEEDS)
INDEX_KEYS = {"images", "added", "updated", "removed", "unchanged", "failed", "trained", "seconds"}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run(runner: CliRunner, *args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_one_line_error(result, *needles: str) -> str:
    """Non-zero exit, no traceback, and exactly one non-empty line on stderr."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.stdout.strip() == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- index


def test_index_json_prints_one_object(runner, store_copy):
    photos, store = store_copy
    write_photo(photos / "a" / "cli_new.jpg", 7000)
    (photos / photo_name(12)).unlink()
    result = run(runner, "index", photos, "--store", store, "--json")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert INDEX_KEYS <= set(report)
    assert report["images"] == N
    assert (report["added"], report["updated"], report["removed"]) == (1, 0, 1)
    assert report["unchanged"] == N - 1
    assert report["failed"] == [] and report["trained"] is False
    assert isinstance(report["seconds"], float) and report["seconds"] >= 0
    assert list(report["phase_seconds"])[:1] == ["scan"] and "embed" in report["phase_seconds"]


def test_index_json_lists_failed_files(runner, store_copy):
    photos, store = store_copy
    (photos / "broken.jpg").write_text("not a jpeg")
    result = run(runner, "index", photos, "--store", store, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["failed"]) == 1
    failed = report["failed"][0]
    assert Path(failed["path"]).name == "broken.jpg" and failed["error"]


def test_index_text_summary(runner, store_copy):
    photos, store = store_copy
    result = run(runner, "index", photos, "--store", store)
    assert result.exit_code == 0, result.output
    assert f"{N} images indexed" in result.stdout and f"{N} unchanged" in result.stdout


def test_index_of_a_missing_folder_is_one_line(runner, tmp_path):
    result = run(runner, "index", tmp_path / "no_photos", "--store", tmp_path / "store", "--json")
    assert_one_line_error(result, "error:", "not found")


# --------------------------------------------------------------------------- search


def test_search_file_json(runner, tiny_store, photos_dir):
    query = photos_dir / photo_name(3)
    result = run(runner, "search", query, "--store", tiny_store, "--json", "-k", "4")
    assert result.exit_code == 0, result.output
    lines = _json_lines(result.stdout)
    assert len(lines) == 1
    (line,) = lines
    assert line["query"] == str(query)
    assert len(line["results"]) == 4
    for hit in line["results"]:
        assert set(hit) >= {"id", "path", "score"}
        assert isinstance(hit["id"], int) and isinstance(hit["score"], float)
    assert line["results"][0]["path"] == photo_name(3)
    assert line["results"][0]["score"] >= 0.99


def test_search_several_files_one_line_each(runner, tiny_store, photos_dir):
    queries = [photos_dir / photo_name(s) for s in (0, 1, 2)]
    result = run(runner, "search", *queries, "--store", tiny_store, "--json", "-k", "2")
    assert result.exit_code == 0, result.output
    lines = _json_lines(result.stdout)
    assert [line["query"] for line in lines] == [str(q) for q in queries]
    assert [line["results"][0]["path"] for line in lines] == [photo_name(s) for s in (0, 1, 2)]


def test_search_folder(runner, tiny_store, photos_dir):
    result = run(runner, "search", photos_dir / "a", "--store", tiny_store, "--json", "-k", "1")
    assert result.exit_code == 0, result.output
    lines = _json_lines(result.stdout)
    in_a = sorted(photo_name(s) for s in PHOTO_SEEDS if photo_name(s).startswith("a/"))
    assert len(lines) == len(in_a)
    for line in lines:
        rel = Path(line["query"]).relative_to(photos_dir).as_posix()
        assert line["results"][0]["path"] == rel


def test_search_table_output(runner, tiny_store, photos_dir):
    result = run(runner, "search", photos_dir / photo_name(5), "--store", tiny_store, "-k", "3")
    assert result.exit_code == 0, result.output
    assert photo_name(5) in result.stdout


def test_search_missing_query_file_is_one_line(runner, tiny_store, tmp_path):
    missing = tmp_path / "nope.jpg"
    result = run(runner, "search", missing, "--store", tiny_store, "--json")
    assert_one_line_error(result, "nope.jpg")


def test_search_query_that_is_not_an_image_is_one_line(runner, tiny_store, tmp_path):
    query = tmp_path / "fake.jpg"
    query.write_text("hello, I am text")
    result = run(runner, "search", query, "--store", tiny_store, "--json")
    assert_one_line_error(result, "fake.jpg", "not an image")


def test_search_bad_query_among_good_ones(runner, tiny_store, photos_dir, tmp_path):
    bad = tmp_path / "fake.png"
    bad.write_bytes(b"")
    good = photos_dir / photo_name(1)
    result = run(runner, "search", bad, good, "--store", tiny_store, "--json")
    assert result.exit_code != 0  # some query failed
    assert "Traceback" not in result.output
    lines = _json_lines(result.stdout)
    assert [line["query"] for line in lines] == [str(good)]  # the good one was still answered
    assert "fake.png" in result.stderr


def test_search_missing_store_is_one_line(runner, photos_dir, tmp_path):
    result = run(runner, "search", photos_dir / photo_name(1), "--store", tmp_path / "none")
    assert_one_line_error(result, "error:", "no lookalike store")


# --------------------------------------------------------------------------- info


def test_info_json(runner, tiny_store):
    result = run(runner, "info", "--store", tiny_store, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == N
    assert data["embedding_dim"] == 16 and data["image_size"] == 32
    assert data["index_type"] == "flat" and data["metric"] == "cosine"
    assert data["format_version"] == 1
    assert data["val_loss"] is not None and data["disk_bytes"] > 0


def test_info_table(runner, tiny_store):
    result = run(runner, "info", "--store", tiny_store)
    assert result.exit_code == 0, result.output
    assert "images" in result.stdout and str(N) in result.stdout


def test_info_store_from_environment(runner, tiny_store):
    result = runner.invoke(app, ["info", "--json"], env={"LOOKALIKE_STORE": str(tiny_store)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == N


def test_info_missing_store_is_one_line(runner):
    result = run(runner, "info", "--store", "/nonexistent")
    assert_one_line_error(result, "error:", "/nonexistent")


@pytest.mark.parametrize("name", ["Photos [2019]", "x[/b]y", "[bold]store"])
def test_error_messages_are_printed_verbatim(runner, tmp_path, name):
    """Paths are not rich markup: brackets in them are printed as they are, not parsed."""
    missing = tmp_path / name
    result = runner.invoke(app, ["info", "--store", str(missing)])
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not crashed, f"{type(result.exception).__name__}: {result.exception}"
    assert_one_line_error(result, "error:", name)


def test_store_from_an_incompatible_version_is_one_line(runner, tmp_path, tiny_store, photos_dir):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    info = json.loads((store / "info.json").read_text())
    info["format_version"] = 999
    (store / "info.json").write_text(json.dumps(info))
    assert_one_line_error(run(runner, "info", "--store", store), "error:", "999")
    query = photos_dir / photo_name(1)
    assert_one_line_error(run(runner, "search", query, "--store", store), "error:", "999")
    assert_one_line_error(
        run(runner, "index", photos_dir, "--store", store, "--json"), "error:", "999"
    )


def test_help_lists_the_commands(runner):
    result = run(runner, "--help")
    assert result.exit_code == 0
    for command in ("index", "search", "info"):
        assert command in result.stdout


# --------------------------------------------------------------------------- everyday details


def test_version_and_short_help(runner):
    from lookalike import __version__

    result = run(runner, "--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"lookalike {__version__}"
    for args in (["-h"], ["search", "-h"], ["eval", "retrieval", "-h"], ["labels", "set", "-h"]):
        result = run(runner, *args)
        assert result.exit_code == 0, (args, result.output)
        assert "Usage" in result.stdout


def test_help_lists_the_choices_and_cuts_nothing(runner):
    result = runner.invoke(app, ["index", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert "auto|flat|ivf" in result.stdout
    assert "…" not in result.stdout, result.stdout  # rich cuts long words with an ellipsis
    assert "path,labels rows" in " ".join(result.stdout.split()).replace("│ ", "")


def test_a_bad_choice_is_refused_before_any_work(runner, tmp_path, photos_dir):
    result = run(runner, "index", photos_dir, "--store", tmp_path / "s", "--index-type", "hnsw")
    assert result.exit_code == 2 and "hnsw" in result.output
    assert not (tmp_path / "s").exists()


def test_info_prints_numbers_for_people_and_names_the_pictures(runner, tiny_store):
    import re

    result = run(runner, "info", "--store", tiny_store)
    assert result.exit_code == 0, result.output
    assert not re.search(r"\d\.\d{5}", result.stdout), result.stdout  # no 105.40000
    assert re.search(r"train_seconds\s+\S+\s+[\d.]+ (s|min)", result.stdout), result.stdout
    text = "".join(result.stdout.replace("│", " ").split())
    for name in ("loss_curve.png", "reconstructions.png"):
        assert name in text
    pictures = json.loads(run(runner, "info", "--store", tiny_store, "--json").stdout)["pictures"]
    assert sorted(Path(p).name for p in pictures) == ["loss_curve.png", "reconstructions.png"]
    assert all(Path(p).is_file() for p in pictures)


def test_search_table_shows_labels_like_json(runner, store_copy):
    photos, store = store_copy
    name = photo_name(4)
    assert run(runner, "labels", "set", name, "--store", store, "-l", "beach|sea").exit_code == 0
    table = run(runner, "search", photos / name, "--store", store, "-k", "2")
    assert table.exit_code == 0, table.output
    assert "labels" in table.stdout and "beach, sea" in table.stdout
    as_json = _json_lines(run(runner, "search", photos / name, "-s", store, "--json").stdout)
    assert as_json[0]["results"][0]["labels"] == ["beach", "sea"]


@pytest.mark.parametrize("command", ["search", "suggest"])
def test_query_errors_come_before_the_model_loads(
    runner, tiny_store, tmp_path, monkeypatch, command
):
    from lookalike import engine

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the queries were checked")

    monkeypatch.setattr(engine.Engine, "open", no_model)
    missing = tmp_path / "nope.jpg"
    assert_one_line_error(
        run(runner, command, missing, "--store", tiny_store), "error:", "nope.jpg"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    line = assert_one_line_error(run(runner, command, empty, "--store", tiny_store), "error:")
    assert "no images found" in line and "empty" in line


def test_index_ends_with_the_time_of_each_phase(runner, store_copy):
    photos, store = store_copy
    write_photo(photos / "a" / "phase_new.jpg", 7100)
    result = run(runner, "index", photos, "--store", store)
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("time:"))
    for phase in ("scan", "embed", "index"):
        assert f"{phase} " in line and " s" in line, line


def test_phase_times_count_the_set_up_for_the_next_stage():
    from lookalike.cli import phase_line
    from lookalike.cli_common import Phases

    phases = Phases()
    clock = iter([0.0, 1.0, 5.0, 6.0, 9.0, 9.5]).__next__
    import lookalike.cli_common as common

    real = common.time.perf_counter
    common.time.perf_counter = clock
    try:
        for stage in ("scan", "scan", "decode", "epoch 1/2", "epoch 2/2", "embed"):
            phases.see(stage if not stage.startswith("epoch") else "train")
    finally:
        common.time.perf_counter = real
    seconds = phases.seconds()
    assert seconds == {"scan": 1.0, "decode": 4.0, "train": 4.0, "embed": 0.5}
    assert phase_line(seconds) == "time: scan 1.0 s, train 8.0 s, embed 0.5 s"


def test_evaluation_cli_does_not_import_the_main_cli():
    import subprocess
    import sys

    code = "import sys, lookalike.evaluation.cli; print('lookalike.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_missing_query_among_good_ones(runner, tiny_store, photos_dir, tmp_path):
    good = photos_dir / photo_name(2)
    result = run(runner, "search", tmp_path / "gone.jpg", good, "--store", tiny_store, "--json")
    assert result.exit_code == 1  # some query failed...
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and "gone.jpg" in errors[0]
    assert [line["query"] for line in _json_lines(result.stdout)] == [str(good)]  # ...not all
