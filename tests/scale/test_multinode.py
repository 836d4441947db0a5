"""`lookalike index --ray` on a Ray cluster of several nodes on this machine
(ray.cluster_utils.Cluster: one raylet per node, each with its own CPUs): embedding actors on
every node, shards merged in collection order, a worker node lost mid-run."""

from __future__ import annotations

import pytest
from conftest import assert_same_tables, photo_name, write_photo

from lookalike.config import RayOptions
from lookalike.indexer import index_folder
from lookalike.store import copy_model

ray = pytest.importorskip("ray", reason='the Ray tests need pip install "lookalike[ray]"')

pytestmark = pytest.mark.slow  # starts a cluster of three nodes: about a minute on 2 CPUs

PHOTOS = 48
# three actors of 0.667 CPU, one a node; decoding tasks of 0.333 CPU beside them
OPTS = RayOptions(workers=3, batch_size=4, shard_rows=8)


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes of 1 CPU each, and this driver connected to them."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    # the pool starts every actor before the first batch: a node whose actor starts late under
    # load would otherwise find all batches taken and embed nothing
    from ray.data import DataContext

    context = DataContext.get_current()
    waited, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 300
    yield c, workers
    context.wait_for_min_actors_s = waited
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode-photos")
    for seed in range(PHOTOS):
        write_photo(root / photo_name(seed), seed)
    return root


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_store, photos):
    """The store the single-process path makes of the same photos with the same model."""
    store = copy_model(tiny_store, tmp_path_factory.mktemp("single") / "store")
    report = index_folder(photos, store)
    assert report.images == PHOTOS and not report.failed
    return store


def test_actors_embed_on_every_node(cluster, tmp_path, tiny_store, photos, single):
    c, _ = cluster
    store = copy_model(tiny_store, tmp_path / "store")
    report = index_folder(photos, store, ray=OPTS)
    assert report.images == PHOTOS and not report.failed
    assert report.ray["cpus"] == 3.0 and report.ray["actors"] == 3
    nodes = report.ray["nodes"]
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 3 and set(nodes) == alive, nodes
    assert sum(nodes.values()) == PHOTOS
    assert_same_tables(single, store, facts=False)


def test_a_node_lost_mid_run_still_gives_the_same_store(
    cluster, tmp_path, tiny_store, photos, single
):
    c, workers = cluster
    lost = workers[-1]
    store = copy_model(tiny_store, tmp_path / "store")
    removed = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "embed" and done >= PHOTOS // 2 and not removed:  # every actor has worked
            c.remove_node(lost)  # its raylet, actors and tasks die at once
            removed.append(done)

    try:
        report = index_folder(photos, store, ray=OPTS, progress=progress)
        resumed = None
    except Exception as exc:  # the job may give up on the lost node: a rerun resumes it
        print(f"first run failed after the node was removed: {type(exc).__name__}: {exc}")
        report = resumed = index_folder(photos, store, ray=OPTS)
    assert removed, "the node was never removed: the run finished before half the rows"
    assert report.images == PHOTOS and not report.failed
    if resumed is None:
        assert lost.node_id in report.ray["nodes"]  # it embedded rows before it was lost
    else:
        assert resumed.resumed > 0  # the shards written before the loss were used
    assert_same_tables(single, store, facts=False)
    assert lost.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
