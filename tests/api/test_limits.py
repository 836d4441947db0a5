"""Bounded cost over HTTP: the decode budget, thumbnails of a few sizes removed with their image,
the API key of any characters, and a request body that stops arriving (a real server, raw
socket). Every refusal is one line of 4xx JSON.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
import zlib

import pytest
import uvicorn
from PIL import Image

from lookalike.api import thumbnails
from lookalike.api.app import create_app
from lookalike.api.thumbnails import SIZES, remove_thumbnails, thumbnail_size
from lookalike.config import Settings
from lookalike.errors import InvalidArgumentError


def bomb_png(side: int = 7999) -> bytes:
    """A 1-bit PNG of side x side, all black, complete (about 8 KB): 128 MB to decode."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    raw = zlib.compress(b"\x00" * (((side + 7) // 8 + 1) * side), 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def png(width: int, height: int, seed: int = 0) -> bytes:
    img = Image.new("RGB", (width, height), (seed * 40 % 256, 90, 200))
    img.paste((250, 250, 0), (0, 0, width // 3, height // 2))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def files(*payloads: bytes) -> list:
    return [("file", (f"f{i}.png", data, "image/png")) for i, data in enumerate(payloads)]


def assert_json_error(response, status: int, kind: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"} and "\n" not in body["detail"]
    if kind:
        assert body["error"] == kind
    return body


def thumbs(store, image_id: int) -> set[str]:
    return {p.name for p in (store / "thumbnails").glob(f"{image_id}-*")}


# -- decode budget ---------------------------------------------------------------------------------
def test_a_one_bit_bomb_under_the_pixel_limit_is_refused_by_the_budget(client, api_store):
    before = client.get("/stats").json()["images"]
    bomb = bomb_png()
    assert len(bomb) < 10_000
    for path in ("/search", "/suggest"):
        body = assert_json_error(client.post(path, files=files(bomb)), 400, "bad_image")
        assert "budget" in body["detail"] and "LOOKALIKE_MAX_DECODE_BYTES" in body["detail"]
    r = client.post("/images", files=files(png(80, 60), bomb))  # all or nothing
    assert "budget" in assert_json_error(r, 400, "bad_image")["detail"]
    assert client.get("/stats").json()["images"] == before


def test_the_budget_setting_reaches_the_engine(api_store, monkeypatch):
    from lookalike.engine import Engine

    seen = {}

    def fake_open(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(Engine, "open", fake_open)
    app = create_app(Settings(store=api_store, max_decode_bytes=123_456, max_image_pixels=99))
    with pytest.raises(RuntimeError, match="stop here"):
        with __import__("fastapi.testclient").testclient.TestClient(app):
            pass
    assert seen == {"max_pixels": 99, "max_decode_bytes": 123_456, "write_timeout": 2.0}


# -- thumbnails ------------------------------------------------------------------------------------
def test_thumbnail_sizes_are_a_fixed_few():
    assert SIZES == (128, 256, 512, 1024)
    assert [thumbnail_size(n) for n in (1, 128, 129, 256, 300, 512, 513, 1024)] == [
        128,
        128,
        256,
        256,
        512,
        512,
        1024,
        1024,
    ]
    with pytest.raises(InvalidArgumentError):
        thumbnail_size(1025)


def test_any_size_asked_for_is_served_from_the_few(client, api_store):
    r = client.post("/images", files=files(png(1200, 800, seed=1)))
    (image_id,) = r.json()["ids"]
    try:
        for asked in (16, 100, 128, 200, 300, 700, 1000, 1024, None):
            query = "" if asked is None else f"?size={asked}"
            r = client.get(f"/images/{image_id}/thumbnail{query}")
            served = thumbnail_size(asked or 256)
            assert r.status_code == 200 and r.headers["x-thumbnail-size"] == str(served)
            with Image.open(io.BytesIO(r.content)) as img:
                assert max(img.size) == served and abs(img.size[0] / img.size[1] - 1.5) < 0.02
        names = thumbs(api_store, image_id)
        assert len(names) == len(SIZES)  # nine sizes asked, four files
        assert {n.rsplit("-", 1)[1] for n in names} == {f"{s}.jpg" for s in SIZES}
        for bad in (0, -5, 1025, 5000):
            assert_json_error(client.get(f"/images/{image_id}/thumbnail?size={bad}"), 422)
    finally:
        client.delete(f"/images/{image_id}")


def test_delete_removes_the_thumbnails(client, api_store):
    ids = client.post("/images", files=files(png(300, 200, 2), png(300, 200, 3))).json()["ids"]
    for image_id in ids:
        for size in (128, 512):
            assert client.get(f"/images/{image_id}/thumbnail?size={size}").status_code == 200
        assert len(thumbs(api_store, image_id)) == 2
    assert client.delete(f"/images/{ids[0]}").status_code == 200
    assert thumbs(api_store, ids[0]) == set()
    assert len(thumbs(api_store, ids[1])) == 2  # the other image keeps its own
    assert_json_error(client.get(f"/images/{ids[0]}/thumbnail"), 404, "not_found")
    client.delete(f"/images/{ids[1]}")
    assert thumbs(api_store, ids[1]) == set()


def test_remove_thumbnails_takes_only_those_ids(tmp_path):
    folder = tmp_path / "thumbnails"
    folder.mkdir()
    names = ["1-aaaa-128.jpg", "1-bbbb-256.jpg", "1-aaaa-512.jpg.0f0f.tmp", "11-aaaa-128.jpg"]
    names += ["-1-aaaa-128.jpg", "21-aaaa-128.jpg", "2-cccc-1024.jpg"]
    for name in names:
        (folder / name).write_bytes(b"x")
    assert remove_thumbnails(tmp_path, [1, 2]) == 4
    assert sorted(p.name for p in folder.iterdir()) == [
        "-1-aaaa-128.jpg",
        "11-aaaa-128.jpg",
        "21-aaaa-128.jpg",
    ]
    assert remove_thumbnails(tmp_path, [-1]) == 1
    assert remove_thumbnails(tmp_path / "no-store-here", [1]) == 0


def test_a_thumbnail_made_as_its_row_goes_does_not_outlive_it(client, api_store, monkeypatch):
    """The row is removed between the check and the cache write: the file is removed again."""
    (image_id,) = client.post("/images", files=files(png(200, 150, 4))).json()["ids"]
    made = thumbnails.thumbnail

    def slow_thumbnail(*args, **kwargs):
        data = made(*args, **kwargs)
        client.app.state.engine.remove_image(image_id)  # a DELETE lands meanwhile
        remove_thumbnails(api_store, [image_id])
        return data

    monkeypatch.setattr(thumbnails, "thumbnail", slow_thumbnail)
    assert_json_error(client.get(f"/images/{image_id}/thumbnail?size=128"), 404, "not_found")
    assert thumbs(api_store, image_id) == set()


def test_thumbnails_of_a_changed_file_are_replaced(client, api_store):
    (image_id,) = client.post("/images", files=files(png(200, 150, 5))).json()["ids"]
    try:
        assert client.get(f"/images/{image_id}/thumbnail?size=128").status_code == 200
        (old,) = thumbs(api_store, image_id)
        stale = api_store / "thumbnails" / old.replace(old.split("-")[1], "0123456789ab")
        (api_store / "thumbnails" / old).rename(stale)  # as if made from the file before
        assert client.get(f"/images/{image_id}/thumbnail?size=128").status_code == 200
        assert thumbs(api_store, image_id) == {old}
    finally:
        client.delete(f"/images/{image_id}")


# -- API key ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sent", ["clé".encode(), "ключ".encode(), b"\xff\xfe", "s3cret\u00e9".encode(), b"s3cre"]
)
def test_a_wrong_key_of_any_characters_is_401(app_with, sent):
    c = app_with(api_key="s3cret")
    r = c.delete("/images/987654321", headers={"X-API-Key": sent})
    assert_json_error(r, 401, "unauthorized")


def test_a_non_ascii_key_works(app_with):
    c = app_with(api_key="clé-ключ")
    r = c.delete("/images/987654321", headers={"X-API-Key": "clé-ключ".encode()})
    assert_json_error(r, 404, "not_found")  # past the key: the id is unknown
    r = c.delete("/images/987654321", headers={"X-API-Key": "cle-ключ".encode()})
    assert_json_error(r, 401, "unauthorized")


# -- a body that stops arriving: a real server, a raw socket --------------------------------------
@pytest.fixture
def live_server(engine):
    """Start uvicorn in a thread on 127.0.0.1 with a 0.5 s body timeout; yields its port."""
    app = create_app(Settings(body_timeout_s=0.5), engine=engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    """Read until the server closes the connection (or the 5 s socket timeout fails the test)."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "lookalikeboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _head(path: str, content_type: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("sent_share", [0.0, 0.5])
def test_a_body_shorter_than_its_content_length_gets_408_and_a_closed_connection(
    live_server, sent_share
):
    body, content_type = _multipart(png(64, 48))
    with socket.create_connection(("127.0.0.1", live_server), timeout=5) as sock:
        sock.sendall(
            _head("/search", content_type, len(body)) + body[: int(len(body) * sent_share)]
        )
        started = time.monotonic()
        reply = _read_all(sock)  # the server answers, then closes: recv gives b""
        waited = time.monotonic() - started
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"application/json" in head and b"connection: close" in head.lower()
    error = json.loads(payload)
    assert error["error"] == "timeout" and "\n" not in error["detail"]
    assert 0.4 < waited < 4


def test_a_slow_but_steady_body_is_fine(live_server):
    """The timeout is between parts of the body, not over the whole of it."""
    body, content_type = _multipart(png(64, 48))
    with socket.create_connection(("127.0.0.1", live_server), timeout=5) as sock:
        sock.sendall(_head("/search?k=1", content_type, len(body)))
        step = len(body) // 4 + 1
        for i in range(0, len(body), step):
            time.sleep(0.3)
            sock.sendall(body[i : i + step])
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]


def test_serve_sets_a_keep_alive_timeout(tiny_store, monkeypatch):
    from typer.testing import CliRunner

    from lookalike.cli import app

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: seen.update(kw))
    result = CliRunner().invoke(app, ["serve", "--store", str(tiny_store), "--port", "8765"])
    assert result.exit_code == 0, result.output
    assert seen["timeout_keep_alive"] == 5 and seen["port"] == 8765


def test_a_thumbnail_that_cannot_be_cached_is_still_served(client, api_store, monkeypatch):
    (image_id,) = client.post("/images", files=files(png(200, 150, 6))).json()["ids"]

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(thumbnails.os, "replace", disk_full)
    try:
        r = client.get(f"/images/{image_id}/thumbnail?size=128")
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
        assert thumbs(api_store, image_id) == set()  # nothing cached, no temporary file left
    finally:
        monkeypatch.undo()
        client.delete(f"/images/{image_id}")
