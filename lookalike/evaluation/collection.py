"""What every eval scores: a store's images with their stored vectors, the rankers (lookalike's
own search and the baselines) over them, and the store to score (given, or trained on PHOTOS)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..engine import MAX_K, Engine
from ..errors import InvalidArgumentError
from ..store import Store
from .baselines import (
    RAW_PIXELS_SIZE,
    DenseRanker,
    HammingRanker,
    phash_codes,
    raw_pixel_vectors,
)

ProgressFn = Callable[[str, int, int], None]

QUERY_CHUNK = 512  # queries per search call
NOTES = [
    "pretrained CNN baseline left out: its weights cannot be downloaded on this machine",
    f"raw_pixels: {RAW_PIXELS_SIZE}x{RAW_PIXELS_SIZE} RGB thumbnails from "
    "lookalike.images.load_image, each minus its own mean, cosine",
    "phash: imagehash.phash (64 bits) of each file, Hamming distance (its scores and thresholds "
    "are minus the distance), ties by path",
]


# -- the images of a store --------------------------------------------------------------------
@dataclass
class Collection:
    """A store's images in path order, with the vectors lookalike stored for them."""

    ids: np.ndarray  # (n,) int64 store ids
    paths: list[str]  # relative to PHOTOS ('/' separated), or @uploads/<name>
    files: list[Path]
    vectors: np.ndarray  # (n, d) float32 unit rows, as in the index

    def __len__(self) -> int:
        return len(self.ids)


def load_collection(store: Store) -> Collection:
    """Every image of the store with its stored embedding, sorted by path."""
    by_id = {rec.id: rec.path for rec in store.db.records()}
    ids, vecs = [], []
    for chunk_ids, chunk_vecs in store.embeddings():
        ids.append(chunk_ids)
        vecs.append(chunk_vecs)
    if not ids:
        raise InvalidArgumentError(f"store {store.root} holds no images")
    all_ids, all_vecs = np.concatenate(ids), np.concatenate(vecs)
    order = sorted(range(len(all_ids)), key=lambda i: by_id[int(all_ids[i])])
    paths = [by_id[int(all_ids[i])] for i in order]
    return Collection(all_ids[order], paths, [store.file_path(p) for p in paths], all_vecs[order])


class EngineRanker:
    """lookalike's own answers: Engine.search_vectors with each stored vector, itself excluded."""

    name = "lookalike"

    def __init__(self, engine: Engine, coll: Collection):
        self.engine, self.coll = engine, coll
        self.position = {int(i): n for n, i in enumerate(coll.ids)}

    def __len__(self) -> int:
        return len(self.coll)

    def neighbours(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, m') collection indices (-1 pads a short list) and cosine scores."""
        m = max(1, min(m, len(self) - 1, MAX_K))
        hits = self.engine.search_vectors(
            self.coll.vectors[queries], m, exclude=[int(i) for i in self.coll.ids[queries]]
        )
        idx = np.full((len(queries), m), -1, np.int64)
        scores = np.full((len(queries), m), -np.inf)
        for row, row_hits in enumerate(hits):
            for col, hit in enumerate(row_hits):
                idx[row, col] = self.position[hit.id]
                scores[row, col] = hit.score
        return idx, scores


def all_rankers(engine: Engine, coll: Collection, timings: dict[str, float]) -> Iterator:
    """lookalike, then the baselines; feature extraction time goes into timings."""
    yield EngineRanker(engine, coll)
    t0 = time.perf_counter()
    raw = DenseRanker("raw_pixels", raw_pixel_vectors(coll.files))
    timings["raw_pixels_features"] = time.perf_counter() - t0
    yield raw
    t0 = time.perf_counter()
    phash = HammingRanker("phash", phash_codes(coll.files))
    timings["phash_features"] = time.perf_counter() - t0
    yield phash


def query_chunks(indices: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), QUERY_CHUNK):
        yield indices[start : start + QUERY_CHUNK]


# -- stores -----------------------------------------------------------------------------------
@contextmanager
def store_for(
    photos: Path,
    store: Path | None,
    model: ModelConfig | None,
    progress: ProgressFn | None,
    info: dict[str, Any],
) -> Iterator[Store]:
    """The given store (which must index PHOTOS), or a temporary one trained on PHOTOS."""
    from ..indexer import index_folder

    photos = Path(photos).expanduser().resolve()
    if not photos.is_dir():
        raise InvalidArgumentError(f"photos folder not found: {photos}")
    if store is not None:
        st = Store.open(store)
        try:
            if st.photos_root is None or st.photos_root.resolve() != photos:
                raise InvalidArgumentError(
                    f"store {st.root} indexes {st.photos_root}, not {photos}; pass the store "
                    "of PHOTOS, or leave --store out to train a temporary one"
                )
            info.update(store=str(st.root), trained=False)
            yield st
        finally:
            st.close()
        return
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as tmp:
        report = index_folder(photos, Path(tmp) / "store", model=model, progress=progress)
        info.update(
            store=None,
            trained=True,
            index_seconds=round(report.seconds, 2),
            train_seconds=round(report.train_seconds, 2),
            skipped_files=len(report.failed),
        )
        with Store.open(Path(tmp) / "store") as st:
            yield st


def finish_report(report: dict[str, Any], started: float) -> dict[str, Any]:
    report["seconds"] = {k: round(v, 2) for k, v in report["seconds"].items()}
    report["seconds"]["total"] = round(time.perf_counter() - started, 2)
    return report
