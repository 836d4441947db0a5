"""Labels (issue 8): folder and CSV sources, re-indexing, edits without re-embedding, the vote,
and `lookalike suggest`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import PHOTO_SEEDS, photo_name, write_photo
from typer.testing import CliRunner

from lookalike.cli import app
from lookalike.config import IndexOptions
from lookalike.indexer import index_folder
from lookalike.labels import LabelsFileError, folder_label, read_labels_csv, split_labels, vote
from lookalike.store import Store

N = len(PHOTO_SEEDS)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def labels_by_path(store: Path) -> dict[str, tuple[str, ...]]:
    with Store.open(store) as st:
        return {rec.path: rec.labels for rec in st.db.records()}


def snapshot(store: Path) -> tuple[int, dict[int, bytes]]:
    """The table's generation and every embedding blob: what a label change must not touch."""
    with Store.open(store) as st:
        generation = st.db.generation
    conn = sqlite3.connect(store / "images.sqlite")
    try:
        blobs = dict(conn.execute("SELECT id, embedding FROM images").fetchall())
    finally:
        conn.close()
    return generation, blobs


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- sources ---------------------------------------------------------------------------------
def test_folder_labels_label_every_row_by_its_first_folder(store_copy):
    photos, store = store_copy
    write_photo(photos / "c" / "deep" / "nested.png", 7100)
    write_photo(photos / "top.png", 7101)
    report = index_folder(photos, store, options=IndexOptions(labels="folders"))
    assert report.added == 2 and not report.trained
    labels = labels_by_path(store)
    assert len(labels) == N + 2
    for path, labs in labels.items():
        expected = () if path == "top.png" else (path.split("/")[0],)
        assert labs == expected, path
    assert labels["c/deep/nested.png"] == ("c",)
    with Store.open(store) as st:
        assert st.info["labels_source"] == "folders"


def test_folder_label_of_paths():
    assert folder_label("beach/x.jpg") == ("beach",)
    assert folder_label("beach/2020/x.jpg") == ("beach",)
    assert folder_label("x.jpg") == ()
    assert folder_label("@uploads/x.jpg") == ()
    assert split_labels(" beach |sunset||beach ") == ("beach", "sunset")


def test_read_csv_multi_label_header_and_blank_lines(tmp_path):
    csv_file = write_csv(
        tmp_path / "l.csv",
        "\ufeffPath,Labels\r\n"
        "a/x.jpg,beach|sunset\r\n"
        "\r\n"
        "./b/y.png, city \r\n"
        '"c/with, comma.jpg","night | city"\r\n'
        "d/none.jpg,\r\n",
    )
    assert read_labels_csv(csv_file) == {
        "a/x.jpg": ("beach", "sunset"),
        "b/y.png": ("city",),
        "c/with, comma.jpg": ("night", "city"),
        "d/none.jpg": (),
    }
    # the header is optional
    bare = write_csv(tmp_path / "bare.csv", "a/x.jpg,beach\n")
    assert read_labels_csv(bare) == {"a/x.jpg": ("beach",)}


def test_csv_labels_are_stored_multi_label(store_copy, tmp_path):
    photos, store = store_copy
    p0, p1, p2 = photo_name(0), photo_name(1), photo_name(2)
    csv_file = write_csv(
        tmp_path / "labels.csv",
        f"path,labels\n{p0},beach|sunset\n./{p1},city\n{p2},\nnot/in/store.jpg,ghost\n",
    )
    index_folder(photos, store, options=IndexOptions(labels=str(csv_file)))
    labels = labels_by_path(store)
    assert labels[p0] == ("beach", "sunset")
    assert labels[p1] == ("city",)
    assert labels[p2] == ()
    assert sum(1 for labs in labels.values() if labs) == 2  # unlisted rows: no label
    assert "ghost" not in {lab for labs in labels.values() for lab in labs}
    with Store.open(store) as st:
        assert st.info["labels_source"] == str(csv_file.resolve())


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("path,labels\na/x.jpg,beach\na/y.jpg,beach,extra\n", 3),
        ("a/x.jpg,beach\n\njust-a-path.jpg\n", 3),
        ("path,labels\n,beach\n", 2),
    ],
)
def test_malformed_csv_row_names_its_line(tmp_path, text, line):
    csv_file = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(LabelsFileError, match=rf"bad\.csv, line {line}:"):
        read_labels_csv(csv_file)


def test_malformed_csv_fails_before_any_indexing(store_copy, tmp_path):
    photos, store = store_copy
    bad = write_csv(tmp_path / "bad.csv", "path,labels\na/photo_000.png,x\nbroken,row,here\n")
    write_photo(photos / "a" / "waiting.jpg", 7200)  # would be added by a real run
    before = snapshot(store)
    info_before = (store / "info.json").read_bytes()
    with pytest.raises(LabelsFileError, match="line 3"):
        index_folder(photos, store, options=IndexOptions(labels=str(bad)))
    assert snapshot(store) == before
    assert (store / "info.json").read_bytes() == info_before
    assert set(labels_by_path(store).values()) == {()}
    # a new store is not even created
    fresh = tmp_path / "fresh"
    with pytest.raises(LabelsFileError):
        index_folder(photos, fresh, options=IndexOptions(labels=str(bad)))
    assert not fresh.exists()
    # the CLI: one line naming the file and line, exit 1
    result = run("index", photos, "--store", store, "--labels", bad)
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad.csv, line 3" in lines[0], result.stderr
    missing = run("index", photos, "--store", store, "--labels", tmp_path / "nope.csv")
    assert missing.exit_code == 1 and "nope.csv" in missing.stderr
    assert snapshot(store) == before


# -- incremental re-index --------------------------------------------------------------------
def test_labels_follow_incremental_reindex(store_copy):
    photos, store = store_copy
    index_folder(photos, store, options=IndexOptions(labels="folders"))
    write_photo(photos / "a" / "later.jpg", 7300)
    write_photo(photos / "new_folder" / "later.png", 7301)
    changed = photos / photo_name(3)  # b/...: new bytes, same path
    write_photo(changed, 7302)
    report = index_folder(photos, store)  # no labels option: the store remembers its source
    assert (report.added, report.updated) == (2, 1)
    labels = labels_by_path(store)
    assert labels["a/later.jpg"] == ("a",)
    assert labels["new_folder/later.png"] == ("new_folder",)
    assert labels[photo_name(3)] == ("b",)
    assert all(labs == (p.split("/")[0],) for p, labs in labels.items())


def test_csv_source_is_read_again_on_reindex(store_copy, tmp_path):
    photos, store = store_copy
    p0, p1 = photo_name(0), photo_name(1)
    csv_file = write_csv(tmp_path / "labels.csv", f"{p0},beach\n")
    index_folder(photos, store, options=IndexOptions(labels=str(csv_file)))
    write_photo(photos / "a" / "later.jpg", 7400)
    write_csv(csv_file, f"{p0},beach|sunset\n{p1},city\na/later.jpg,forest\n")
    index_folder(photos, store)
    labels = labels_by_path(store)
    assert (labels[p0], labels[p1], labels["a/later.jpg"]) == (
        ("beach", "sunset"),
        ("city",),
        ("forest",),
    )
    csv_file.unlink()  # a vanished source leaves the labels as they are
    index_folder(photos, store)
    assert labels_by_path(store) == labels


# -- changes without re-embedding ------------------------------------------------------------
def test_labels_set_and_import_do_not_reembed(store_copy, tmp_path):
    photos, store = store_copy
    index_folder(photos, store, options=IndexOptions(labels="folders"))
    before = snapshot(store)
    p0, p1, p2 = photo_name(0), photo_name(1), photo_name(2)

    result = run("labels", "set", p0, p1, "--store", store, "--labels", "beach|sunset")
    assert result.exit_code == 0, result.output
    assert "2 images" in result.stdout
    labels = labels_by_path(store)
    assert labels[p0] == labels[p1] == ("beach", "sunset")
    assert snapshot(store) == before

    result = run("labels", "set", "no/such.jpg", p2, "--store", store, "--labels", "x")
    assert result.exit_code == 1 and "no/such.jpg" in result.stderr
    assert labels_by_path(store)[p2] == ("a",)  # nothing set when a path is unknown

    result = run("labels", "set", p2, "--store", store, "--labels", "")
    assert result.exit_code == 0 and labels_by_path(store)[p2] == ()

    csv_file = write_csv(tmp_path / "more.csv", f"path,labels\n{p1},city|night\n")
    result = run("labels", "import", csv_file, "--store", store)
    assert result.exit_code == 0, result.output
    assert labels_by_path(store)[p1] == ("city", "night")
    assert snapshot(store) == before
    with Store.open(store) as st:
        assert st.info["labels_source"] == str(csv_file.resolve())

    bad = write_csv(tmp_path / "bad.csv", f"{p1},x,y\n")
    result = run("labels", "import", bad, "--store", store)
    assert result.exit_code == 1 and "bad.csv, line 1" in result.stderr
    assert labels_by_path(store)[p1] == ("city", "night")

    result = run("labels", "show", "--store", store, "--json")
    shown = json.loads(result.stdout)
    assert shown["labels"]["city"] == 1 and shown["labels"]["beach"] == 1
    assert shown["unlabelled"] == 1
    assert snapshot(store) == before


def test_labels_set_survives_reindex_of_a_folder_labelled_store(store_copy):
    photos, store = store_copy
    index_folder(photos, store, options=IndexOptions(labels="folders"))
    p0 = photo_name(0)
    assert run("labels", "set", p0, "--store", store, "--labels", "a|sunset").exit_code == 0
    write_photo(photos / "b" / "later.jpg", 7500)
    index_folder(photos, store)
    labels = labels_by_path(store)
    assert labels[p0] == ("a", "sunset")  # the edit stays
    assert labels["b/later.jpg"] == ("b",)  # new rows still get their folder
    # asking for folder labels again re-applies them everywhere
    index_folder(photos, store, options=IndexOptions(labels="folders"))
    assert labels_by_path(store)[p0] == ("a",)


# -- the vote --------------------------------------------------------------------------------
def test_vote_hand_computed():
    neighbours = [
        (("beach", "sunset"), 0.8),
        (("beach",), 0.4),
        ((), 0.2),  # unlabelled: weighs in the total, votes for nothing
        (("city",), -0.5),  # dissimilar: ignored
        (("sunset",), 0.4),
        (("forest",), 0.0),  # weight 0: ignored
    ]
    # total weight 1.8; beach 0.8 + 0.4 = 1.2, sunset 0.8 + 0.4 = 1.2: a tie, by name
    ranked = vote(neighbours, top=3)
    assert [label for label, _ in ranked] == ["beach", "sunset"]
    assert [s for _, s in ranked] == pytest.approx([1.2 / 1.8, 1.2 / 1.8])
    assert vote(neighbours, top=1) == [("beach", pytest.approx(2 / 3))]


def test_vote_ties_order_and_edges():
    ranked = vote([(("b",), 0.5), (("a",), 0.5), (("c",), 0.25)], top=5)
    assert ranked == [("a", 0.4), ("b", 0.4), ("c", 0.2)]
    assert vote([(("x", "y"), 0.3)] * 4) == [("x", 1.0), ("y", 1.0)]
    assert vote([(("x",), -0.2), (("y",), -0.9)]) == []
    assert vote([]) == []
    assert vote([((), 0.9)]) == []


# -- lookalike suggest -----------------------------------------------------------------------
@pytest.fixture
def labelled_store(store_copy) -> tuple[Path, Path]:
    photos, store = store_copy
    index_folder(photos, store, options=IndexOptions(labels="folders"))
    return photos, store


def test_suggest_json_shape(labelled_store):
    photos, store = labelled_store
    query = photos / photo_name(4)
    result = run(
        "suggest", query, photos / "b", "--store", store, "-k", "5", "--top", "2", "--json"
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(ln) for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 + sum(1 for s in PHOTO_SEEDS if s % 2 == 1)
    first = lines[0]
    assert set(first) == {"query", "labels", "neighbours"}
    assert first["query"] == str(query)
    assert 1 <= len(first["labels"]) <= 2
    for lab in first["labels"]:
        assert set(lab) == {"label", "score"} and 0 <= lab["score"] <= 1
    assert len(first["neighbours"]) == 5
    assert first["neighbours"][0]["path"] == photo_name(4)  # itself, first
    assert first["neighbours"][0]["labels"] == ["a"]
    assert {"id", "path", "score", "labels"} <= set(first["neighbours"][0])
    expected = vote(((h["labels"], h["score"]) for h in first["neighbours"]), 2)
    assert [(lab["label"], lab["score"]) for lab in first["labels"]] == [
        (lab, pytest.approx(s, abs=1e-6)) for lab, s in expected
    ]
    assert all(line["query"].startswith(str(photos / "b")) for line in lines[1:])

    text = run("suggest", query, "--store", store, "--top", "1")
    assert text.exit_code == 0
    assert text.stdout.startswith(f"{query}: {first['labels'][0]['label']} (")


def test_suggest_errors_as_for_search(labelled_store, tmp_path):
    photos, store = labelled_store
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    missing = tmp_path / "missing.jpg"
    good = photos / photo_name(5)
    for cmd in ("search", "suggest"):
        result = run(cmd, bad, "--store", store, "--json")
        assert result.exit_code == 1 and result.stdout.strip() == ""
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and str(bad) in lines[0], result.stderr
    same = [run(cmd, missing, good, "--store", store, "--json") for cmd in ("search", "suggest")]
    assert same[0].exit_code == same[1].exit_code == 1
    assert same[0].stderr == same[1].stderr  # the same one line for the same bad file
    assert len(same[1].stdout.strip().splitlines()) == 1  # the good query is still answered
    for cmd in ("search", "suggest"):
        result = run(cmd, good, "--store", tmp_path / "no-store")
        assert result.exit_code == 1
        assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1
    result = run("suggest", good, "--store", store, "--top", "0")
    assert result.exit_code == 2  # a usage error, as for search -k 0
