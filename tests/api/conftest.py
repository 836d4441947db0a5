"""Fixtures of the API tests: a private copy of the tiny store and one app serving it; for the
browser tests, a real server (`serve`), a headless Chromium (`browser`) and pages (`open_page`).

The module-scoped client runs the lifespan once (loading the model takes seconds); tests that
change the store add or delete their own images and leave the others alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from lookalike.api.app import create_app
from lookalike.config import Settings


@pytest.fixture(scope="module")
def api_store(tmp_path_factory, tiny_store) -> Path:
    """A copy of tiny_store that this module's tests may change (uploads, thumbnails, deletes)."""
    store = tmp_path_factory.mktemp("api") / "store"
    shutil.copytree(tiny_store, store)
    return store


@pytest.fixture(scope="module")
def client(api_store):
    """A TestClient over create_app(Settings(store=api_store)), lifespan running."""
    with TestClient(create_app(Settings(store=api_store))) as c:
        yield c


@pytest.fixture(scope="module")
def engine(client):
    """The engine the client's lifespan loaded: other apps can share it and skip the loading."""
    return client.app.state.engine


@pytest.fixture
def app_with(engine):
    """Make a TestClient for an app with other settings over the same loaded engine."""
    clients = []

    def make(**settings) -> TestClient:
        c = TestClient(create_app(Settings(**settings), engine=engine))
        clients.append(c.__enter__())
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


# -- browser tests: a real `lookalike serve` and a headless Chromium ------------------------------
# Fixtures for tests/api/test_*browser*.py: `browser`, `serve` and `open_page`. With no Chromium
# they skip (the reason shows in pytest's summary) unless LOOKALIKE_REQUIRE_BROWSER=1 (.ci/run).

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_ARGS = [
    "--no-sandbox",  # needed as root (CI containers)
    "--disable-gpu",
    "--disable-background-networking",  # no calls to the outside
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 30_000
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def system_browser() -> str | None:
    """LOOKALIKE_BROWSER if set, else the first Chromium-like browser on PATH."""
    if os.environ.get("LOOKALIKE_BROWSER"):
        return os.environ["LOOKALIKE_BROWSER"]
    return next(filter(None, map(shutil.which, BROWSER_NAMES)), None)


def no_browser(reason: str):
    """Skip, or fail when the run requires the browser tests (LOOKALIKE_REQUIRE_BROWSER=1)."""
    if os.environ.get("LOOKALIKE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (and LOOKALIKE_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(f"browser test: {reason}")


@pytest.fixture(scope="session")
def chromium() -> str | None:
    """The browser to launch: the system's (see system_browser), else None for Playwright's own
    (`playwright install chromium`); skips when there is neither. Session-scoped, so that it
    runs before the session fixtures a browser test needs (the tiny store trains a model)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        no_browser("the playwright package is missing (pip install -e '.[test]')")
    executable = system_browser()
    if executable is None:
        with sync_playwright() as p:
            own = Path(p.chromium.executable_path).exists()
        if not own:
            no_browser(
                f"no Chromium found: none of {', '.join(BROWSER_NAMES)} on PATH, "
                "no LOOKALIKE_BROWSER, and Playwright has none (playwright install chromium)"
            )
    return executable


@pytest.fixture(scope="module")
def browser(chromium):
    """Headless Chromium under Playwright, one per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc, base: str, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            pytest.fail(f"lookalike serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"lookalike serve not healthy after {seconds:.0f} s:\n{log.read_text()}")
        time.sleep(0.25)


def _stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """serve(store, api_key=None, env=None) -> base URL of `python -m lookalike serve --store
    STORE` on a free port (env: more variables), up and healthy; every server started is
    stopped at the end of the module."""
    procs = []

    def start(store: Path, api_key: str | None = None, env: dict | None = None) -> str:
        port = free_port()
        log = tmp_path_factory.mktemp("serve") / "server.log"
        extra = env or {}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        env.pop("LOOKALIKE_API_KEY", None)
        env.update(extra)
        if api_key:
            env["LOOKALIKE_API_KEY"] = api_key
        command = [sys.executable, "-m", "lookalike", "serve", "--store", str(store)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*command, "--port", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, base, log)
        return base

    yield start
    for proc in procs:
        _stop(proc)


@pytest.fixture
def open_page(browser):
    """open_page(url, width=1200, height=900, mobile=False) -> a Playwright page at url.

    Requests to any host but this machine are refused and listed in page.blocked, script errors
    in page.errors; the test fails if either list is not empty at its end.
    """
    contexts, pages = [], []

    def open_(url: str, width: int = 1200, height: int = 900, mobile: bool = False):
        context = browser.new_context(
            viewport={"width": width, "height": height}, is_mobile=mobile, has_touch=mobile
        )
        contexts.append(context)
        page = context.new_page()
        page.errors, page.blocked = [], []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))

        def local_only(route):
            if urlsplit(route.request.url).hostname in LOCAL_HOSTS:
                return route.continue_()
            page.blocked.append(route.request.url)
            return route.abort()

        context.route("**/*", local_only)
        page.set_default_timeout(TIMEOUT_MS)
        pages.append(page)
        page.goto(url)
        return page

    yield open_
    problems = [(p.url, p.errors, p.blocked) for p in pages if p.errors or p.blocked]
    for context in contexts:
        context.close()
    assert not problems, f"script errors or requests to other hosts: {problems}"
