"""Tests for lookalike.encoder.runtime's thread choice: a lone query gets QUERY_THREADS, queries
running at once get one thread each, batches get all cores."""

from __future__ import annotations

import threading

import numpy as np
from onnx import TensorProto, helper

from lookalike.config import ModelConfig
from lookalike.encoder import runtime
from lookalike.encoder.runtime import QUERY_THREADS, SMALL_BATCH, PortableEmbedder

SIZE = 8


def _mean_colour_model() -> bytes:
    """(n, SIZE, SIZE, 3) uint8 -> (n, 3) float32 mean colour: a model small enough to build here."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["x", "axes"], ["out"], keepdims=0),
        ],
        "mean_colour",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [None, SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def _embedder(threads: int) -> PortableEmbedder:
    return PortableEmbedder(_mean_colour_model(), ModelConfig(image_size=SIZE), threads=threads)


def test_thread_counts_by_work():
    emb = _embedder(threads=4)
    assert emb.threads_for(1, alone=True) == min(QUERY_THREADS, 4)
    assert emb.threads_for(1, alone=False) == 1
    assert emb.threads_for(SMALL_BATCH + 1, alone=False) == 4
    assert _embedder(threads=1).threads_for(1, alone=True) == 1  # never more than asked


def test_concurrent_queries_run_on_one_thread_each(monkeypatch):
    emb = _embedder(threads=4)
    pixels = np.full((1, SIZE, SIZE, 3), 7, np.uint8)
    np.testing.assert_allclose(emb(pixels), [[7, 7, 7]])  # the model works as built
    inside = threading.Barrier(2)
    used: list[int] = []
    real = emb._session

    def session(threads):  # both calls are inside __call__ before either runs its model
        used.append(threads)
        if len(used) <= 2:
            inside.wait(timeout=10)
        return real(threads)

    monkeypatch.setattr(emb, "_session", session)
    callers = [threading.Thread(target=emb, args=(pixels,)) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=20)
    assert sorted(used) == [1, min(QUERY_THREADS, 4)]  # the first alone, the second not
    emb(pixels)  # both finished: the next query is alone again
    assert used[2:] == [min(QUERY_THREADS, 4)]
    assert emb._running == 0
    assert runtime.SMALL_BATCH == SMALL_BATCH
