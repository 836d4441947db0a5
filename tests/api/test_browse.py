"""Browsing (GET /images, /folders), the page's settings (/config), its files, and the API docs
served without internet."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import PHOTO_SEEDS, photo_name

import lookalike.api


def test_images_newest_first_in_pages(client, engine):
    records = sorted(engine.store.db.records(), key=lambda r: (-r.mtime, -r.id))
    seen = []
    for offset in range(0, len(PHOTO_SEEDS), 7):
        body = client.get(f"/images?offset={offset}&limit=7").json()
        assert body["total"] == len(PHOTO_SEEDS) and body["offset"] == offset
        assert body["order"] == "newest" and body["folder"] is None
        assert len(body["images"]) == min(7, len(PHOTO_SEEDS) - offset)
        seen += body["images"]
    assert [i["id"] for i in seen] == [r.id for r in records]
    first = seen[0]
    assert first["url"] == f"/images/{first['id']}"
    assert first["thumbnail_url"] == f"/images/{first['id']}/thumbnail"
    assert first["width"] == 64 and first["height"] == 48 and first["size"] > 0
    assert client.get(first["url"]).status_code == 200
    past_end = client.get(f"/images?offset={len(PHOTO_SEEDS)}").json()
    assert past_end["images"] == [] and past_end["total"] == len(PHOTO_SEEDS)


def test_images_by_path_in_one_folder(client):
    body = client.get("/images?order=path&folder=b&limit=100").json()
    expected = sorted(photo_name(s) for s in PHOTO_SEEDS if photo_name(s).startswith("b/"))
    assert [i["path"] for i in body["images"]] == expected
    assert body["total"] == len(expected) and body["folder"] == "b"
    # a folder is matched exactly: no prefix or case games, no sub-folders by accident
    for other in ("B", "b/photo", "%", "_", "a/../b"):
        assert client.get("/images", params={"folder": other}).json()["total"] == 0, other
    assert client.get("/images", params={"folder": ""}).json()["total"] == 0  # no top-level photos


def test_folders_count_their_images(client):
    folders = client.get("/folders").json()["folders"]
    assert folders == [
        {"path": "a", "images": sum(1 for s in PHOTO_SEEDS if s % 2 == 0)},
        {"path": "b", "images": sum(1 for s in PHOTO_SEEDS if s % 2 == 1)},
    ]


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=501", "offset=-1", "order=random", "offset=x"],
)
def test_images_bad_parameters_are_422(client, query):
    r = client.get(f"/images?{query}")
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


def test_config_says_whether_a_key_is_needed(client, app_with):
    from lookalike.dedupe.grouping import default_threshold

    body = client.get("/config").json()
    assert body["needs_api_key"] is False
    assert body["dedupe_threshold"] == pytest.approx(
        default_threshold(client.app.state.engine.store), abs=1e-6
    )
    assert isinstance(body["threshold_calibrated"], bool)
    keyed = app_with(store=client.app.state.settings.store, api_key="s3cret")
    assert keyed.get("/config").json()["needs_api_key"] is True


def test_page_files_and_favicon(client):
    page = client.get("/").text
    for asset in ("/static/app.js", "/static/app.css", "/static/favicon.svg"):
        assert asset in page
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert (
        client.get("/static/app.js")
        .headers["content-type"]
        .startswith(("text/javascript", "application/javascript"))
    )
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert 'href="/review"' in page  # the Duplicates review page
    for bad in ("/static/nope.js", "/static/..%2Fapp.py", "/static/%2E%2E%2Fapp.py"):
        assert client.get(bad).status_code == 404, bad


def test_docs_are_served_from_here(client):
    html = client.get("/docs").text
    assert "SwaggerUIBundle" in html and "/openapi.json" in html
    assert "http://" not in html and "https://" not in html  # nothing from a CDN
    js = client.get("/docs/assets/swagger-ui-bundle.js")
    css = client.get("/docs/assets/swagger-ui.css")
    assert js.status_code == css.status_code == 200
    assert len(js.content) > 100_000 and b"SwaggerUIBundle" in js.content
    assert client.get("/docs/assets/index.html").status_code == 404
    assert client.get("/redoc").status_code == 404  # off rather than from a CDN


def test_api_modules_import_downwards():
    """No module of lookalike.api imports app.py (the app includes the routers, not the reverse)."""
    root = Path(lookalike.api.__file__).parent
    for path in root.glob("*.py"):
        if path.name == "app.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module != "app", f"{path.name} imports .app"
