"""Progress that tells the truth: the scan counts files as it finds them; bars show `n/?`."""

from __future__ import annotations

from types import SimpleNamespace

from rich.console import Console
from rich.progress import Progress

from lookalike.cli_common import CountColumn, progress_bar
from lookalike.indexer import SCAN_EVERY, scan


def test_scan_reports_the_files_found_while_it_walks(tmp_path):
    photos = tmp_path / "photos"
    for i in range(2 * SCAN_EVERY + 7):
        folder = photos / f"d{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.jpg").write_bytes(b"")  # scan does not decode
    (photos / "store").mkdir()
    (photos / "store" / "inside.jpg").write_bytes(b"")  # the store's own files are left out
    calls = []
    files = scan(SimpleNamespace(root=photos / "store"), photos, lambda *a: calls.append(a))
    assert len(files) == 2 * SCAN_EVERY + 7
    assert calls[:2] == [("scan", SCAN_EVERY, 0), ("scan", 2 * SCAN_EVERY, 0)]  # total unknown
    assert calls[-1] == ("scan", len(files), len(files))  # then the bar completes


def test_count_column_shows_unknown_totals_and_hides_the_training_count():
    bar = Progress(CountColumn(), console=Console(width=40))
    counting = bar.add_task("scan", total=None, no_count=False)
    bar.update(counting, completed=400)
    training = bar.add_task("epoch 3/60", total=600, no_count=True)
    bar.update(training, completed=120)
    column = CountColumn()
    assert column.render(bar.tasks[counting]).plain == "400/?"
    assert column.render(bar.tasks[training]).plain == ""


def test_one_bar_for_all_epochs(capsys):
    with progress_bar(True) as progress:
        progress("epoch 1/2", 1, 4)
        progress("epoch 1/2", 2, 4)
        progress("epoch 2/2", 3, 4)
        progress("epoch 2/2: done, best val loss 0.1 at epoch 2", 4, 4)
    text = capsys.readouterr().err
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("epoch 2/2: done"), text
