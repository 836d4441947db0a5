"""The Duplicates review page in a real browser: headless Chromium, driven by Playwright,
against a real `lookalike serve` subprocess on a copy of the tiny store with planted copies.

Review, keep another, not duplicates, move the others, undo; behind an API key. The browser and
server fixtures are conftest's: skipped, with the reason printed, when no browser is found,
unless LOOKALIKE_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import copy_store, photo_name

pytestmark = pytest.mark.slow

TIMEOUT_MS = 90_000  # each action re-reads the groups: slow on a loaded 2-core machine
KEY = "review-key"
COPIED = (0, 1, 2)  # photos with an exact copy under dups/: three groups of two


@pytest.fixture
def planted(tmp_path, photos_dir, tiny_store):
    """(photos, store, moved): a copy of the tiny collection plus exact copies of COPIED."""
    from lookalike.indexer import index_folder

    photos, store = copy_store(photos_dir, tiny_store, tmp_path)
    (photos / "dups").mkdir()
    for k in COPIED:
        shutil.copy2(photos / photo_name(k), photos / "dups" / Path(photo_name(k)).name)
    report = index_folder(photos, store)
    assert report.added == len(COPIED) and not report.trained
    return photos, store, tmp_path / "moved"


@pytest.fixture
def server(browser, serve, planted):
    """`python -m lookalike serve` with an API key and a move-to folder (conftest's `serve`)."""
    _, store, moved = planted
    return serve(store, api_key=KEY, env={"LOOKALIKE_DEDUPE_MOVE_TO": str(moved)})


def wait_status(page, text: str) -> str:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            f"document.getElementById('status').textContent.includes({text!r})",
            timeout=TIMEOUT_MS,
        )
    except PlaywrightTimeout:
        pytest.fail(f"status never said {text!r}: {page.locator('#status').inner_text()!r}")
    return page.locator("#status").inner_text()


def groups(page) -> list[list[str]]:
    """Paths of each shown group, the kept one first."""
    out = []
    for box in page.locator(".group").all():
        out.append(box.locator(".card .path").all_inner_texts())
    return out


def test_review_keep_another_not_duplicates_move_and_undo(server, browser, planted):
    photos, _, moved = planted
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server + "/review")

    # without the key the page says so, and shows nothing
    assert "API key" in wait_status(page, "API key")
    assert page.locator(".group").count() == 0
    page.fill("#key", KEY)
    page.locator("#key").blur()  # commits the field: one change event, as a person tabbing out
    wait_status(page, "3 groups at threshold")

    # review: three groups of an original and its exact copy, the kept one marked
    shown = groups(page)
    assert len(shown) == 3 and all(len(g) == 2 for g in shown)
    assert page.locator(".card.keep .badge").count() == 3
    assert page.locator(".evidence", has_text="exact copy").count() == 3
    assert page.locator(".reason").count() == 3
    originals = {photo_name(k) for k in COPIED}
    kept = [g[0].removeprefix("keep").strip() for g in shown]
    assert set(kept) == originals  # the collection file, not the copy under dups/

    # keep another: the copy in the first group becomes the kept one
    first = page.locator(".group").nth(0)
    other = first.locator(".card:not(.keep) .path").inner_text()
    first.get_by_role("button", name="Keep this one instead").click()
    wait_status(page, "keeping")
    page.wait_for_function(
        "(document.querySelector('.group .card.keep .path')?.textContent ?? '')"
        f".includes({other!r})",
        timeout=TIMEOUT_MS,
    )

    # not duplicates: the second group is gone, and stays gone after a reload
    page.locator(".group").nth(1).get_by_role("button", name="Not duplicates").click()
    wait_status(page, "remembered")
    page.click("#reload")
    wait_status(page, "2 groups at threshold")
    assert len(groups(page)) == 2

    # move the others of the last group: its copy leaves the photos folder for the moved folder
    last = page.locator(".group").nth(1)
    gone = last.locator(".card:not(.keep) .path").inner_text()
    last.get_by_role("button", name="Move the others").click()
    assert "moved 1 of 1 files" in wait_status(page, "moved")
    assert not (photos / gone).exists() and (moved / gone).is_file()
    page.wait_for_function("document.querySelectorAll('.group').length === 1", timeout=TIMEOUT_MS)

    # undo: the file is back in place, and its group with it
    page.click("#undo")
    assert "put back 1 files" in wait_status(page, "put back")
    assert (photos / gone).is_file() and not (moved / gone).exists()
    page.wait_for_function("document.querySelectorAll('.group').length === 2", timeout=TIMEOUT_MS)
    assert errors == []


def test_a_threshold_capped_at_one_is_explained_on_the_page(browser, serve, planted):
    from lookalike.store import Store

    _, store, _ = planted
    with Store.open(store) as st:  # as calibrated on a collection that looks alike to its model
        st.info["dedupe_threshold"] = 1.0
        st.info["dedupe_calibration"] |= {"threshold": 1.0, "impostor_quantile": 0.95}
        st.save_info()
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(serve(store) + "/review")
    wait_status(page, "3 groups at threshold 1")  # the exact copies still group
    note = page.locator(".note").inner_text()
    assert "calibrated threshold is 1.0" in note and "cosine 0.950" in note
