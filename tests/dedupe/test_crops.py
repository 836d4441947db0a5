"""A crop is never kept over the photo it was cut from: the keep rule's detail measure can
prefer a crop (it leaves out smooth, high-contrast parts of the frame), the geometry decides."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import textured
from PIL import Image

from lookalike.dedupe import grouping
from lookalike.dedupe.grouping import find_groups
from lookalike.dedupe.keep import measure, original_key
from lookalike.index.meta import ImageRecord
from lookalike.store import Store

cv2 = pytest.importorskip("cv2")

DIM = 8


def photo() -> Image.Image:
    """A textured 320x240 photo whose left third is a smooth ramp (a sky against the ground):
    variance that a crop of the textured part leaves out."""
    img = np.asarray(textured(6, (320, 240))).astype(np.float64)
    img[:, :96] = np.linspace(0, 255, 240)[:, None, None]
    return Image.fromarray(img.astype(np.uint8))


@pytest.fixture
def files(tmp_path):
    """The photo, a crop of it (70 % x 80 %, not resized) and a re-encode, in PHOTOS."""
    root = tmp_path / "photos"
    root.mkdir()
    img = photo()
    img.save(root / "b_original.jpg", quality=90)
    img.crop((96, 24, 320, 216)).save(root / "a_crop.jpg", quality=90)
    img.save(root / "c_copy.jpg", quality=80)
    return root


def store_of(tmp_path, root) -> Store:
    """A store of the three files, their vectors all within cosine 0.99 of each other."""
    store = Store.open(tmp_path / "store", create=True, photos=root)
    store.info["embedding_dim"] = DIM
    base = np.eye(DIM, dtype=np.float32)[0]
    rows = []
    for n, name in enumerate(["a_crop.jpg", "b_original.jpg", "c_copy.jpg"]):
        vec = base + 0.05 * np.eye(DIM, dtype=np.float32)[n + 1]
        with Image.open(root / name) as img:
            width, height = img.size
        size = (root / name).stat().st_size
        sha = hashlib.sha256((root / name).read_bytes()).hexdigest()
        record = ImageRecord(0, name, size, 100.0, sha, width, height)
        rows.append((record, vec / np.linalg.norm(vec)))
    store.db.write(rows)
    store.rebuild_index("flat")
    return store


def test_the_detail_measure_alone_would_keep_the_crop(files):
    keys = {p.name: original_key(p.name, measure(p), p.stat().st_size) for p in files.iterdir()}
    assert min(keys, key=keys.get) == "a_crop.jpg"  # what the geometry below has to overrule


def test_the_photo_a_crop_was_cut_from_is_kept(tmp_path, files):
    (group,) = find_groups(store_of(tmp_path, files), 0.9)
    assert group.keep.path == "b_original.jpg"
    assert sorted(m.path for m in group.others) == ["a_crop.jpg", "c_copy.jpg"]
    assert group.reason.endswith("its crops come after it")


def test_without_the_geometry_the_crop_would_be_kept(tmp_path, files, monkeypatch):
    monkeypatch.setattr(grouping, "_crops", lambda *a: set())
    (group,) = find_groups(store_of(tmp_path, files), 0.9)
    assert group.keep.path == "a_crop.jpg"


def test_the_next_listing_and_the_next_run_reuse_the_crop_verdicts(tmp_path, files, monkeypatch):
    from lookalike.dedupe import verification

    store = store_of(tmp_path, files)
    find_groups(store, 0.9)
    calls = []
    real = verification.checked_features
    monkeypatch.setattr(verification, "checked_features", lambda *a: calls.append(a) or real(*a))
    (group,) = find_groups(store, 0.9)  # the service's next page: held by the process
    assert group.keep.path == "b_original.jpg" and calls == []
    grouping._CROP_VERDICTS.clear()  # the next CLI run: kept in the store
    (group,) = find_groups(store, 0.9)
    assert group.keep.path == "b_original.jpg" and calls == []
    grouping._CROP_VERDICTS.clear()
    store.db.conn.execute(
        "DELETE FROM verified_pairs WHERE version = ?", (verification.CROP_VERSION,)
    )
    (group,) = find_groups(store, 0.9)
    assert group.keep.path == "b_original.jpg" and calls  # the counter sees fresh work


def test_a_changed_file_gets_no_kept_verdict(tmp_path, files):
    from lookalike.dedupe import verification

    store = store_of(tmp_path, files)
    photo().save(files / "a_crop.jpg", quality=90)  # the crop's bytes are now the whole photo
    find_groups(store, 0.9)
    assert grouping._CROP_VERDICTS == {}
    assert (
        store.db.verified_inliers(
            [(r.sha256, s.sha256) for r in store.db.records() for s in store.db.records()],
            verification.CROP_VERSION,
        )
        == {}
    )


def test_cropped_from_tells_a_crop_from_a_reencode(files):
    from lookalike.dedupe.verification import cropped_from, features

    orig, crop, copy = (features(files / n) for n in ("b_original.jpg", "a_crop.jpg", "c_copy.jpg"))
    assert cropped_from(crop, orig)
    assert not cropped_from(orig, crop)  # the photo holds more than its crop
    assert not cropped_from(copy, orig) and not cropped_from(orig, copy)  # the same frame
    assert not cropped_from(crop, None) and not cropped_from(None, orig)
    other = textured(7, (320, 240))
    other.save(files / "other.jpg", quality=90)
    assert not cropped_from(crop, features(files / "other.jpg"))


def test_other_keep_policies_are_plain_orders(tmp_path, files):
    (group,) = find_groups(store_of(tmp_path, files), 0.9, keep="smallest")
    assert group.keep.path == "a_crop.jpg"  # asked for: the smallest file is kept


def test_against_says_when_the_collection_has_only_a_crop_of_a_file(tmp_path, files):
    from lookalike.dedupe.incoming import Known, _crops_of

    store = store_of(tmp_path, files)
    crops = _crops_of(store, files / "b_original.jpg", ["a_crop.jpg", "c_copy.jpg"])
    assert crops == {"a_crop.jpg"}  # the re-encode holds the whole frame
    only_crop = Known("incoming.jpg", [("a_crop.jpg", 0.93)], crops)
    assert only_crop.only_crops and only_crop.to_dict()["matches"][0]["crop_of_file"]
    assert not Known("incoming.jpg", [("a_crop.jpg", 0.93), ("c_copy.jpg", 0.99)], crops).only_crops
    assert _crops_of(store, files / "a_crop.jpg", ["b_original.jpg"]) == frozenset()
