"""Grouping near-duplicates on hand-made vectors: no TensorFlow, no images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from lookalike.dedupe import grouping as dedupe
from lookalike.dedupe import pairs as evidence
from lookalike.dedupe.grouping import (
    FALLBACK_THRESHOLD,
    PHASH_MAX,
    default_threshold,
    find_groups,
    groups_to_dict,
)
from lookalike.dedupe.pairs import cosine_pairs, hash_links, hash_pairs, popcount
from lookalike.errors import InvalidArgumentError
from lookalike.index.knn import KnnIndex
from lookalike.index.meta import ImageRecord
from lookalike.store import Store

DIM = 8


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def near(base: np.ndarray, cos: float, axis: int) -> np.ndarray:
    """A unit vector at the given cosine from unit base, tilted towards a basis axis."""
    e = np.zeros(DIM, np.float32)
    e[axis] = 1.0
    e -= (e @ base) * base
    e /= np.linalg.norm(e)
    return unit(cos * base + np.sqrt(1 - cos**2) * e)


def make_store(tmp_path, items, index_type: str = "flat") -> Store:
    """items: (path, vector, dict of record fields) -> a store with those rows, no model."""
    store = Store.open(tmp_path / "store", create=True, photos=tmp_path / "photos")
    store.info["embedding_dim"] = DIM
    rows = []
    for n, (path, vec, extra) in enumerate(items):
        fields = dict(size=1000, mtime=100.0, sha256=f"{n:064x}", width=64, height=48)
        fields.update(extra)
        rows.append((ImageRecord(0, path, **fields), vec))
    store.db.write(rows)
    store.rebuild_index(index_type)
    return store


@pytest.fixture
def basis():
    return [unit(np.eye(DIM)[i]) for i in range(DIM)]


def paths_of(groups):
    return [[m.path for m in g.members] for g in groups]


def test_pairs_above_threshold_are_grouped_but_never_chained(tmp_path, basis):
    a = basis[0]
    b = near(a, 0.95, 1)
    c = near(b, 0.95, 2)  # cos(a, c) < 0.95: joined only through b
    items = [
        ("x/a.jpg", a, {}),
        ("x/b.jpg", b, {}),
        ("x/c.jpg", c, {}),
        ("y/d.jpg", basis[3], {}),
        ("y/e.jpg", near(basis[3], 0.5, 4), {}),  # similar, but below the threshold
        ("y/f.jpg", basis[5], {}),
    ]
    store = make_store(tmp_path, items)
    assert float(a @ c) < 0.94
    groups = find_groups(store, 0.94, keep="shortest-path")
    # c is linked to b only: it does not join a's group through b (no chains)
    assert paths_of(groups) == [["x/a.jpg", "x/b.jpg"]]
    g = groups[0]
    assert g.keep.path == "x/a.jpg" and g.members[0] == g.keep and g.keep.score == 1.0
    assert g.others[0].score == pytest.approx(0.95, abs=1e-5)
    assert g.others[0].link == "cosine"
    assert g.reason == "keep rule 'shortest-path'"
    # every member of every group is directly linked to the kept one
    groups = find_groups(store, 0.94, keep="largest")
    assert all(m.score >= 0.94 for g in groups for m in g.members)
    assert find_groups(store, 0.96) == []


def test_exact_copies_are_grouped_whatever_the_threshold(tmp_path, basis):
    items = [
        ("a.jpg", basis[0], {"sha256": "f" * 64}),
        ("b.jpg", basis[1], {"sha256": "f" * 64}),  # same bytes, odd vector (e.g. old model)
        ("c.jpg", basis[2], {}),
    ]
    store = make_store(tmp_path, items)
    assert paths_of(find_groups(store, 0.999)) == [["a.jpg", "b.jpg"]]


def test_groups_are_deterministic_whatever_the_insertion_order(tmp_path, basis):
    rng = np.random.default_rng(0)
    items = []
    for k in range(6):  # six clusters of three, plus noise
        base = unit(rng.standard_normal(DIM))
        items += [(f"c{k}/{j}.jpg", near(base, 0.97, (k + j) % DIM), {}) for j in range(2)]
        items.append((f"c{k}/base.jpg", base, {}))
    order = rng.permutation(len(items))
    first = find_groups(make_store(tmp_path / "one", items), 0.93)
    second = find_groups(make_store(tmp_path / "two", [items[i] for i in order]), 0.93)
    assert paths_of(first) == paths_of(second)
    assert paths_of(first) == sorted(paths_of(first), key=min)
    assert all(len(g.members) >= 2 for g in first)
    assert find_groups(make_store(tmp_path / "three", items), 0.93) == first


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("largest", "big.jpg"),  # most pixels
        ("smallest", "small.jpg"),
        ("oldest", "old.jpg"),
        ("newest", "new.jpg"),
        ("shortest-path", "big.jpg"),  # big, new and old tie on length: the smaller path
    ],
)
def test_keep_policies(tmp_path, basis, policy, expected):
    a = basis[0]
    items = [
        ("big.jpg", a, {"width": 4000, "height": 3000, "size": 10, "mtime": 50.0}),
        ("new.jpg", a, {"width": 100, "height": 100, "size": 500, "mtime": 900.0}),
        ("old.jpg", a, {"width": 100, "height": 100, "size": 400, "mtime": 10.0}),
        ("small.jpg", a, {"width": 10, "height": 10, "size": 900, "mtime": 60.0}),
    ]
    (group,) = find_groups(make_store(tmp_path, items), 0.9, keep=policy)
    assert group.keep.path == expected
    assert group.members[0].path == expected
    assert [m.path for m in group.members[1:]] == sorted(m.path for m in group.members[1:])


def test_largest_breaks_pixel_ties_by_bytes_then_path(tmp_path, basis):
    a = basis[0]
    items = [
        ("b.jpg", a, {"size": 900}),
        ("c.jpg", a, {"size": 900}),
        ("a.jpg", a, {"size": 100}),
    ]
    (group,) = find_groups(make_store(tmp_path, items), 0.9, keep="largest")
    assert group.keep.path == "b.jpg"


def test_bad_arguments(tmp_path, basis):
    store = make_store(tmp_path, [("a.jpg", basis[0], {})])
    with pytest.raises(InvalidArgumentError, match="keep must be one of"):
        find_groups(store, 0.9, keep="prettiest")
    with pytest.raises(InvalidArgumentError, match=r"\[-1, 1\]"):
        find_groups(store, 1.5)


def test_default_threshold_follows_the_model(tmp_path, basis):
    store = make_store(tmp_path, [("a.jpg", basis[0], {})])
    assert default_threshold(store) == FALLBACK_THRESHOLD
    store.info["dedupe_threshold"] = 0.77
    store.info["dedupe_calibration"] = {"model_serial": store.model_serial}
    assert default_threshold(store) == 0.77
    store.info["model_serial"] = store.model_serial + 1  # retrained since: not valid any more
    assert default_threshold(store) == FALLBACK_THRESHOLD


def test_groups_to_dict_shape(tmp_path, basis):
    items = [
        ("a.jpg", basis[0], {"width": 640, "height": 480, "size": 2000}),
        ("b.jpg", near(basis[0], 0.99, 1), {"width": 320, "height": 240, "size": 700}),
    ]
    groups = find_groups(make_store(tmp_path, items), 0.9)
    data = groups_to_dict(groups, 0.9)
    assert data == {
        "threshold": 0.9,
        "groups": [
            {
                "keep": "a.jpg",
                "reason": "a collection file (uploads come last); "
                "no member could be read: the largest file",
                "members": [
                    {
                        "id": groups[0].members[0].id,
                        "path": "a.jpg",
                        "score": 1.0,
                        "bytes": 2000,
                        "width": 640,
                        "height": 480,
                        "link": "kept",
                    },
                    {
                        "id": groups[0].members[1].id,
                        "path": "b.jpg",
                        "score": pytest.approx(0.99, abs=1e-5),
                        "bytes": 700,
                        "width": 320,
                        "height": 240,
                        "link": "cosine",
                    },
                ],
            }
        ],
    }


def test_small_query_chunks_give_the_same_pairs(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, DIM)).astype(np.float32)
    x[100:150] = x[:50] + 0.05 * rng.standard_normal((50, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(10, 210, dtype=np.int64)
    index = KnnIndex.build(DIM, "flat", x, ids)

    def chunks(size):
        return ((ids[s : s + size], x[s : s + size]) for s in range(0, len(ids), size))

    whole = cosine_pairs(index, chunks(1000), 0.95)
    monkeypatch.setattr(evidence, "QUERY_CHUNK", 7)
    assert cosine_pairs(index, chunks(13), 0.95) == whole
    assert all(a < b for a, b in whole)
    assert {(10 + i, 110 + i) for i in range(50)} <= whole  # the planted copies


def test_ivf_index_finds_the_planted_clusters_too():
    rng = np.random.default_rng(2)
    n, d = 3000, 32
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[2000:2300] = x[:300] + 0.1 * rng.standard_normal((300, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    flat = KnnIndex.build(d, "flat", x, ids)
    ivf = KnnIndex.build(d, "ivf", x, ids)
    exact = cosine_pairs(flat, [(ids, x)], 0.9)
    approx = cosine_pairs(ivf, [(ids, x)], 0.9)
    assert exact == {(i, 2000 + i) for i in range(300)}
    assert len(approx & exact) >= 0.95 * len(exact)


# -- pHash evidence ----------------------------------------------------------------------------
def flip(h: int, bits) -> int:
    """h (signed int64) with the given bit positions flipped, still a signed int64."""
    u = h & (2**64 - 1)
    for b in bits:
        u ^= 1 << int(b)
    return u - 2**64 if u >= 2**63 else u


def test_close_phashes_join_photos_under_the_threshold_above_a_cosine_floor(tmp_path, basis):
    h = 0x1234_5678_9ABC_DEF0
    items = [
        ("a.jpg", basis[0], {"phash": h}),
        ("b.jpg", near(basis[0], 0.87, 1), {"phash": flip(h, range(0, 60, 10))}),  # 6 bits
        ("c.jpg", basis[2], {"phash": flip(h, range(1, 24, 2))}),  # 12 bits away, cosine 0
        ("e.jpg", basis[4], {"phash": flip(h, range(0, 60, 20))}),  # 3 bits, cosine 0
        ("d.jpg", basis[3], {}),  # no pHash (an old row): cosine only
    ]
    store = make_store(tmp_path, items)
    assert max(dedupe.PHASH_COS_FLOOR, 0.9 - evidence.PHASH_BELOW) < 0.87 < 0.9
    (group,) = find_groups(store, 0.9, keep="shortest-path")
    # e is 3 bits from a but the embedding calls it a different photo: pHash alone never joins
    assert [m.path for m in group.members] == ["a.jpg", "b.jpg"]
    assert [m.phash_distance for m in group.members] == [0, 6]
    assert group.members[1].score == pytest.approx(0.87, abs=1e-5)  # still the cosine
    # the same pair under a threshold 0.05 higher: pHash alone is not enough so far below it
    assert find_groups(store, 0.93, keep="shortest-path") == []
    assert group.members[1].to_dict()["phash_distance"] == 6
    assert group.members[1].link == "phash"
    assert find_groups(store, 0.9, phash_max=None) == []  # cosine only
    assert find_groups(store, 0.9, phash_max=-1) == []
    assert paths_of(find_groups(store, 0.9, phash_max=12)) == [["a.jpg", "b.jpg"]]
    data = groups_to_dict(find_groups(store, 0.9), 0.9, PHASH_MAX)
    assert data["phash_max"] == PHASH_MAX and list(data) == ["threshold", "phash_max", "groups"]
    with pytest.raises(InvalidArgumentError, match="phash_max"):
        find_groups(store, 0.9, phash_max=17)


def brute_pairs(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    dist = popcount((hashes[:, None] ^ hashes[None, :]).ravel()).reshape(len(hashes), -1)
    i, j = np.nonzero(np.triu(dist <= max_distance, 1))
    return set(zip(i.tolist(), j.tolist()))


def planted_hashes(rng: np.random.Generator, n: int, max_flips: int) -> np.ndarray:
    """n random 64-bit hashes; every other one a copy of its predecessor with 0-max_flips
    random bits flipped, so there are pairs at every distance up to max_flips."""
    h = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    for i in range(1, n, 2):
        bits = rng.choice(64, int(rng.integers(0, max_flips + 1)), replace=False)
        h[i] = h[i - 1] ^ np.bitwise_or.reduce(np.uint64(1) << bits.astype(np.uint64), initial=0)
    return h


@pytest.mark.parametrize("max_distance", [0, 3, 10, 13, 16])
def test_banded_hash_search_equals_brute_force(max_distance, monkeypatch):
    rng = np.random.default_rng(max_distance)
    h = planted_hashes(rng, 600, max_distance + 4)
    expected = brute_pairs(h, max_distance)
    assert len(expected) > 50  # the planted pairs are there, on both sides of the limit
    monkeypatch.setattr(evidence, "PROBES_PER_CHUNK", 1000)  # many small steps, same answer
    i, j, dist = hash_pairs(h, max_distance)
    found = list(zip(i.tolist(), j.tolist()))
    assert len(found) == len(set(found))  # each pair once
    assert set(found) == expected
    np.testing.assert_array_equal(dist, popcount(h[i] ^ h[j]))


def test_hash_links_join_the_same_components_as_all_close_pairs():
    rng = np.random.default_rng(5)
    h = planted_hashes(rng, 300, 14)
    h = np.concatenate([h, h[:40], h[:5]])  # equal hashes: exact copies, blank images

    def labels(a, b) -> np.ndarray:
        graph = coo_array((np.ones(len(a)), (a, b)), shape=(len(h), len(h)))
        return connected_components(graph, directed=False)[1]

    all_a, all_b = (np.array(x, np.int64) for x in zip(*sorted(brute_pairs(h, 10))))
    ours, every = labels(*hash_links(h, 10)), labels(all_a, all_b)
    # the same partition: each component of one is one component of the other
    assert len(set(zip(ours.tolist(), every.tolist()))) == len(set(ours)) == len(set(every))
    assert len(hash_links(np.zeros(0, np.uint64), 10)[0]) == 0
