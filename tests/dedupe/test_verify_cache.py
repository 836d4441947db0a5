"""The verification cache (by content, in the store's SQLite) and the parallel matcher, on
seeded images in a store with hand-made vectors: no model."""

from __future__ import annotations

import hashlib

import filelock
import numpy as np
import pytest
from conftest import textured
from PIL import Image

from lookalike.index.meta import ImageRecord
from lookalike.store import Store

cv2 = pytest.importorskip("cv2")
from lookalike.dedupe import verification  # noqa: E402  (needs cv2 when it runs)


def textured320(seed: int):  # the larger photo-like image these tests match at WORK_SIDE
    return textured(seed, (320, 240))


DIM = 4


def crop(img: Image.Image, share: float = 0.75) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * share), round(h * share)
    return img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def record(photos, name: str, img: Image.Image) -> ImageRecord:
    """Save img as photos/name and return its table row (sha256 of the bytes, as indexing)."""
    path = photos / name
    img.save(path, quality=85)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return ImageRecord(0, name, path.stat().st_size, 1.0, sha, img.width, img.height)


def make_store(tmp_path, images: dict[str, Image.Image], vectors=None) -> Store:
    """A store whose rows are the given photos, with the given (or arbitrary) unit vectors."""
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    store = Store.open(tmp_path / "store", create=True, photos=photos)
    store.info["embedding_dim"] = DIM
    rng = np.random.default_rng(0)
    vectors = vectors if vectors is not None else rng.normal(size=(len(images), DIM))
    rows = []
    for (name, img), v in zip(images.items(), np.asarray(vectors, np.float32)):
        rows.append((record(photos, name, img), v / np.linalg.norm(v)))
    store.db.write(rows)
    store.rebuild_index("flat")
    return store


@pytest.fixture
def described(monkeypatch):
    """Counts the ORB work: calls of verification.describe."""
    calls = []
    real = verification.describe

    def counting(data):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(verification, "describe", counting)
    return calls


@pytest.fixture
def three(tmp_path):
    """A store of a photo, a crop of it and a different photo (ids 1, 2, 3)."""
    a, other = textured320(1), textured320(2)
    return make_store(tmp_path, {"a.jpg": a, "a_crop.jpg": crop(a), "b.jpg": other})


PAIRS = [(1, 2), (1, 3), (2, 3)]


def cached_rows(store: Store) -> int:
    return store.db.conn.execute("SELECT COUNT(*) FROM verified_pairs").fetchone()[0]


def test_a_second_run_reads_the_cache_and_does_no_orb_work(three, described):
    first = verification.Verifier(three).count(PAIRS)
    assert len(described) == 3  # each photo described once, not once per pair
    assert first[(1, 2)] >= verification.MIN_MATCHES > max(first[(1, 3)], first[(2, 3)])
    assert cached_rows(three) == 3
    described.clear()
    assert verification.Verifier(three).count(PAIRS) == first
    with Store.open(three.root) as again:  # another process, another run
        assert (
            verification.Verifier(again).count([(2, 1), *PAIRS]) == {(2, 1): first[(1, 2)]} | first
        )
    assert described == []


def test_a_changed_file_is_verified_again(three, described):
    before = verification.Verifier(three).count(PAIRS)
    photos = three.root.parent / "photos"
    rec = record(photos, "a_crop.jpg", textured320(9))  # the same name, other content
    three.db.write([(rec, three.index.reconstruct(np.array([2]))[0])])
    described.clear()
    after = verification.Verifier(three).count(PAIRS)
    assert len(described) == 3  # pairs (1, 2) and (2, 3) are new contents: all three read
    assert after[(1, 3)] == before[(1, 3)]
    assert after[(1, 2)] < verification.MIN_MATCHES <= before[(1, 2)]


def test_a_reader_that_cannot_get_the_lock_still_gets_results(three, monkeypatch):
    waits = []
    writing = three.writing

    def spy(timeout=None):
        waits.append(timeout)
        return writing(timeout)

    monkeypatch.setattr(three, "writing", spy)
    other_process = filelock.FileLock(three.root / ".write.lock")  # its own file handle
    with other_process.acquire(timeout=0):
        verifier = verification.Verifier(three)
        got = verifier.count(PAIRS)
        assert (verifier.saved, verifier.skipped) == (0, 3)
        assert cached_rows(three) == 0
    assert waits == [0]  # tried the lock once, without waiting
    assert got[(1, 2)] >= verification.MIN_MATCHES
    verifier = verification.Verifier(three)
    assert verifier.count(PAIRS) == got  # the lock is free now: computed again and saved
    assert verifier.saved == 3 and cached_rows(three) == 3


def test_duplicates_answers_while_another_process_writes(tmp_path):
    """GET /duplicates' function: the crop (cosine 0.8, under the threshold) is joined by
    verified features though the writer lock is held elsewhere; nothing is cached then."""
    from lookalike.dedupe.grouping import duplicates

    a = textured320(1)
    images = {"a.jpg": a, "a_crop.jpg": crop(a), "b.jpg": textured320(2)}
    store = make_store(tmp_path, images, [[1, 0, 0, 0], [0.8, 0.6, 0, 0], [0, 0, 1, 0]])
    with filelock.FileLock(store.root / ".write.lock").acquire(timeout=0):
        got = duplicates(store, threshold=0.95)
        assert cached_rows(store) == 0
    (group,) = got["groups"]
    assert [m["path"] for m in group["members"]] == ["a.jpg", "a_crop.jpg"]
    assert group["members"][1]["link"] == "verified"
    assert duplicates(store, threshold=0.95) == got  # the lock is free: computed and saved
    assert cached_rows(store) == 1


def test_a_file_whose_bytes_are_not_its_rows_sha_is_not_cached(three):
    (three.root.parent / "photos" / "b.jpg").write_bytes(b"changed since it was indexed")
    verification.Verifier(three).count(PAIRS)
    rows = three.db.conn.execute("SELECT sha_a, sha_b FROM verified_pairs").fetchall()
    assert len(rows) == 1  # only (a, a_crop): both files still hold their rows' bytes


def test_parallel_counts_equal_serial_ones(tmp_path, monkeypatch):
    images = {}
    for n in range(5):
        img = textured320(10 + n)
        images[f"p{n}.jpg"] = img
        images[f"p{n}_crop.jpg"] = crop(img, 0.7 + 0.05 * n)
    store = make_store(tmp_path, images)
    ids = range(1, len(images) + 1)
    pairs = [(a, b) for a in ids for b in ids if a < b]
    # tiny chunks and a tiny feature budget: photos are freed and read again on the way
    monkeypatch.setattr(verification, "CHUNK_PAIRS", 3)
    monkeypatch.setattr(verification, "HELD_PHOTOS", 2)
    serial = verification.Verifier(store, workers=1).count(pairs)
    store.db.conn.execute("DELETE FROM verified_pairs")
    parallel = verification.Verifier(store, workers=4).count(pairs)
    assert parallel == serial
    # with room for them, each photo is described once however small the chunks
    monkeypatch.setattr(verification, "HELD_PHOTOS", 1000)
    store.db.conn.execute("DELETE FROM verified_pairs")
    calls = []
    real = verification.describe
    monkeypatch.setattr(verification, "describe", lambda data: calls.append(1) or real(data))
    assert verification.Verifier(store, workers=4).count(pairs) == serial
    assert len(calls) == len(images)
    records = store.db.get_many(ids)
    photos = tmp_path / "photos"

    def direct(a, b):  # in the cache's order: the smaller sha256 first
        ra, rb = sorted((records[a], records[b]), key=lambda r: r.sha256)
        return verification.matches(
            verification.features(photos / ra.path), verification.features(photos / rb.path)
        )

    assert serial == {p: direct(*p) for p in pairs}
    assert sum(n >= verification.MIN_MATCHES for n in serial.values()) >= 5


def test_a_read_only_store_of_an_older_version_verifies_without_a_cache(tmp_path):
    a = textured320(1)
    store = make_store(tmp_path, {"a.jpg": a, "a_crop.jpg": crop(a)})
    store.db.conn.execute("DROP TABLE verified_pairs")  # made before the cache existed ...
    store.db.readonly = True  # ... and opened read-only (root can write anywhere: faked)
    verifier = verification.Verifier(store)
    assert verifier.count([(1, 2)])[(1, 2)] >= verification.MIN_MATCHES
    assert verifier.saved == 0 and verifier.skipped == 1
