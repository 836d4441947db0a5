"""The web page in a real browser: headless Debian Chromium, driven by Playwright, against a real
`lookalike serve` subprocess on a copy of the tiny store.

Slow (a server start and a browser start), but CI runs it: `.ci/run` installs chromium and the
[test] extra installs playwright. Missing either is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import make_photo, photo_name

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # needed as root (CI containers)
    "--disable-gpu",
    "--disable-background-networking",  # no calls to the outside
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(store_copy, tmp_path):
    """`python -m lookalike serve --store STORE --port PORT`, up and healthy; stopped after."""
    _, store = store_copy
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("LOOKALIKE_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lookalike",
                "serve",
                "--store",
                str(store),
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"lookalike serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"lookalike serve not healthy after 120 s:\n{log.read_text()}")
            time.sleep(0.25)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def browser():
    """Headless Debian Chromium under Playwright (no `playwright install`: the system browser)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[test]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def new_photo(path: Path, seed: int) -> Path:
    make_photo(np.random.default_rng(20_000 + seed)).save(path)
    return path


THUMBNAILS_LOADED = """() => {
    const imgs = [...document.querySelectorAll('#results img')];
    return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


def searched(page, action) -> list[tuple[str, float]]:
    """Do action (which starts a search), wait for its answer to be shown with every thumbnail
    loaded; (path, score) of each result."""
    with page.expect_response(
        lambda r: r.url.split("?")[0].endswith(("/search", "/suggest", "/similar"))
    ):
        action()
    page.wait_for_function(  # the page says "Searching…" until it has rendered the answer
        "document.getElementById('status').textContent.includes('look-alikes in')",
        timeout=TIMEOUT_MS,
    )
    page.wait_for_function(THUMBNAILS_LOADED, timeout=TIMEOUT_MS)
    paths = page.locator("#results .path").all_inner_texts()
    scores = page.locator("#results .score").all_inner_texts()
    assert len(paths) == len(scores) > 0
    for s in scores:
        assert re.fullmatch(r"-?\d\.\d{3}", s), s
    return list(zip(paths, map(float, scores)))


def test_search_click_and_add_in_the_page(server, browser, photos_dir, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server + "/")
    page.wait_for_function(
        "document.getElementById('count').textContent.includes('photos')", timeout=TIMEOUT_MS
    )
    count_before = httpx.get(f"{server}/stats").json()["images"]

    # search by an uploaded photo: it comes first, with its score, among loaded thumbnails
    results = searched(page, lambda: page.set_input_files("#file", str(photos_dir / photo_name(0))))
    assert len(results) == 12  # the page's default k
    assert results[0][0] == photo_name(0) and results[0][1] >= 0.99
    assert "look-alikes in" in page.locator("#status").inner_text()
    assert page.locator("#query img").count() == 1

    # click a result: its look-alikes replace the grid (itself excluded)
    clicked = results[3][0]
    refreshed = searched(page, page.locator("#results li button").nth(3).click)
    assert clicked not in [p for p, _ in refreshed] and refreshed != results

    # add two photos to the collection
    added = [new_photo(tmp_path / f"new-{i}.png", i) for i in range(2)]
    page.set_input_files("#add", [str(p) for p in added])
    page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('Added')", timeout=TIMEOUT_MS
    )
    assert page.locator("#status").inner_text() == "Added 2 photo(s)"
    assert httpx.get(f"{server}/stats").json()["images"] == count_before + 2
    page.wait_for_function(
        f"document.getElementById('count').textContent.startsWith('{count_before + 2} ')",
        timeout=TIMEOUT_MS,
    )

    # the new photo is found by the next search
    first_path, first_score = searched(page, lambda: page.set_input_files("#file", str(added[1])))[
        0
    ]
    assert first_path.startswith("@uploads/") and first_score >= 0.99

    # a file that is not an image: an error in the status line, not a broken page
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    page.set_input_files("#file", str(junk))
    page.wait_for_function(
        "document.getElementById('status').classList.contains('error')", timeout=TIMEOUT_MS
    )
    assert page.locator("#status").inner_text().startswith("Error:")
    assert errors == []


def test_phone_width_and_keyboard(server, browser, photos_dir):
    context = browser.new_context(viewport={"width": 375, "height": 700}, is_mobile=True)
    page = context.new_page()
    # Playwright starts intercepting file choosers when the first listener is added; adding one
    # now, not inside expect_file_chooser, keeps a key press from racing that (flaky otherwise)
    page.on("filechooser", lambda chooser: None)
    page.goto(server + "/")

    # Tab reaches the photo picker first, then the other controls
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"
    focused = []
    for _ in range(3):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id"))
    assert focused == ["k", "add", "apikey"]

    # Enter on the picker opens the file chooser; a search follows
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "file"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    results = searched(page, lambda: chooser.value.set_files(str(photos_dir / photo_name(1))))
    assert results[0][0] == photo_name(1)

    # a result can be opened with the keyboard too
    page.locator("#results li button").nth(2).focus()
    refreshed = searched(page, lambda: page.keyboard.press("Enter"))
    assert results[2][0] not in [p for p, _ in refreshed]

    # nothing sticks out sideways on a phone, with results shown
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"page is {width} px wide on a 375 px screen"
    context.close()
