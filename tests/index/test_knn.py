"""Tests for lookalike.index.knn: exact and IVF search, stable ids, checked inputs, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.errors import InvalidArgumentError
from lookalike.index.knn import (
    AUTO_IVF_THRESHOLD,
    NPROBE_SWEEP,
    KnnIndex,
    as_vectors,
    exact_neighbours,
    ivf_params,
    resolve_index_type,
    tune_nprobe,
)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, dim)))


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.35) -> np.ndarray:
    """Unit vectors drawn around `clusters` gaussian centres."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(clusters, dim)))
    which = rng.integers(0, clusters, n)
    return unit(centres[which] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim) * 4)


def brute_force(data: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    scores = queries @ data.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


# --------------------------------------------------------------------------- types


def test_resolve_index_type():
    assert resolve_index_type("auto", 0) == "flat"
    assert resolve_index_type("auto", AUTO_IVF_THRESHOLD - 1) == "flat"
    assert resolve_index_type("auto", AUTO_IVF_THRESHOLD) == "ivf"
    assert resolve_index_type("flat", 10**9) == "flat"
    assert resolve_index_type("ivf", 1) == "ivf"
    with pytest.raises(InvalidArgumentError, match="auto, flat or ivf"):
        resolve_index_type("hnsw", 10)


def test_ivf_params_grow_with_count_and_probe_at_most_all_lists():
    small, large = ivf_params(1000), ivf_params(1_000_000)
    assert small[0] < large[0]
    for nlist, nprobe in (small, large, ivf_params(0), ivf_params(1)):
        assert 1 <= nprobe <= nlist


# --------------------------------------------------------------------------- flat


def test_flat_search_is_exact():
    data = random_unit(500, 32, seed=1)
    ids = np.arange(500, dtype=np.int64) * 3 + 7  # ids unrelated to positions
    knn = KnnIndex.build(32, "flat", data, ids)
    assert knn.index_type == "flat" and len(knn) == 500 and knn.dim == 32
    queries = random_unit(20, 32, seed=2)
    scores, got = knn.search(queries, 10)
    want_scores, want = brute_force(data, ids, queries, 10)
    assert got.dtype == np.int64 and scores.shape == (20, 10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_flat_search_finds_each_vector_itself_first():
    data = random_unit(200, 16, seed=3)
    ids = np.arange(1000, 1200)
    knn = KnnIndex.build(16, "flat", data, ids)
    scores, got = knn.search(data, 1)
    np.testing.assert_array_equal(got[:, 0], ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_search_k_larger_than_index_and_empty_index():
    knn = KnnIndex.empty(8, "flat")
    scores, ids = knn.search(random_unit(3, 8), 5)
    assert scores.shape == (3, 0) and ids.shape == (3, 0)
    knn.add(random_unit(4, 8), np.arange(4))
    scores, ids = knn.search(random_unit(3, 8), 50)
    assert scores.shape == (3, 4)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3]


def test_one_dimensional_query_is_one_row():
    knn = KnnIndex.build(8, "flat", random_unit(10, 8), np.arange(10))
    scores, ids = knn.search(random_unit(1, 8)[0], 3)
    assert scores.shape == (1, 3)


# --------------------------------------------------------------------------- IVF


def test_ivf_recall_at_10_against_exact():
    dim = 64
    data = clustered(20_000, dim, 100, seed=0)
    rng = np.random.default_rng(42)
    # queries near stored points, so they fall in the same clusters
    picks = data[rng.choice(len(data), 200, replace=False)]
    queries = unit(picks + 0.05 * rng.normal(size=(200, dim)))
    ids = np.arange(len(data), dtype=np.int64) + 1
    ivf = KnnIndex.build(dim, "ivf", data, ids)
    flat = KnnIndex.build(dim, "flat", data, ids)
    assert ivf.index_type == "ivf" and len(ivf) == len(data)
    _, approx = ivf.search(queries, 10)
    _, exact = flat.search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.95, f"IVF recall@10 = {recall:.3f}"


def test_exact_neighbours_streamed_over_chunks_equals_brute_force():
    data = random_unit(1000, 16, seed=3)
    ids = np.arange(1000, dtype=np.int64) * 7
    queries = random_unit(20, 16, seed=4)
    chunks = [(ids[s : s + 130], data[s : s + 130]) for s in range(0, 1000, 130)]
    _, expected = brute_force(data, ids, queries, 10)
    np.testing.assert_array_equal(exact_neighbours(queries, chunks, 10), expected)


def test_tune_nprobe_picks_the_fewest_lists_that_reach_the_target():
    dim = 32
    data = clustered(20_000, dim, 200, seed=5)
    ids = np.arange(len(data), dtype=np.int64) + 1
    ivf = KnnIndex.build(dim, "ivf", data, ids)
    chunks = lambda: ((ids[s : s + 3000], data[s : s + 3000]) for s in range(0, len(data), 3000))  # noqa: E731
    tuned = tune_nprobe(ivf, chunks, len(data), queries=300, target=0.95)
    nprobe = tuned["nprobe"]
    assert ivf.index.nprobe == nprobe and tuned["queries"] == 300
    assert tuned["recall_at_10"] >= 0.95
    tried = list(tuned["sweep"])
    assert tried[-1] == nprobe and all(tuned["sweep"][n] < 0.95 for n in tried[:-1])
    assert nprobe in NPROBE_SWEEP or nprobe == ivf.index.nlist
    # recall measured independently at the chosen nprobe, self left out, agrees
    rng = np.random.default_rng(0)
    picks = np.sort(rng.choice(len(data), 300, replace=False))
    _, exact = brute_force(data, ids, data[picks], 11)
    _, approx = ivf.search(data[picks], 11)
    hits = sum(
        len(set(a[a != ids[p]][:10]) & set(e[e != ids[p]][:10]))
        for a, e, p in zip(approx, exact, picks)
    )
    assert abs(hits / 3000 - tuned["recall_at_10"]) <= 5e-5  # reported to 4 decimals


def test_ivf_needs_enough_training_vectors():
    with pytest.raises(InvalidArgumentError, match="training vectors"):
        KnnIndex.empty(8, "ivf", random_unit(5, 8))
    with pytest.raises(InvalidArgumentError, match="training vectors"):
        KnnIndex.empty(8, "ivf")


def test_unknown_index_type_raises():
    with pytest.raises(InvalidArgumentError, match="flat or ivf"):
        KnnIndex.empty(8, "hnsw")
    with pytest.raises(InvalidArgumentError):
        KnnIndex.build(8, "lsh", random_unit(10, 8), np.arange(10))


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_ids_are_stable_through_remove(kind):
    data = random_unit(2000, 16, seed=5)
    ids = np.arange(2000, dtype=np.int64) * 10 + 5
    knn = KnnIndex.build(16, kind, data, ids)
    gone = ids[::4]
    assert knn.remove(gone) == len(gone)
    assert knn.remove(gone) == 0  # already removed
    assert knn.remove(np.array([], np.int64)) == 0
    assert len(knn) == 2000 - len(gone)
    keep = np.setdiff1d(np.arange(2000), np.arange(2000)[::4])
    _, got = knn.search(data, 5)
    assert not set(got.ravel().tolist()) & set(gone.tolist())
    # every remaining vector still finds itself under its own id
    _, top = knn.search(data[keep], 1)
    np.testing.assert_array_equal(top[:, 0], ids[keep])
    np.testing.assert_allclose(knn.reconstruct(ids[keep[:10]]), data[keep[:10]], atol=1e-6)


def test_readding_a_removed_id_replaces_its_vector():
    data = random_unit(50, 8, seed=6)
    knn = KnnIndex.build(8, "flat", data, np.arange(50))
    new = random_unit(1, 8, seed=7)
    knn.remove(np.array([10]))
    knn.add(new, np.array([10]))
    assert len(knn) == 50
    np.testing.assert_allclose(knn.reconstruct(np.array([10])), new, atol=1e-6)
    _, top = knn.search(new, 1)
    assert top[0, 0] == 10


def test_reconstruct_empty():
    knn = KnnIndex.build(8, "flat", random_unit(5, 8), np.arange(5))
    out = knn.reconstruct(np.array([], np.int64))
    assert out.shape == (0, 8) and out.dtype == np.float32


# --------------------------------------------------------------------------- bad input


def test_bad_shapes_raise_with_a_message():
    knn = KnnIndex.build(8, "flat", random_unit(5, 8), np.arange(5))
    with pytest.raises(
        InvalidArgumentError, match=r"expected vectors of shape \(n, 8\), got \(3, 9\)"
    ):
        knn.add(random_unit(3, 9), np.arange(3))
    with pytest.raises(InvalidArgumentError, match="expected vectors of shape"):
        knn.search(np.zeros((2, 2, 8), np.float32), 1)
    with pytest.raises(InvalidArgumentError, match="expected vectors of shape"):
        knn.search(np.zeros((2, 4), np.float32), 1)
    with pytest.raises(InvalidArgumentError, match="3 vectors but 2 ids"):
        knn.add(random_unit(3, 8), np.arange(2))
    with pytest.raises(InvalidArgumentError, match="k must be"):
        knn.search(random_unit(1, 8), 0)
    with pytest.raises(InvalidArgumentError, match="expected vectors of shape"):
        KnnIndex.build(8, "flat", random_unit(5, 7), np.arange(5))
    assert len(knn) == 5  # nothing was added by the failed calls


def test_as_vectors_converts_to_contiguous_float32():
    x = np.asfortranarray(np.ones((4, 3), np.float64))
    out = as_vectors(x, 3)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (4, 3)
    assert as_vectors(np.ones(3), 3).shape == (1, 3)


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_round_trip(tmp_path, kind):
    data = random_unit(1500, 16, seed=8)
    ids = np.arange(1500, dtype=np.int64) + 100
    knn = KnnIndex.build(16, kind, data, ids)
    knn.remove(ids[:10])
    queries = random_unit(25, 16, seed=9)
    before = knn.search(queries, 7)
    path = tmp_path / "index.faiss"
    knn.save(path)
    knn.save(path)  # overwriting is fine
    assert path.exists() and not (tmp_path / "index.faiss.tmp").exists()
    loaded = KnnIndex.load(path, kind)
    assert loaded.index_type == kind and len(loaded) == len(knn) and loaded.dim == 16
    after = loaded.search(queries, 7)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    # still usable after loading: removal and adding by id
    assert loaded.remove(ids[10:20]) == 10
    loaded.add(data[:10], ids[:10])
    _, top = loaded.search(data[:10], 1)
    np.testing.assert_array_equal(top[:, 0], ids[:10])


def test_range_search_returns_everything_above_threshold():
    data = random_unit(300, 8, seed=10)
    knn = KnnIndex.build(8, "flat", data, np.arange(300))
    q = data[:2]
    lims, scores, ids = knn.range_search(q, 0.9)
    sims = q @ data.T
    for row in range(2):
        got = set(ids[lims[row] : lims[row + 1]].tolist())
        assert got == set(np.nonzero(sims[row] >= 0.9)[0].tolist())
        assert row in got
