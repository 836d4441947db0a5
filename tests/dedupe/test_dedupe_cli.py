"""`lookalike dedupe` end to end: planted near-duplicates, dry runs, moves, deletes, crashes."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import copy_store, photo_name, write_photo
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from lookalike.cli import app
from lookalike.dedupe import actions as dedupe_actions
from lookalike.dedupe.actions import apply_actions, pending, plan_actions
from lookalike.dedupe.grouping import find_groups
from lookalike.store import Store

runner = CliRunner()


def plant_duplicates(photos: Path) -> dict[str, str]:
    """Edited copies of five photos under dups/; returns {copy: original} (table paths).

    The crop is mild because the 3-epoch, 32-pixel test model is not crop-robust; the real
    model's crop recall is measured by scripts/bench_dedupe.py.
    """
    dups = photos / "dups"
    dups.mkdir()
    src = {k: Image.open(photos / photo_name(k)).convert("RGB") for k in (0, 1, 3, 7)}
    w, h = src[0].size
    src[0].resize((w // 2, h // 2), Image.Resampling.BILINEAR).save(dups / "half.png")
    src[1].save(dups / "q30.jpg", quality=30)
    ImageEnhance.Brightness(src[3]).enhance(1.2).save(dups / "bright.png")
    dx, dy = round(w * 0.05), round(h * 0.05)
    src[7].crop((dx, dy, w - dx, h - dy)).save(dups / "crop.png")
    shutil.copy2(photos / photo_name(4), dups / "copy.jpg")
    return {
        "dups/half.png": photo_name(0),
        "dups/q30.jpg": photo_name(1),
        "dups/bright.png": photo_name(3),
        "dups/crop.png": photo_name(7),
        "dups/copy.jpg": photo_name(4),
    }


@pytest.fixture(scope="module")
def dup_collection(tmp_path_factory, photos_dir, tiny_store):
    """photos_dir plus planted near-duplicates, indexed with tiny_store's model. Read-only."""
    from lookalike.indexer import index_folder

    photos, store = copy_store(photos_dir, tiny_store, tmp_path_factory.mktemp("dedupe"))
    planted = plant_duplicates(photos)
    report = index_folder(photos, store)
    assert report.added == len(planted) and not report.trained and not report.failed
    return photos, store, planted


@pytest.fixture
def collection(tmp_path, dup_collection):
    """A private copy of dup_collection, free to change: (photos, store, planted)."""
    src_photos, src_store, planted = dup_collection
    photos, store = copy_store(src_photos, src_store, tmp_path)
    with Store.open(store, photos=photos) as st:  # point the copy at its own photos
        st.save_info()
    return photos, store, planted


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def tree_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_state(store: Path):
    with Store.open(store) as st:
        return st.db.file_states(), len(st.index), (store / "info.json").read_text()


def dedupe(*args: str, ok: bool = True):
    result = runner.invoke(app, ["dedupe", *map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def as_pairs(groups) -> set[frozenset[str]]:
    return {frozenset(m.path for m in g.members) for g in groups}


# -- grouping with the real (tiny) model -------------------------------------------------------
def test_planted_duplicates_are_grouped_and_distinct_photos_are_not(dup_collection):
    _, store, planted = dup_collection
    with Store.open(store) as st:
        groups = find_groups(st)
    assert as_pairs(groups) == {frozenset(p) for p in planted.items()}


def test_json_is_deterministic_and_has_the_issue_shape(dup_collection):
    _, store, planted = dup_collection
    first = json.loads(dedupe("--store", store, "--json").stdout)
    second = json.loads(dedupe("--store", store, "--json").stdout)
    assert first == second
    # the issue's keys, plus the pHash evidence fused into the grouping
    assert set(first) == {"threshold", "phash_max", "groups"} and first["phash_max"] == 10
    assert len(first["groups"]) == len(planted)
    for g in first["groups"]:
        assert set(g) == {"keep", "reason", "members"} and g["reason"]
        assert g["members"][0]["path"] == g["keep"] and g["members"][0]["score"] == 1.0
        assert g["members"][0]["link"] == "kept"
        for m in g["members"]:
            assert {
                "id",
                "path",
                "score",
                "bytes",
                "width",
                "height",
                "phash_distance",
                "link",
            } <= set(m)
            assert set(m["quality"]) >= {"real_pixels", "detail", "jpeg_quality"}
            assert 0 <= m["phash_distance"] <= 64
            assert not Path(m["path"]).is_absolute()
        assert g["members"][0]["phash_distance"] == 0
        assert all(m["link"] in ("exact", "cosine", "phash") for m in g["members"][1:])
        exact = photo_name(4) in [m["path"] for m in g["members"]]
        assert (g["members"][1]["link"] == "exact") == exact
    # the original is kept over its half-size, re-encoded and cropped copies
    keeps = {g["keep"] for g in first["groups"]}
    assert {photo_name(0), photo_name(1), photo_name(7)} <= keeps
    by_keep = {g["keep"]: g for g in first["groups"]}
    assert by_keep[photo_name(0)]["members"][1]["width"] == 32  # the half-size copy
    assert by_keep[photo_name(0)]["members"][1]["score"] > first["threshold"]


def test_csv_and_html_reports(dup_collection, tmp_path):
    _, store, planted = dup_collection
    dedupe("--store", store, "--csv", tmp_path / "d.csv", "--html", tmp_path / "d.html")
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert len(rows) == 2 * len(planted)
    assert {r["group"] for r in rows} == {str(i) for i in range(1, len(planted) + 1)}
    assert sum(int(r["keep"]) for r in rows) == len(planted)
    page = (tmp_path / "d.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2 * len(planted)
    assert page.count("class='badge'>keep<") == len(planted)
    assert "http" not in page  # self-contained


# -- dry runs ----------------------------------------------------------------------------------
def test_dry_runs_change_nothing(collection, tmp_path):
    photos, store, planted = collection
    before = tree(photos), store_state(store)
    out = tmp_path / "moved"
    moved = dedupe("--store", store, "--move-to", out, "--keep", "oldest").stdout
    deleted = dedupe("--store", store, "--delete", "--keep", "oldest").stdout
    assert (tree(photos), store_state(store)) == before
    assert not out.exists()
    assert moved.count("would move ") == len(planted)
    assert deleted.count("would delete ") == len(planted)
    assert "nothing changed" in moved and "nothing changed" in deleted
    for copy in planted:  # the copies are newer than their originals
        assert f"would move {copy} -> {out / copy}" in moved


# -- acting ------------------------------------------------------------------------------------
def test_move_yes_moves_exactly_the_others_and_updates_the_store(collection, tmp_path):
    photos, store, planted = collection
    out = tmp_path / "moved"
    before = tree(photos)
    plan = json.loads(
        dedupe("--store", store, "--move-to", out, "--keep", "oldest", "--json").stdout
    )
    others = sorted(a["path"] for a in plan["actions"])
    assert others == sorted(planted)
    result = json.loads(
        dedupe("--store", store, "--move-to", out, "--keep", "oldest", "--yes", "--json").stdout
    )
    assert result["applied"]["removed"] == len(others)
    after = tree(photos)
    assert sorted(set(before) - set(after)) == others
    assert tree(out) == {p: before[p] for p in others}  # same bytes, same relative paths
    states, count, _ = store_state(store)
    assert count == len(states) == len(before) - len(others)
    assert not set(others) & set(states)
    assert json.loads(dedupe("--store", store, "--json").stdout)["groups"] == []
    assert not (store / dedupe_actions.JOURNAL).exists()


def test_undo_puts_back_every_moved_file_and_its_row(collection, tmp_path):
    photos, store, planted = collection
    out = tmp_path / "moved"
    before, states_before = tree(photos), store_state(store)[0]
    groups_before = json.loads(dedupe("--store", store, "--json").stdout)["groups"]
    moved = json.loads(dedupe("--store", store, "--move-to", out, "--yes", "--json").stdout)
    moved = sorted(f["path"] for f in moved["applied"]["files"] if f["status"] == "moved")
    assert len(moved) == len(planted) and tree(photos) != before
    result = json.loads(dedupe("--store", store, "--undo", "--json").stdout)
    assert sorted(result["restored"]) == moved and result["failed"] == []
    assert result["rows"] == len(planted)
    assert tree(photos) == before and tree(out) == {}
    states, count, _ = store_state(store)
    assert set(states) == set(states_before) and count == len(states)
    groups = json.loads(dedupe("--store", store, "--json").stdout)["groups"]
    assert [[m["path"] for m in g["members"]] for g in groups] == [
        [m["path"] for m in g["members"]] for g in groups_before
    ]
    again = dedupe("--store", store, "--undo", ok=False)  # nothing left to undo
    assert again.exit_code != 0 and "no dedupe clean-up to undo" in again.output


def test_delete_yes_moves_the_others_only_to_the_trash(collection):
    photos, store, planted = collection
    before = tree(photos)
    result = dedupe("--store", store, "--delete", "--keep", "oldest", "--yes")
    assert "--empty-trash" in result.output
    after = tree(photos)
    assert sorted(set(before) - set(after)) == sorted(planted)
    assert all(after[o] == before[o] for o in planted.values())
    states, count, _ = store_state(store)
    assert count == len(states) == len(after)
    [run] = (store / dedupe_actions.TRASH).iterdir()  # same bytes, same relative paths
    assert tree(run) == {p: before[p] for p in planted}


def test_deleted_photos_come_back_with_undo_until_the_trash_is_emptied(collection):
    photos, store, planted = collection
    before, states_before = tree(photos), store_state(store)[0]
    dedupe("--store", store, "--delete", "--keep", "oldest", "--yes")
    result = json.loads(dedupe("--store", store, "--undo", "--json").stdout)
    assert sorted(result["restored"]) == sorted(planted) and result["failed"] == []
    assert tree(photos) == before and set(store_state(store)[0]) == set(states_before)
    assert tree(store / dedupe_actions.TRASH) == {}

    dedupe("--store", store, "--delete", "--keep", "oldest", "--yes")
    dry = dedupe("--store", store, "--empty-trash").output
    assert f"{len(planted)} files" in dry and "nothing deleted" in dry
    assert len(tree(store / dedupe_actions.TRASH)) == len(planted)  # a dry run keeps them
    emptied = json.loads(dedupe("--store", store, "--empty-trash", "--yes", "--json").stdout)
    assert emptied["emptied"] and emptied["files"] == len(planted)
    assert tree(store / dedupe_actions.TRASH) == {}
    result = json.loads(dedupe("--store", store, "--undo", "--json").stdout)
    assert result["restored"] == [] and len(result["failed"]) == len(planted)
    assert all("trash was emptied" in f["reason"] for f in result["failed"])


def test_an_older_journal_of_deletes_finishes_into_the_trash(collection):
    photos, store, planted = collection
    with Store.open(store) as st:
        actions = plan_actions(st, find_groups(st, keep="oldest"), delete=True)
    older = [dict(asdict(a), dest=None) for a in actions]  # how deletes were journalled
    for a in older:
        del a["trash"]
    (store / dedupe_actions.JOURNAL).write_text(json.dumps({"version": 2, "actions": older}))
    dedupe("--store", store, "--yes")  # finishes the pending run
    [run] = (store / dedupe_actions.TRASH).iterdir()
    assert sorted(tree(run)) == sorted(planted)
    assert not any((photos / p).exists() for p in planted)


def test_delete_is_skipped_when_the_kept_file_changed(collection):
    photos, store, planted = collection
    kept = photos / planted["dups/q30.jpg"]
    kept.write_bytes(kept.read_bytes() + b"\0")  # edited after indexing
    result = dedupe("--store", store, "--delete", "--keep", "oldest", "--yes")
    assert (photos / "dups/q30.jpg").exists()
    assert "kept file" in result.output
    assert not (photos / "dups/half.png").exists()


def test_delete_never_removes_the_target_of_a_kept_link(collection):
    photos, store, _ = collection
    link = photos / "dups/copy.jpg"  # the exact copy becomes a link to its original
    link.unlink()
    link.symlink_to(Path("..") / photo_name(4))
    result = dedupe("--store", store, "--delete", "--keep", "shortest-path", "--yes")
    assert "dups/copy.jpg itself" in result.output  # the link is kept: its target stays
    assert (photos / photo_name(4)).is_file() and link.is_file()


def test_a_taken_destination_is_never_overwritten(collection, tmp_path):
    photos, store, planted = collection
    out = tmp_path / "moved"
    (out / "dups").mkdir(parents=True)
    (out / "dups/q30.jpg").write_bytes(b"someone else's file")
    data = (photos / "dups/q30.jpg").read_bytes()
    dedupe("--store", store, "--move-to", out, "--keep", "oldest", "--yes")
    assert (out / "dups/q30.jpg").read_bytes() == b"someone else's file"
    assert (out / "dups/q30-1.jpg").read_bytes() == data
    assert not (photos / "dups/q30.jpg").exists()


def test_an_interrupted_move_resumes(collection, tmp_path, monkeypatch):
    photos, store, planted = collection
    out = tmp_path / "moved"
    before = tree(photos)
    real_move, calls = dedupe_actions._move, []

    def dying_move(src, base, sha):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed between two files
        return real_move(src, base, sha)

    monkeypatch.setattr(dedupe_actions, "_move", dying_move)
    with Store.open(store) as st, pytest.raises(KeyboardInterrupt):
        apply_actions(st, plan_actions(st, find_groups(st, keep="oldest"), move_to=out))
    monkeypatch.undo()
    for rel, digest in before.items():  # every file at its old or its new place
        places = [p for p in (photos / rel, out / rel) if p.exists()]
        assert len(places) >= 1 and all(tree_digest(p) == digest for p in places)
    with Store.open(store) as st:  # the store opens, and knows the run is unfinished
        assert len(pending(st)) == len(planted)
    dedupe("--store", store, "--move-to", out, "--keep", "oldest", "--yes")
    assert sorted(set(before) - set(tree(photos))) == sorted(planted)
    assert tree(out) == {p: before[p] for p in planted}
    states, count, _ = store_state(store)
    assert count == len(states) == len(before) - len(planted)
    assert not (store / dedupe_actions.JOURNAL).exists()


def test_a_move_killed_after_linking_is_finished_without_a_second_copy(
    collection, tmp_path, monkeypatch
):
    photos, store, planted = collection
    out = tmp_path / "moved"
    real_unlink = Path.unlink

    def dying_unlink(self, *args, **kwargs):
        if self.parent.name == "dups" and photos in self.parents:
            raise KeyboardInterrupt  # linked at the destination, not yet unlinked here
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    with Store.open(store) as st, pytest.raises(KeyboardInterrupt):
        apply_actions(st, plan_actions(st, find_groups(st, keep="oldest"), move_to=out))
    monkeypatch.undo()
    assert len(list((out / "dups").iterdir())) == 1  # the first file, at both places
    dedupe("--store", store, "--move-to", out, "--keep", "oldest", "--yes")
    assert sorted(p.name for p in (out / "dups").iterdir()) == sorted(Path(p).name for p in planted)
    assert not (photos / "dups").exists() or not list((photos / "dups").iterdir())


def test_moves_across_filesystems_copy_and_verify(collection, tmp_path, monkeypatch):
    photos, store, planted = collection
    out = tmp_path / "moved"
    mtime = (photos / "dups/q30.jpg").stat().st_mtime
    data = (photos / "dups/q30.jpg").read_bytes()

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(dedupe_actions.os, "link", no_link)
    dedupe("--store", store, "--move-to", out, "--keep", "oldest", "--yes")
    assert (out / "dups/q30.jpg").read_bytes() == data
    assert (out / "dups/q30.jpg").stat().st_mtime == mtime
    assert not list(out.rglob("*.lookalike-part"))
    assert len(tree(out)) == len(planted)


# -- the import case and flag errors -----------------------------------------------------------
def test_against_lists_files_the_collection_already_has(dup_collection, tmp_path):
    photos, store, _ = dup_collection
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    Image.open(photos / photo_name(5)).convert("RGB").save(incoming / "again.jpg", quality=40)
    write_photo(incoming / "new.png", seed=1000)
    shutil.copy2(photos / photo_name(6), incoming / "same.png")
    before = store_state(store)
    data = json.loads(dedupe("--store", store, "--against", incoming, "--json").stdout)
    assert data["checked"] == 3
    found = {f["path"]: [m["path"] for m in f["matches"]] for f in data["files"]}
    assert found == {"again.jpg": [photo_name(5)], "same.png": [photo_name(6)]}
    assert store_state(store) == before  # nothing added


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--json", "--csv", "x.csv"], "alternatives"),
        (["--move-to", "x", "--delete"], "alternatives"),
        (["--yes"], "--yes confirms"),
        (["--against", "x", "--delete"], "--against only lists matches"),
        (["--undo", "--yes"], "--undo puts back"),
        (["--undo", "--move-to", "x"], "--undo puts back"),
        (["--empty-trash", "--undo"], "--empty-trash empties"),
        (["--empty-trash", "--html", "x.html"], "--empty-trash empties"),
    ],
)
def test_bad_flag_combinations(dup_collection, flags, message, tmp_path, monkeypatch):
    _, store, _ = dup_collection
    before = store_state(store)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where x, x.csv or x.html would be written
    result = dedupe("--store", store, *flags, ok=False)
    assert result.exit_code == 1 and message in result.output
    assert store_state(store) == before and not any(Path().iterdir())  # nothing written


def test_move_into_the_photos_folder_is_refused(collection):
    photos, store, _ = collection
    before = tree(photos)
    result = dedupe("--store", store, "--move-to", photos / "trash", "--yes", ok=False)
    assert result.exit_code == 1 and "inside the photos folder" in result.output
    assert tree(photos) == before


def test_journal_is_plain_json(collection, tmp_path, monkeypatch):
    _, store, planted = collection
    monkeypatch.setattr(dedupe_actions, "_act", lambda st, a: (_ for _ in ()).throw(SystemExit))
    with Store.open(store) as st, pytest.raises(SystemExit):
        apply_actions(st, plan_actions(st, find_groups(st, keep="oldest"), delete=True))
    data = json.loads((store / dedupe_actions.JOURNAL).read_text())
    assert {a["path"] for a in data["actions"]} == set(planted)
    trash = store / dedupe_actions.TRASH
    assert all(a["trash"] and Path(a["dest"]).is_relative_to(trash) for a in data["actions"])
    assert os.path.exists(store / "info.json")


# -- calibration (the arithmetic; the TensorFlow part runs in every indexing above) ------------
def test_seeded_edits_are_reproducible():
    import io

    import numpy as np

    from lookalike.dedupe.calibration import edited_copies

    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (120, 30, 200)).save(buf, "PNG")
    a = edited_copies(buf.getvalue(), 64, np.random.default_rng(0))
    b = edited_copies(buf.getvalue(), 64, np.random.default_rng(0))
    assert a == b and len(a) == 4


def test_threshold_separates_duplicates_from_the_rest():
    import numpy as np

    from lookalike.dedupe.calibration import choose_threshold

    rng = np.random.default_rng(0)
    copies = rng.uniform(0.9, 1.0, 400)  # edited copies score 0.9-1
    neighbours = np.sort(rng.uniform(0.2, 0.6, (1000, 10)), axis=1)[:, ::-1].copy()
    neighbours[:200, 0] = rng.uniform(0.9, 1.0, 200)  # 200 photos have a duplicate
    # the estimate carries the binomial noise of 100 duplicate pairs (~10 %): ask for 0.9
    t, facts = choose_threshold(copies, neighbours, photos=1000, target=0.9)
    assert t <= 0.9  # every duplicate pair is kept
    false = (neighbours >= t).sum() - (neighbours[:200, 0] >= t).sum()
    assert false <= 0.05 * 200  # and few others
    assert facts["duplicate_pairs"] == pytest.approx(100, rel=0.2)  # 200 photos = 100 pairs

    no_dups = np.sort(rng.uniform(0.2, 0.7, (100, 10)), axis=1)[:, ::-1].copy()
    t, _ = choose_threshold(copies, no_dups, photos=100, target=0.95)
    assert no_dups.max() < t <= no_dups.max() + 0.01  # just above the closest distinct pair


def test_resampling_keeps_the_threshold_at_or_above_the_point_estimate():
    import numpy as np

    from lookalike.dedupe.calibration import choose_threshold, resampled_threshold

    rng = np.random.default_rng(1)
    copies = rng.uniform(0.8, 1.0, 300)
    neighbours = np.sort(rng.uniform(0.2, 0.85, (400, 10)), axis=1)[:, ::-1].copy()
    neighbours[:80, 0] = rng.uniform(0.8, 1.0, 80)
    point, _ = choose_threshold(copies, neighbours, photos=400)
    t, facts = resampled_threshold(copies, neighbours, 400, np.random.default_rng(0))
    assert t >= point and facts["point_threshold"] == point
    again, _ = resampled_threshold(copies, neighbours, 400, np.random.default_rng(0))
    assert again == t  # seeded
    assert 0.0 <= facts["copy_recall"] <= 1.0 and facts["expected_precision"] <= 1.0


def test_impostor_floor_stops_where_copies_match_what_their_original_does_not():
    import numpy as np

    from lookalike.dedupe.calibration import impostor_floor

    n = 200
    to_copy = np.full((n, 3), 0.3, np.float32)
    to_original = np.full((n, 3), 0.3, np.float32)
    to_copy[:10, 0] = 0.72  # 5 % of the copies reach an unrelated photo at 0.72
    to_copy[10:20, 0] = 0.95  # these reach a photo their original matches too: no impostor
    to_original[10:20, 0] = 0.97
    floor = impostor_floor(to_copy, to_original, limit=0.01)
    assert 0.72 < floor <= 0.7225  # just above the unrelated matches
    assert impostor_floor(to_copy[10:], to_original[10:], limit=0.01) <= 0.3
    assert impostor_floor(np.zeros((0, 3)), np.zeros((0, 3))) is None


def test_against_finds_a_file_by_its_phash(dup_collection, tmp_path):
    from lookalike.dedupe.incoming import find_known
    from lookalike.engine import Engine

    photos, store, _ = dup_collection
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    Image.open(photos / photo_name(2)).convert("RGB").save(incoming / "resaved.jpg", quality=70)
    with Store.open(store) as st:
        engine = Engine(st)
        # a cosine of 1 is out of reach for a re-encoded copy: only the pHash can find it
        (known,) = find_known(engine, incoming, 1.0).known
        assert known.path == "resaved.jpg" and known.matches[0][0] == photo_name(2)
        assert known.matches[0][1] < 1.0  # the score is still the cosine
        assert find_known(engine, incoming, 1.0, phash_max=None).known == []


def test_lines_with_paths_are_printed_as_they_are(capsys):
    from lookalike.dedupe.cli import _say

    line = "the trash of /photos/[red]2019[/red]/" + "x" * 100 + "/store holds 5 files, 0.0 MB"
    _say(line)  # no fold at the console's width, no [markup] read as style
    assert capsys.readouterr().out == line + "\n"


def test_a_threshold_capped_at_one_is_explained(collection):
    _, store, _ = collection
    assert "calibrated threshold is 1.0" not in dedupe("--store", store).stderr
    with Store.open(store) as st:
        st.info["dedupe_threshold"] = 1.0
        st.info["dedupe_calibration"] |= {"threshold": 1.0, "impostor_quantile": 0.943}
        st.save_info()
    result = dedupe("--store", store, "--json")
    assert "calibrated threshold is 1.0" in result.stderr and "cosine 0.943" in result.stderr
    assert json.loads(result.stdout)["threshold"] == 1.0  # the JSON stays clean
