"""Fixtures of the API tests: a private copy of the tiny store and one app serving it.

The module-scoped client runs the lifespan once (loading the model takes seconds); tests that
change the store add or delete their own images and leave the others alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lookalike.api.app import create_app
from lookalike.config import Settings


@pytest.fixture(scope="module")
def api_store(tmp_path_factory, tiny_store) -> Path:
    """A copy of tiny_store that this module's tests may change (uploads, thumbnails, deletes)."""
    import shutil

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
