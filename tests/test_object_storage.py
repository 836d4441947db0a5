"""Photos in object storage: `lookalike index s3://bucket/prefix` against a real S3 server.

Every test talks to moto's standalone server over HTTP (tests/s3server.py), the way lookalike
talks to any S3-compatible endpoint; a bucket store must equal the store made from the same
photos in a folder (ids, file facts, embeddings within 1e-5).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys

import numpy as np
import pytest
from conftest import (
    TINY,
    assert_same_tables,
    make_photo,
    photo_name,
    table_rows,
    trust_mtimes,
    write_photo,
)
from s3server import s3_client, s3_server, upload_folder  # noqa: F401  (s3_server: a fixture)
from typer.testing import CliRunner

from lookalike.config import RayOptions
from lookalike.errors import InvalidArgumentError
from lookalike.indexer import index_folder
from lookalike.photos import BucketPhotos, open_photos
from lookalike.store import Store, copy_model

N = 200
pytestmark = pytest.mark.usefixtures("s3_server")  # every test talks to the server


@pytest.fixture(scope="module")
def photos200(tmp_path_factory):
    """200 seeded photos in two folders (and one hidden file that is never indexed)."""
    root = tmp_path_factory.mktemp("photos200")
    for seed in range(N):
        write_photo(root / photo_name(seed), seed)
    write_photo(root / ".hidden" / "skip.jpg", 999)
    return root


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory, photos200, tiny_store):
    """The store indexed from the folder with the session's tiny model (no training here)."""
    store = copy_model(tiny_store, tmp_path_factory.mktemp("folder-store") / "store")
    report = index_folder(photos200, store)
    assert report.images == N and not report.failed and not report.trained
    return store


def image_bytes(seed: int, suffix: str) -> bytes:
    buf = io.BytesIO()
    make_photo(np.random.default_rng(seed)).save(buf, "JPEG" if suffix == ".jpg" else "PNG")
    return buf.getvalue()


def change_bucket(bucket: str, prefix: str) -> dict[str, bytes]:
    """Add 3 objects, change 2, delete 4, rewrite 1 with the same bytes; returns the changed."""
    s3 = s3_client()
    for seed in (1000, 1001, 1002):
        s3.put_object(
            Bucket=bucket, Key=f"{prefix}/c/new_{seed}.jpg", Body=image_bytes(seed, ".jpg")
        )
    changed = {}
    for seed in (4, 5):
        rel = photo_name(seed)
        changed[rel] = image_bytes(500 + seed, rel[-4:])
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=changed[rel])
    for seed in (10, 11, 12, 13):
        s3.delete_object(Bucket=bucket, Key=f"{prefix}/{photo_name(seed)}")
    same = s3.get_object(Bucket=bucket, Key=f"{prefix}/{photo_name(20)}")["Body"].read()
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{photo_name(20)}", Body=same)
    return changed


def test_bucket_store_equals_folder_store_then_updates(
    tmp_path, photos200, folder_store, monkeypatch
):
    url = upload_folder(photos200, "same-as-folder", "photos")
    store = copy_model(folder_store, tmp_path / "store")
    report = index_folder(url, store)
    assert (report.images, report.added, report.failed, report.trained) == (N, N, [], False)
    assert_same_tables(folder_store, store)
    with Store.open(store) as st:
        assert st.photos_root == url
        assert st.file_path("a/photo_000.png") == f"{url}/a/photo_000.png"

    changed = change_bucket("same-as-folder", "photos")
    again = index_folder(url, store)
    assert (again.added, again.updated, again.removed) == (3, 2, 4)
    assert again.unchanged == N - 2 - 4 and again.images == N + 3 - 4
    table = table_rows(store)
    for rel, data in changed.items():
        assert table[rel][3] == hashlib.sha256(data).hexdigest()
    assert "c/new_1000.jpg" in table and photo_name(10) not in table
    import lookalike.images

    reads = []
    read = lookalike.images.read_bytes
    monkeypatch.setattr(lookalike.images, "read_bytes", lambda loc: reads.append(loc) or read(loc))
    trust_mtimes(store)  # a run well after the last writes: no LastModified too recent
    quiet = index_folder(url, store)
    assert (quiet.added, quiet.updated, quiet.removed, quiet.unchanged) == (0, 0, 0, N - 1)
    assert reads == []  # size + LastModified from the listing: no object downloaded


def test_ray_from_a_bucket_equals_folder_store(tmp_path, photos200, folder_store):
    ray = pytest.importorskip("ray", reason='the Ray tests need pip install "lookalike[ray]"')
    url = upload_folder(photos200, "for-ray", "photos")
    store = copy_model(folder_store, tmp_path / "store")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # workers get the env
    try:
        report = index_folder(url, store, ray=RayOptions(batch_size=16, shard_rows=64))
        assert (report.images, report.added, report.failed) == (N, N, [])
        assert report.ray["embedded"] == N
        assert_same_tables(folder_store, store)
        change_bucket("for-ray", "photos")
        again = index_folder(url, store, ray=RayOptions(batch_size=16, shard_rows=64))
    finally:
        ray.shutdown()
    assert (again.added, again.updated, again.removed, again.unchanged) == (3, 2, 4, N - 6)


def test_a_new_store_trains_from_a_bucket(tmp_path, photos_dir, tiny_store):
    url = upload_folder(photos_dir, "train-here", "deep/prefix")
    report = index_folder(url + "/", tmp_path / "store", model=TINY)  # trailing '/' is the same
    assert report.trained and report.images == len(table_rows(tiny_store)) and not report.failed
    got, want = table_rows(tmp_path / "store"), table_rows(tiny_store)
    assert {p: (r[0], *r[2:4]) for p, r in got.items()} == {
        p: (r[0], *r[2:4]) for p, r in want.items()
    }
    with Store.open(tmp_path / "store") as st:  # the dedupe threshold measured from the objects
        assert st.info["dedupe_calibration"]["model_serial"] == st.model_serial


def test_listing_order_is_the_folders(photos200):
    url = upload_folder(photos200, "order", "p")
    from lookalike.images import IMAGE_SUFFIXES, find_images

    listed = [loc[len(url) + 1 :] for loc in open_photos(url).files(IMAGE_SUFFIXES)]
    walked = [p.relative_to(photos200).as_posix() for p in find_images(photos200)]
    assert listed == walked and ".hidden/skip.jpg" not in listed


def test_missing_bucket_or_prefix_changes_nothing(tmp_path, photos200, folder_store):
    with pytest.raises(InvalidArgumentError, match="no such bucket or prefix: s3://nope-bucket/x"):
        index_folder("s3://nope-bucket/x", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    url = upload_folder(photos200, "guarded", "photos")
    store = copy_model(folder_store, tmp_path / "store")
    index_folder(url, store)
    before = table_rows(store)
    with pytest.raises(InvalidArgumentError, match="no such bucket or prefix"):
        index_folder("s3://guarded/phots", store)  # a typo
    s3_client().put_object(Bucket="guarded", Key="empty/readme.txt", Body=b"no photos")
    with pytest.raises(InvalidArgumentError, match=f"would remove {N} of the store's {N}"):
        index_folder("s3://guarded/empty", store)
    assert table_rows(store).keys() == before.keys()
    with Store.open(store) as st:
        assert st.photos_root == url


def test_api_serves_images_and_thumbnails_from_the_bucket(tmp_path, photos200, folder_store):
    from fastapi.testclient import TestClient

    from lookalike.api.app import create_app
    from lookalike.config import Settings

    url = upload_folder(photos200, "served", "photos")
    store = copy_model(folder_store, tmp_path / "store")
    index_folder(url, store)
    image_id = table_rows(store)[photo_name(7)][0]
    with TestClient(create_app(Settings(store=store))) as client:
        got = client.get(f"/images/{image_id}")
        assert got.status_code == 200
        assert got.content == (photos200 / photo_name(7)).read_bytes()
        thumb = client.get(f"/images/{image_id}/thumbnail?size=128")
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        similar = client.get(f"/images/{image_id}/similar?k=3").json()["results"]
        assert len(similar) == 3
        query = (photos200 / photo_name(7)).read_bytes()
        hits = client.post("/search", files={"file": ("q.png", query)}).json()["results"]
        assert hits[0]["id"] == image_id
        s3_client().delete_object(Bucket="served", Key=f"photos/{photo_name(7)}")
        assert client.get(f"/images/{image_id}").status_code == 404
        other = table_rows(store)[photo_name(8)][0]
        s3_client().delete_object(Bucket="served", Key=f"photos/{photo_name(8)}")
        assert client.get(f"/images/{other}/thumbnail?size=128").status_code == 404


def test_cli_indexes_a_bucket_and_refuses_to_move_objects(tmp_path, photos200, folder_store):
    from lookalike.cli import app

    url = upload_folder(photos200, "via-cli", "photos")
    store = copy_model(folder_store, tmp_path / "store")
    runner = CliRunner()
    result = runner.invoke(app, ["index", url, "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["added"] == N
    moved = runner.invoke(
        app, ["dedupe", "--store", str(store), "--move-to", str(tmp_path / "dups"), "--yes"]
    )
    assert moved.exit_code != 0
    lines = [line for line in moved.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--csv" in lines[0] and url in lines[0], moved.stderr
    assert not (tmp_path / "dups").exists() and len(table_rows(store)) == N


def test_missing_extra_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(InvalidArgumentError, match=r'pip install "lookalike\[s3\]"'):
        open_photos("s3://bucket/prefix")
    with pytest.raises(InvalidArgumentError, match="no bucket"):
        open_photos("s3://")


def test_object_facts_come_from_the_listing(photos200):
    url = upload_folder(photos200, "facts", "p")
    photos = BucketPhotos(url)
    first = next(photos.files(frozenset({".jpg", ".png"})))
    size, mtime = photos.stat(first)
    assert size == (photos200 / first[len(url) + 1 :]).stat().st_size and mtime > 1e9
    assert BucketPhotos(url).stat(first) == (size, mtime)  # the same, asked of the server


def test_dedupe_of_a_bucket_store_finds_what_the_folder_store_finds(tmp_path, tiny_store):
    """Keep rule, verification and reports read the photos from the bucket."""
    from PIL import Image

    from lookalike.cli import app

    photos = tmp_path / "photos"
    for seed in range(24):
        write_photo(photos / photo_name(seed), seed)
    original = Image.open(photos / photo_name(3)).convert("RGB")
    (photos / "dups").mkdir()
    original.save(photos / "dups" / "q40.jpg", quality=40)  # a re-encode
    w, h = original.size
    original.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(photos / "dups" / "crop.png")
    stores = {}
    for name, source in (("folder", photos), ("bucket", upload_folder(photos, "dedupe", "p"))):
        stores[name] = copy_model(tiny_store, tmp_path / name)
        index_folder(source, stores[name])
    runner = CliRunner()
    found = {}
    for name, store in stores.items():
        result = runner.invoke(
            app, ["dedupe", "--store", str(store), "--json", "--threshold", "0.9"]
        )
        assert result.exit_code == 0, result.output
        found[name] = json.loads(result.stdout)["groups"]
        csv = runner.invoke(
            app, ["dedupe", "--store", str(store), "--csv", str(tmp_path / "d.csv")]
        )
        assert csv.exit_code == 0, csv.output
    assert found["bucket"] == found["folder"]
    members = {m["path"] for g in found["folder"] for m in g["members"]}
    assert {photo_name(3), "dups/q40.jpg"} <= members
