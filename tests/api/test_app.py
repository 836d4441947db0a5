"""The HTTP API through TestClient (lifespan running) on a copy of the tiny store.

Every endpoint of the service, every error it promises (always JSON with "error" and "detail",
never a 5xx), the API key, CORS, settings from the environment, and searches running while
another thread adds and deletes images.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTO_SEEDS, make_photo, photo_name
from fastapi.testclient import TestClient
from PIL import Image

from lookalike.api import thumbnails
from lookalike.api.app import app_from_env, create_app
from lookalike.config import Settings

K_DEFAULT = 10


# -- helpers --------------------------------------------------------------------------------------
def stored(photos_dir: Path, seed: int) -> tuple[str, bytes]:
    """(relative path, bytes) of a photo the store holds."""
    name = photo_name(seed)
    return name, (photos_dir / name).read_bytes()


def new_image(seed: int, fmt: str = "PNG") -> bytes:
    """An image the store does not hold (seeds far from PHOTO_SEEDS)."""
    buf = io.BytesIO()
    make_photo(np.random.default_rng(10_000 + seed)).save(buf, fmt)
    return buf.getvalue()


def files(*payloads: bytes, name: str = "q.png") -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart `file` fields, one per payload."""
    return [("file", (f"{i}-{name}", data, "image/png")) for i, data in enumerate(payloads)]


def bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 megapixels), ~50 kB on disk."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def assert_error(response, status: int, kind: str | None = None) -> dict:
    """A JSON error body with "error" and "detail", the given status, no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in body["detail"]
    if kind is not None:
        assert body["error"] == kind, body
    return body


def search(client: TestClient, data: bytes, k: int = K_DEFAULT) -> list[dict]:
    r = client.post(f"/search?k={k}", files=files(data))
    assert r.status_code == 200, r.text
    return r.json()["results"]


def all_ids(client: TestClient, photos_dir: Path) -> set[int]:
    """Every id the service holds (a flat index returns them all for k >= count)."""
    count = client.get("/stats").json()["images"]
    assert count <= 100
    ids = {r["id"] for r in search(client, stored(photos_dir, 0)[1], k=100)}
    assert len(ids) == count
    return ids


def upload_names(store: Path) -> set[str]:
    folder = store / "uploads"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture(scope="module")
def ids_by_path(client, photos_dir) -> dict[str, int]:
    """Ids of the stored photos, by their relative path."""
    return {r["path"]: r["id"] for r in search(client, stored(photos_dir, 0)[1], k=100)}


# -- search ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 3])  # PNG in a/, JPEG in b/, PNG in b/
def test_search_by_upload_finds_the_query_first(client, photos_dir, seed):
    name, data = stored(photos_dir, seed)
    r = client.post("/search?k=5", files=files(data))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "took_ms"}
    assert isinstance(body["took_ms"], float) and body["took_ms"] >= 0
    results = body["results"]
    assert len(results) == 5
    for hit in results:
        assert {"id", "path", "score", "url"} <= set(hit)
        assert isinstance(hit["id"], int) and isinstance(hit["path"], str)
        assert isinstance(hit["score"], float) and -1.0001 <= hit["score"] <= 1.0001
        assert hit["url"] == f"/images/{hit['id']}"
    assert results[0]["path"] == name and results[0]["score"] >= 0.99
    scores = [hit["score"] for hit in results]
    assert scores == sorted(scores, reverse=True)
    assert len({hit["id"] for hit in results}) == 5


def test_search_k_defaults_to_10_and_accepts_100(client, photos_dir):
    data = stored(photos_dir, 2)[1]
    assert len(search(client, data, k=K_DEFAULT)) == 10
    r = client.post("/search", files=files(data))
    assert len(r.json()["results"]) == 10
    assert len(search(client, data, k=100)) == len(PHOTO_SEEDS)  # all of them, no more


def test_similar_excludes_the_image_itself(client, ids_by_path):
    image_id = ids_by_path[photo_name(4)]
    r = client.get(f"/images/{image_id}/similar?k=5")
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["took_ms"], float)
    hits = body["results"]
    assert len(hits) == 5 and image_id not in {h["id"] for h in hits}
    assert all(h["url"] == f"/images/{h['id']}" for h in hits)
    every = client.get(f"/images/{image_id}/similar?k=100").json()["results"]
    assert len(every) == len(PHOTO_SEEDS) - 1


# -- images and thumbnails ------------------------------------------------------------------------
@pytest.mark.parametrize(("seed", "media_type"), [(0, "image/png"), (1, "image/jpeg")])
def test_get_image_serves_the_stored_file(client, photos_dir, ids_by_path, seed, media_type):
    name, data = stored(photos_dir, seed)
    r = client.get(f"/images/{ids_by_path[name]}")
    assert r.status_code == 200
    assert r.headers["content-type"] == media_type
    assert r.content == data


def test_thumbnail_is_a_jpeg_made_once_and_cached(client, api_store, ids_by_path, monkeypatch):
    image_id = ids_by_path[photo_name(5)]
    r = client.get(f"/images/{image_id}/thumbnail?size=40")  # served at 128, the next size up
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["x-thumbnail-size"] == "128"
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.format == "JPEG" and img.size == (64, 48)  # no upscaling of a 64x48 photo
    cached = list((api_store / "thumbnails").glob(f"{image_id}-*-128.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == r.content
    default = client.get(f"/images/{image_id}/thumbnail")  # the setting's 256
    assert default.status_code == 200 and default.headers["x-thumbnail-size"] == "256"
    with Image.open(io.BytesIO(default.content)) as img:
        assert img.size == (64, 48)
    assert len(list((api_store / "thumbnails").glob(f"{image_id}-*-256.jpg"))) == 1

    def no_more_thumbnails(*args, **kwargs):
        raise AssertionError("the thumbnail should have come from the cache")

    monkeypatch.setattr(thumbnails, "thumbnail", no_more_thumbnails)
    again = client.get(f"/images/{image_id}/thumbnail?size=100")
    assert again.status_code == 200 and again.content == r.content
    assert_error(client.get(f"/images/{image_id}/thumbnail?size=0"), 422)
    assert_error(client.get(f"/images/{image_id}/thumbnail?size=5000"), 422)


# -- adding and deleting ---------------------------------------------------------------------------
def test_add_images_are_searchable_at_once_and_survive_a_restart(client, api_store, photos_dir):
    before = all_ids(client, photos_dir)
    payloads = [new_image(1), new_image(2, "JPEG"), new_image(3)]
    r = client.post("/images", files=files(*payloads))
    assert r.status_code == 201, r.text
    ids = r.json()["ids"]
    assert len(ids) == 3 and len(set(ids)) == 3 and not set(ids) & before
    assert client.get("/stats").json()["images"] == len(before) + 3
    for image_id, data in zip(ids, payloads):
        top = search(client, data, k=3)[0]
        assert top["id"] == image_id and top["score"] >= 0.99
        assert top["path"].startswith("@uploads/")
        assert client.get(f"/images/{image_id}").content == data
    assert client.get(f"/images/{ids[1]}").headers["content-type"] == "image/jpeg"
    assert len(upload_names(api_store)) >= 3

    # a restart: a new app, its own lifespan, on the same store folder
    with TestClient(create_app(Settings(store=api_store))) as restarted:
        assert restarted.get("/stats").json()["images"] == len(before) + 3
        for image_id, data in zip(ids, payloads):
            top = search(restarted, data, k=3)[0]
            assert top["id"] == image_id and top["score"] >= 0.99

    for image_id in ids:
        assert client.delete(f"/images/{image_id}").status_code == 200
    assert all_ids(client, photos_dir) == before


def test_delete_removes_from_search_and_404s_afterwards(client, api_store, photos_dir):
    data = new_image(7)
    (image_id,) = client.post("/images", files=files(data)).json()["ids"]
    assert search(client, data, k=1)[0]["id"] == image_id
    uploads = upload_names(api_store)

    r = client.delete(f"/images/{image_id}")
    assert r.status_code == 200 and r.json() == {"deleted": image_id}
    assert image_id not in {h["id"] for h in search(client, data, k=100)}
    assert len(upload_names(api_store)) == len(uploads) - 1  # the uploaded file went too,
    trashed = [p for p in (api_store / "trash").rglob("*") if p.is_file()]  # into the trash
    assert any(p.read_bytes() == data for p in trashed)
    assert_error(client.get(f"/images/{image_id}"), 404, "not_found")
    assert_error(client.get(f"/images/{image_id}/thumbnail"), 404, "not_found")
    assert_error(client.get(f"/images/{image_id}/similar"), 404, "not_found")
    assert_error(client.delete(f"/images/{image_id}"), 404, "not_found")


def test_delete_a_photo_of_the_folder(tmp_path, tiny_store, photos_dir, engine):
    """Deleting an indexed (not uploaded) photo drops it from the store, not from PHOTOS."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    name, data = stored(photos_dir, 8)
    with TestClient(create_app(Settings(store=store))) as c:
        image_id = search(c, data, k=1)[0]["id"]
        assert c.delete(f"/images/{image_id}").status_code == 200
        assert search(c, data, k=1)[0]["path"] != name
        assert c.get("/stats").json()["images"] == len(PHOTO_SEEDS) - 1
    assert (photos_dir / name).read_bytes() == data


# -- service --------------------------------------------------------------------------------------
def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["images"] >= len(PHOTO_SEEDS)


def test_stats(client, engine, tiny_config):
    r = client.get("/stats")
    assert r.status_code == 200
    stats = r.json()
    assert stats["images"] == len(engine.store.db)
    assert stats["index_type"] == "flat"
    assert stats["embedding_dim"] == tiny_config.embedding_dim
    assert stats["image_size"] == tiny_config.image_size
    assert stats["metric"] == "cosine"
    assert stats["store_version"] == 1 and stats["lookalike_version"]


def test_page_is_html_with_its_controls(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for needle in ('id="file"', 'id="results"', 'id="add"', 'name="viewport"'):
        assert needle in r.text


def test_openapi_lists_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    paths = {p: set(ops) for p, ops in schema["paths"].items()}
    assert paths["/search"] == {"post"}
    assert paths["/images"] == {"get", "post"}
    assert paths["/images/{image_id}"] == {"get", "delete"}
    assert paths["/images/{image_id}/similar"] == {"get"}
    assert paths["/images/{image_id}/thumbnail"] == {"get"}
    assert paths["/health"] == {"get"} and paths["/stats"] == {"get"}
    assert client.get("/docs").status_code == 200


# -- bad input ------------------------------------------------------------------------------------
def _truncated_jpeg() -> bytes:
    data = new_image(20, "JPEG")
    return data[: len(data) // 2]


BAD_IMAGES = {
    "not-an-image": lambda: b"this is a text file, not a photo\n" * 20,
    "truncated-jpeg": _truncated_jpeg,
    "truncated-png": lambda: new_image(21)[:200],
    "zero-bytes": lambda: b"",
    "decompression-bomb": bomb_png,
}


@pytest.fixture(scope="module")
def bad_images() -> dict[str, bytes]:
    return {name: make() for name, make in BAD_IMAGES.items()}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_search_is_400(client, bad_images, case):
    body = assert_error(client.post("/search", files=files(bad_images[case])), 400, "bad_image")
    if case == "decompression-bomb":
        assert len(bad_images[case]) < 200_000 and "pixels" in body["detail"]


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_among_good_ones_adds_nothing(client, api_store, photos_dir, bad_images, case):
    before, uploads = all_ids(client, photos_dir), upload_names(api_store)
    payloads = [new_image(30), bad_images[case], new_image(31)]
    assert_error(client.post("/images", files=files(*payloads)), 400, "bad_image")
    assert all_ids(client, photos_dir) == before
    assert upload_names(api_store) == uploads
    assert not search(client, payloads[0], k=1)[0]["path"].startswith("@uploads/")


@pytest.mark.parametrize("k", [0, 101, -1])
def test_k_out_of_range_is_422(client, photos_dir, ids_by_path, k):
    data = stored(photos_dir, 0)[1]
    body = assert_error(client.post(f"/search?k={k}", files=files(data)), 422, "invalid_request")
    assert "k" in body["detail"]
    image_id = ids_by_path[photo_name(0)]
    assert_error(client.get(f"/images/{image_id}/similar?k={k}"), 422, "invalid_request")


def test_bad_requests_are_json_4xx(client, photos_dir):
    assert_error(client.post("/search"), 422)  # no file field
    assert_error(client.post("/search", json={"file": "x"}), 422)
    assert_error(client.get("/search"), 405)
    assert_error(client.get("/no/such/page"), 404)
    assert_error(client.get("/images/abc"), 422)
    assert_error(client.get("/images/99999999999999999999999"), 422)  # past SQLite's INTEGER
    r = client.post(
        "/search",
        content=b"--zz\r\nnot multipart at all",
        headers={"content-type": "multipart/form-data; boundary=zz"},
    )
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)
    assert_error(client.post("/search?k=abc", files=files(stored(photos_dir, 0)[1])), 422)


@pytest.mark.parametrize("image_id", [999_999, 0, -5])
def test_unknown_id_is_404(client, image_id):
    for method, url in [
        ("GET", f"/images/{image_id}"),
        ("GET", f"/images/{image_id}/thumbnail?size=64"),
        ("GET", f"/images/{image_id}/similar"),
        ("DELETE", f"/images/{image_id}"),
    ]:
        assert_error(client.request(method, url), 404, "not_found")


# -- upload limit ---------------------------------------------------------------------------------
LIMIT = 100_000


def multipart(data: bytes, boundary: str = "lookalike-test-boundary") -> tuple[bytes, str]:
    """One `file` field as a raw multipart body, and its content type."""
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def test_upload_over_the_limit_is_413(app_with, photos_dir):
    c = app_with(max_upload_bytes=LIMIT)
    small = stored(photos_dir, 0)[1]
    assert len(small) < LIMIT and search(c, small, k=1)[0]["path"] == photo_name(0)
    big = np.random.default_rng(0).bytes(3 * LIMIT)
    assert_error(c.post("/search", files=files(big)), 413, "too_large")
    assert_error(c.post("/images", files=files(small, big)), 413, "too_large")


def test_chunked_upload_over_the_limit_is_413(app_with, client, photos_dir):
    c = app_with(max_upload_bytes=LIMIT)
    before = all_ids(client, photos_dir)
    body, content_type = multipart(np.random.default_rng(1).bytes(3 * LIMIT))
    sent = []

    def chunks():  # no Content-Length: the limit is only known while streaming
        for start in range(0, len(body), 16_384):
            sent.append(start)
            yield body[start : start + 16_384]

    for url in ("/search", "/images"):
        sent.clear()
        r = c.post(url, content=chunks(), headers={"content-type": content_type})
        assert "content-length" not in r.request.headers
        assert r.request.headers["transfer-encoding"] == "chunked"
        assert_error(r, 413, "too_large")
    assert all_ids(client, photos_dir) == before

    small_body, _ = multipart(stored(photos_dir, 0)[1])  # a chunked body under the limit is fine
    r = c.post("/search?k=1", content=iter([small_body]), headers={"content-type": content_type})
    assert r.status_code == 200 and r.json()["results"][0]["path"] == photo_name(0)


# -- API key and CORS -----------------------------------------------------------------------------
def test_api_key_guards_writes_only(app_with, photos_dir, ids_by_path):
    c = app_with(api_key="s3cret")
    data = new_image(40)
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
        assert_error(c.post("/images", files=files(data), headers=headers), 401, "unauthorized")
    r = c.post("/images", files=files(data), headers={"X-API-Key": "s3cret"})
    assert r.status_code == 201, r.text
    (image_id,) = r.json()["ids"]
    for headers in ({}, {"X-API-Key": "S3CRET"}):
        assert_error(c.delete(f"/images/{image_id}", headers=headers), 401, "unauthorized")
    assert search(c, data, k=1)[0]["id"] == image_id  # still there; searches need no key
    assert c.get(f"/images/{ids_by_path[photo_name(0)]}/similar").status_code == 200
    assert c.get(f"/images/{image_id}").status_code == 200
    assert c.delete(f"/images/{image_id}", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert_error(c.get(f"/images/{image_id}"), 404)


def test_cors_is_closed_by_default(client):
    r = client.get("/health", headers={"Origin": "http://example.com"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    preflight = client.options(
        "/search",
        headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_the_configured_origins(app_with):
    c = app_with(cors_origins=["http://example.com"])
    r = c.get("/health", headers={"Origin": "http://example.com"})
    assert r.headers["access-control-allow-origin"] == "http://example.com"
    preflight = c.options(
        "/images",
        headers={
            "Origin": "http://example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "X-API-Key",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://example.com"
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    other = c.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# -- settings from the environment -----------------------------------------------------------------
def test_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOKALIKE_STORE", str(tmp_path / "s"))
    monkeypatch.setenv("LOOKALIKE_MAX_UPLOAD_BYTES", "12345")
    monkeypatch.setenv("LOOKALIKE_API_KEY", "k")
    monkeypatch.setenv("LOOKALIKE_CORS_ORIGINS", '["http://a.example"]')
    settings = Settings()
    assert settings.store == tmp_path / "s"
    assert settings.max_upload_bytes == 12345
    assert settings.api_key == "k" and settings.cors_origins == ["http://a.example"]
    app = app_from_env()  # what `lookalike serve` runs in each worker
    assert app.state.settings.store == tmp_path / "s"
    assert app.state.settings.max_upload_bytes == 12345


def test_a_missing_store_fails_at_startup_not_per_request(tmp_path):
    from lookalike.errors import StoreNotFoundError

    with pytest.raises(StoreNotFoundError):
        with TestClient(create_app(Settings(store=tmp_path / "nothing-here"))):
            pass


# -- concurrency ----------------------------------------------------------------------------------
def test_the_same_thumbnail_asked_for_at_once(client, ids_by_path):
    """Eight requests for one not-yet-cached thumbnail all get it (each writes its own temp)."""
    image_id = ids_by_path[photo_name(9)]
    for size in thumbnails.SIZES:
        start = threading.Barrier(8)

        def fetch(_, size=size, start=start):
            start.wait()
            return client.get(f"/images/{image_id}/thumbnail?size={size}")

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(fetch, range(8)))
        assert {r.status_code for r in responses} == {200}
        assert len({r.content for r in responses}) == 1


def test_searches_run_safely_while_images_are_added_and_deleted(client, photos_dir, ids_by_path):
    before = all_ids(client, photos_dir)
    queries = [stored(photos_dir, seed) for seed in (0, 1, 2, 3, 5, 8, 13, 21)]
    new = [new_image(100 + i) for i in range(6)]
    added: list[int] = []  # every id the writer got back
    seen: list[set[int]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def reader(n: int) -> int:
        name, data = queries[n]
        done = 0
        while not stop.is_set() or done < 3:
            r = client.post("/search?k=8", files=files(data))
            assert r.status_code == 200, r.text
            hits = r.json()["results"]
            assert hits[0]["path"] == name and hits[0]["score"] >= 0.99
            assert len(hits) == 8 and len({h["id"] for h in hits}) == 8
            with lock:
                seen.append({h["id"] for h in hits})
            if n % 2:  # thumbnails, made or from the cache: concurrent cache writes
                image_id = ids_by_path[queries[done % len(queries)][0]]
                size = thumbnails.SIZES[done % len(thumbnails.SIZES)]
                r = client.get(f"/images/{image_id}/thumbnail?size={size}")
                assert r.status_code == 200 and r.content[:2] == b"\xff\xd8", r.text
            else:
                r = client.get(f"/images/{ids_by_path[name]}/similar?k=4")
                assert r.status_code == 200 and len(r.json()["results"]) == 4
            done += 1
        return done

    def writer() -> list[int]:
        kept = []
        try:
            for i in range(0, len(new), 2):
                r = client.post("/images", files=files(new[i], new[i + 1]))
                assert r.status_code == 201, r.text
                ids = r.json()["ids"]
                with lock:
                    added.extend(ids)
                for image_id, data in zip(ids, new[i : i + 2]):
                    assert search(client, data, k=1)[0]["id"] == image_id
                r = client.delete(f"/images/{ids[0]}")
                assert r.status_code == 200, r.text
                kept.append(ids[1])
        finally:
            stop.set()
        return kept

    with ThreadPoolExecutor(9) as pool:
        readers = [pool.submit(reader, n) for n in range(8)]
        kept = pool.submit(writer).result(timeout=120)
        rounds = [f.result(timeout=120) for f in readers]
    assert min(rounds) >= 3
    assert set().union(*seen) <= before | set(added)  # nothing but real images, ever
    assert all_ids(client, photos_dir) == before | set(kept)
    for image_id in set(added) - set(kept):
        assert_error(client.get(f"/images/{image_id}"), 404)
    for image_id in kept:
        assert client.delete(f"/images/{image_id}").status_code == 200
    assert all_ids(client, photos_dir) == before
