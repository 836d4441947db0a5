"""GET /duplicates and the review actions over HTTP (TestClient; the browser test drives the
page)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import copy_store, photo_name
from fastapi.testclient import TestClient

from lookalike.api.app import create_app
from lookalike.config import Settings


@pytest.fixture(scope="module")
def dup_store(tmp_path_factory, photos_dir, tiny_store):
    """A copy of the tiny collection with exact copies of two photos: two groups."""
    from lookalike.indexer import index_folder

    photos, store = copy_store(photos_dir, tiny_store, tmp_path_factory.mktemp("dedupe-api"))
    (photos / "dups").mkdir()
    for k in (0, 1):
        shutil.copy2(photos / photo_name(k), photos / "dups" / Path(photo_name(k)).name)
    index_folder(photos, store)
    return photos, store


@pytest.fixture(scope="module")
def keyed(dup_store, tmp_path_factory):
    _, store = dup_store
    moved = tmp_path_factory.mktemp("moved")
    settings = Settings(store=store, api_key="k", dedupe_move_to=moved)
    with TestClient(create_app(settings)) as c:
        yield c, moved


def test_duplicates_needs_the_key_bounds_threshold_and_pages(keyed):
    client, _ = keyed
    assert client.get("/duplicates").status_code == 401
    ok = {"X-API-Key": "k"}
    data = client.get("/duplicates", headers=ok).json()
    assert data["total"] >= 2 and data["offset"] == 0
    assert client.get("/duplicates?threshold=0.49", headers=ok).status_code == 422
    assert client.get("/duplicates?limit=0", headers=ok).status_code == 422
    assert client.get("/duplicates?limit=201", headers=ok).status_code == 422
    one = client.get("/duplicates?limit=1&offset=1", headers=ok).json()
    assert len(one["groups"]) == 1 and one["groups"][0] == data["groups"][1]
    assert client.post("/duplicates/apart", json={"ids": [1, 2]}).status_code == 401
    assert client.post("/duplicates/undo").status_code == 401
    page = client.get("/review")  # the page itself is public; it asks for the key
    assert page.status_code == 200 and "Duplicates" in page.text


def test_review_actions_and_errors(keyed, dup_store):
    client, moved = keyed
    photos, _ = dup_store
    ok = {"X-API-Key": "k"}
    groups = client.get("/duplicates", headers=ok).json()["groups"]
    ids = [m["id"] for m in groups[0]["members"]]
    assert client.post("/duplicates/apart", json={"ids": [ids[0]]}, headers=ok).status_code == 422
    assert (
        client.post("/duplicates/apart", json={"ids": [ids[0], 2**62]}, headers=ok).status_code
        == 404
    )
    bad = client.post("/duplicates/move", json={"keep": ids[0], "others": [ids[0]]}, headers=ok)
    assert bad.status_code == 422
    assert client.post("/duplicates/undo", headers=ok).status_code == 422  # nothing to undo
    r = client.post("/duplicates/move", json={"keep": ids[0], "others": ids[1:]}, headers=ok)
    assert r.status_code == 200, r.text
    path = groups[0]["members"][1]["path"]
    assert r.json()["files"] == [{"path": path, "status": "moved", "to": str(moved / path)}]
    assert not (photos / path).exists()
    after = client.get("/duplicates", headers=ok).json()
    assert len(after["groups"]) == len(groups) - 1
    back = client.post("/duplicates/undo", headers=ok).json()
    assert back["restored"] == [path] and back["rows"] == 1
    assert (photos / path).is_file()
    assert len(client.get("/duplicates", headers=ok).json()["groups"]) == len(groups)


def test_move_is_off_without_a_folder(dup_store):
    _, store = dup_store
    with TestClient(create_app(Settings(store=store))) as c:
        groups = c.get("/duplicates").json()["groups"]
        ids = [m["id"] for m in groups[0]["members"]]
        r = c.post("/duplicates/move", json={"keep": ids[0], "others": ids[1:]})
        assert r.status_code == 422 and "LOOKALIKE_DEDUPE_MOVE_TO" in r.json()["detail"]


def test_a_threshold_capped_at_one_comes_with_a_note(dup_store, tmp_path):
    from lookalike.store import Store

    photos, store = copy_store(*dup_store, tmp_path)
    with TestClient(create_app(Settings(store=store))) as client:
        assert "note" not in client.get("/duplicates").json()
    with Store.open(store, photos=photos) as st:
        st.info["dedupe_threshold"] = 1.0
        st.info["dedupe_calibration"] |= {"threshold": 1.0, "impostor_quantile": 0.95}
        st.save_info()
    with TestClient(create_app(Settings(store=store))) as client:
        data = client.get("/duplicates").json()
        assert data["threshold"] == 1.0 and "cosine 0.950" in data["note"]
        assert data["total"] >= 2  # the exact copies still group
        assert "note" not in client.get("/duplicates?threshold=0.99").json()  # asked for
