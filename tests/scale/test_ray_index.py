"""`lookalike index --ray` on a local 2-CPU Ray instance against the single-process path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_tables, photo_name, png_header_only, table_rows, write_photo

from lookalike.config import RayOptions
from lookalike.index.meta import ImageRecord
from lookalike.indexer import index_folder
from lookalike.store import Store, copy_model

ray = pytest.importorskip("ray", reason='the Ray tests need pip install "lookalike[ray]"')

SMALL = RayOptions(batch_size=8, shard_rows=8)  # several shards out of a few dozen photos


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance of 2 CPUs for the module (the size of this machine and CI)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """40 photos in two folders plus four files that must be skipped. Do not modify."""
    root = tmp_path_factory.mktemp("ray-photos")
    for seed in range(40):
        write_photo(root / photo_name(seed), seed)
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "b" / "notes.png").write_bytes(b"this is not an image")
    whole = (root / photo_name(2)).read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "bomb.png").write_bytes(png_header_only(20000, 20000))
    return root


def clone_model(trained: Path, dst: Path) -> Path:
    """A new, empty store with the trained store's model (so both paths use one model)."""
    return copy_model(trained, dst)


def failed(report) -> list[tuple[str, str]]:
    return [(str(f.path), f.error) for f in report.failed]


@pytest.fixture
def single(tmp_path, tiny_store, collection):
    """The single-process result on the collection, with tiny_store's model."""
    store = clone_model(tiny_store, tmp_path / "single")
    report = index_folder(collection, store)
    return store, report


def test_ray_path_matches_the_single_process_path(
    local_ray, tmp_path, tiny_store, collection, single
):
    store, expected = single
    out = clone_model(tiny_store, tmp_path / "ray")
    report = index_folder(collection, out, ray=SMALL)

    assert report.added == expected.added == 40
    assert failed(report) == failed(expected)
    assert {Path(p).name for p, _ in failed(report)} == {
        "empty.jpg",
        "notes.png",
        "truncated.jpg",
        "bomb.png",
    }
    assert report.ray["cpus"] == 2 and report.ray["embedded"] == 44 and report.resumed == 0
    assert_same_tables(store, out)
    assert not (out / "shards").exists()  # merged and cleared

    # the store serves the same neighbours
    with Store.open(store) as a, Store.open(out) as b:
        vecs = np.stack([v[1] for v in table_rows(store).values()][:5])
        sa, ia = a.index.search(vecs, 5)
        sb, ib = b.index.search(vecs, 5)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(sa, sb, atol=1e-5)


def test_interrupted_job_resumes_from_its_shards(
    local_ray, tmp_path, tiny_store, collection, single
):
    out = clone_model(tiny_store, tmp_path / "ray")

    def interrupt(stage, done, total):
        if stage == "embed" and done >= 16:  # two shards of 8 are on disk by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        index_folder(collection, out, ray=SMALL, progress=interrupt)
    shards = sorted((out / "shards").glob("shard-*.npz"))
    assert len(shards) >= 2
    with np.load(shards[0]) as z:
        assert len(z["pos"]) == 8 and z["embedding"].shape == (8, 16)
    assert not table_rows(out)  # nothing was merged: the table is as before

    report = index_folder(collection, out, ray=SMALL)
    done_before = 8 * len(shards)
    assert report.resumed == done_before
    assert report.ray["embedded"] == 44 - done_before  # the shards' files were not redone
    assert report.added == 40 and failed(report) == failed(single[1])
    assert_same_tables(single[0], out)
    assert not (out / "shards").exists()


KILL_AFTER_TWO_SHARDS = """
import os, signal, sys
from pathlib import Path
import ray
from lookalike.config import RayOptions
from lookalike.indexer import index_folder

photos, store, address = sys.argv[1:4]
ray.init(address=address, log_to_driver=False)

def progress(stage, done, total):
    if stage == "embed" and len(list(Path(store, "shards").glob("shard-*.npz"))) >= 2:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup of any kind

index_folder(photos, store, ray=RayOptions(batch_size=8, shard_rows=8), progress=progress)
"""


def test_driver_killed_with_sigkill_resumes(local_ray, tmp_path, tiny_store, collection, single):
    """A driver killed with SIGKILL mid-job leaves a store that opens; the next run embeds only
    what the shards lack."""
    out = clone_model(tiny_store, tmp_path / "ray")
    address = ray.get_runtime_context().gcs_address
    result = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_TWO_SHARDS, str(collection), str(out), address],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-2000:]
    shards = sorted((out / "shards").glob("shard-*.npz"))
    assert len(shards) >= 2
    in_shards = 0
    for path in shards:
        with np.load(path) as z:
            in_shards += len(z["pos"])
    with Store.open(out) as st:  # the store opens; nothing half-written is visible
        assert len(st.db) == 0

    report = index_folder(collection, out, ray=SMALL)
    assert report.resumed == in_shards
    assert report.ray["embedded"] == 44 - in_shards
    assert failed(report) == failed(single[1])
    assert_same_tables(single[0], out)


def test_shards_of_changed_files_are_not_used(local_ray, tmp_path, tiny_store, collection):
    photos = tmp_path / "photos"
    shutil.copytree(collection, photos)
    out = clone_model(tiny_store, tmp_path / "ray")

    def interrupt(stage, done, total):
        if stage == "embed" and done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        index_folder(photos, out, ray=SMALL, progress=interrupt)
    with np.load(sorted((out / "shards").glob("shard-*.npz"))[0]) as z:
        first = next(str(r) for r, e in zip(z["rel"], z["error"]) if not e)
    write_photo(photos / first, 1000)  # changed since it was embedded into the shard

    report = index_folder(photos, out, ray=SMALL)
    assert report.added == 40
    reference = clone_model(tiny_store, tmp_path / "reference")
    index_folder(photos, reference)
    # same rows; ids follow the order rows were merged in, which the redone file changed
    assert_same_tables(reference, out, ids=False)


def test_incremental_runs_on_a_ray_built_store(local_ray, tmp_path, tiny_store, collection):
    photos = tmp_path / "photos"
    shutil.copytree(collection, photos)
    out = clone_model(tiny_store, tmp_path / "ray")
    index_folder(photos, out, ray=SMALL)

    for seed in (100, 101, 102):
        write_photo(photos / "c" / f"new_{seed}.jpg", seed)
    write_photo(photos / photo_name(4), 104)  # changed content
    (photos / photo_name(5)).unlink()
    (photos / photo_name(6)).unlink()

    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    by_ray = index_folder(photos, out, ray=SMALL)
    here = index_folder(photos, reference)
    for report in (by_ray, here):
        assert (report.added, report.updated, report.removed) == (3, 1, 2)
        assert report.unchanged == 40 - 3
    assert failed(by_ray) == failed(here)
    assert_same_tables(reference, out)
    with Store.open(out) as st:
        assert len(st.index) == len(st.db) == 41


def test_two_actors_on_two_cpus_finish(local_ray, tmp_path, tiny_store, collection, single):
    """Two embedding actors on a 2-CPU instance: fractional CPUs leave room to read files."""
    out = clone_model(tiny_store, tmp_path / "ray")
    result = {}

    def run():
        result["report"] = index_folder(
            collection, out, ray=RayOptions(workers=2, batch_size=8, shard_rows=8)
        )

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), "the 2-actor Ray job did not finish within 5 minutes"
    report = result["report"]
    assert report.ray["actors"] == 2 and report.ray["actor_cpus"] == 0.5
    assert_same_tables(single[0], out)


def test_ivf_built_in_parts_on_ray_matches_one_build(local_ray, tmp_path):
    """The IVF index filled chunk by chunk by Ray tasks and merged searches like one built here."""
    from lookalike.scale.ray_index import build_ivf_on_ray

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 16))
    n = 4000
    vectors = centres[rng.integers(0, 50, n)] + 0.3 * rng.normal(size=(n, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    dirs = []
    for name in ("ray", "here"):
        st = Store.open(tmp_path / name, create=True)
        st.info["embedding_dim"] = 16
        records = [ImageRecord(0, f"p{i:05d}.jpg", 1, 0.0, f"{i:064x}", 8, 8) for i in range(n)]
        st.db.write(zip(records, vectors))
        dirs.append(st)
    ray_store, here = dirs
    info = build_ivf_on_ray(ray_store, "ivf", RayOptions(index_tasks=2), lambda *a: None, chunk=700)
    here.rebuild_index("ivf")
    assert info["type"] == "ivf" and info["nlist"] == here.index.index.nlist
    assert info["queries"] == 1000 and info["recall_at_10"] >= 0.98  # the target
    assert info["nprobe"] == here.index.index.nprobe == here.info["ivf"]["nprobe"]
    assert ray_store.info["ivf"] == here.info["ivf"]
    queries = vectors[:50]
    sa, ia = ray_store.index.search(queries, 10)
    sb, ib = here.index.search(queries, 10)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, atol=1e-5)
    # reopened from disk, incremental changes work on it
    ray_store.close()
    from typer.testing import CliRunner

    from lookalike.cli import app

    shown = CliRunner().invoke(app, ["info", "--store", str(tmp_path / "ray"), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["ivf"]["nprobe"] == info["nprobe"]
    with Store.open(tmp_path / "ray") as st:
        assert st.index.index_type == "ivf" and len(st.index) == n
        assert st.remove_images([1, 2, 3]) == 3
        assert len(st.index) == n - 3
    here.close()


def test_cli_ray_flag(local_ray, tmp_path, tiny_store, collection, single):
    from typer.testing import CliRunner

    from lookalike.cli import app, ray_flag_argv

    out = clone_model(tiny_store, tmp_path / "ray")
    args = ray_flag_argv(["index", str(collection), "--store", str(out), "--ray", "--json"])
    assert "--ray=local" in args
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["added"] == 40 and len(report["failed"]) == 4 and report["ray"]["cpus"] == 2
    assert_same_tables(single[0], out)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["index", "P", "--ray"], ["index", "P", "--ray=local"]),
        (["index", "--ray", "P", "--store", "S"], ["index", "--ray=local", "P", "--store", "S"]),
        (["index", "P", "--ray", "auto"], ["index", "P", "--ray", "auto"]),
        (["index", "P", "--ray", "ray://head:10001"], ["index", "P", "--ray", "ray://head:10001"]),
        (["index", "P", "--ray", "--json"], ["index", "P", "--ray=local", "--json"]),
        (["index", "P", "--ray=10.0.0.1:6379"], ["index", "P", "--ray=10.0.0.1:6379"]),
    ],
)
def test_ray_flag_takes_an_optional_address(argv, expected):
    from lookalike.cli import ray_flag_argv

    assert ray_flag_argv(argv) == expected


@pytest.mark.parametrize(
    "cpus, workers, expected",
    [
        (2, None, (1, 1.0, 2)),  # one actor; one CPU left for reading
        (2, 2, (2, 0.5, 1)),  # two actors share one CPU: the 2-CPU hang cannot happen
        (16, None, (15, 1.0, 1)),
        (1, None, (1, 0.5, 1)),
        (8, 2, (2, 1.0, 4)),
    ],
)
def test_pool_size_leaves_a_cpu_for_reading(cpus, workers, expected):
    from lookalike.scale.ray_index import pool_size

    n, per_actor, threads = pool_size(cpus, workers)
    assert (n, per_actor, threads) == expected
    assert n * per_actor <= max(cpus - 1, 0.5)


def test_ray_is_not_imported_without_the_flag(tmp_path, tiny_store, photos_dir):
    out = clone_model(tiny_store, tmp_path / "store")
    code = (
        "import sys\n"
        "from lookalike.indexer import index_folder\n"
        "from lookalike.engine import Engine\n"
        f"index_folder({str(photos_dir)!r}, {str(out)!r})\n"
        f"Engine.open({str(out)!r})\n"
        "print('ray' in sys.modules, any(m.startswith('lookalike.scale') for m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_unreachable_cluster_is_a_clear_error():
    """ray.init waits minutes for a cluster that is not there; lookalike says so at once."""
    from lookalike.errors import InvalidArgumentError
    from lookalike.scale.ray_index import check_reachable

    with pytest.raises(InvalidArgumentError, match="no Ray cluster answers at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1")
    with pytest.raises(InvalidArgumentError, match="ray://127.0.0.1:1"):
        check_reachable("ray://127.0.0.1:1")
    check_reachable("auto")  # resolved by Ray itself


def test_ray_decoding_keeps_the_decode_memory_limit(tmp_path):
    """decode_batch (the Ray tasks' decoding) skips what the single-process path skips: an image
    whose decode would hold more than max_decode_bytes is an error row, not pixels."""
    from lookalike.scale.ray_index import decode_batch

    path = write_photo(tmp_path / "a.jpg", 1)
    size, mtime = path.stat().st_size, path.stat().st_mtime
    batch = {
        "pos": np.array([0]),
        "rel": np.array(["a.jpg"]),
        "path": np.array([str(path)]),
        "size": np.array([size]),
        "mtime": np.array([mtime]),
    }
    fine = decode_batch(batch, 32, 10**8)
    assert fine["error"][0] == "" and fine["pixels"].any()
    refused = decode_batch(batch, 32, 10**8, max_bytes=1_000)
    assert "memory" in refused["error"][0] or "bytes" in refused["error"][0], refused["error"][0]
    assert not refused["pixels"].any()
