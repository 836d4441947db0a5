"""Ablations for the quality work (docs/quality.md): train variants, score embedding variants.

    python scripts/quality_ablation.py train NAME [--set intel|neardup|both] [--override k=v ...]
    python scripts/quality_ablation.py embed NAME [--variant ...]     # post-hoc embedding variants

`train` builds a real store with `lookalike.indexer.index_folder` (the product path) under
.bench/quality/<NAME>-<set>; `embed` reuses a trained encoder and scores embedding-side variants
(pooled levels, GeM p, whitening size and floor, flip averaging, query expansion) without
retraining. Scores here are quick in-memory numpy versions of `lookalike eval`'s metrics (p@10,
knn_top1 on intel_scenes; recall@3, recall at precision 0.95 on intel_neardup); final figures
always come from `lookalike eval`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
INTEL = SHARED / "intel_scenes" / "images"
NEARDUP = SHARED / "intel_neardup"
OUT = Path(__file__).resolve().parents[1] / ".bench" / "quality"


def parse_value(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


def train(name: str, sets: list[str], overrides: dict) -> None:
    from lookalike.config import ModelConfig
    from lookalike.indexer import index_folder

    # dataclasses.replace, not ModelConfig.replace: a null override (max_train_seconds=null)
    # must set None
    cfg = dataclasses.replace(
        ModelConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    )
    for s in sets:
        photos = INTEL if s == "intel" else NEARDUP / "images"
        store = OUT / f"{name}-{s}"
        if store.exists():
            print(f"{store} exists; skipping training")
            continue
        t = time.perf_counter()
        report = index_folder(photos, store, model=cfg)
        print(
            json.dumps(
                {
                    "name": name,
                    "set": s,
                    "train_seconds": round(report.train_seconds, 1),
                    "seconds": round(time.perf_counter() - t, 1),
                }
            )
        )


# -- metrics ---------------------------------------------------------------------------------
def retrieval_metrics(vecs: np.ndarray, labels: list[str], k: int = 10) -> dict:
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    nn = np.argsort(-sims, axis=1)[:, :k]
    lab = np.array(labels)
    rel = lab[nn] == lab[:, None]
    top1 = []
    for i in range(len(vecs)):
        votes = Counter()
        for j in nn[i]:
            votes[lab[j]] += 1 + 1e-3 * sims[i, j]
        top1.append(max(votes, key=votes.get) == lab[i])
    return {
        "p@1": float(rel[:, 0].mean()),
        "p@10": float(rel.mean()),
        "knn_top1": float(np.mean(top1)),
    }


def neardup_metrics(vecs: np.ndarray, groups: list[str]) -> dict:
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    g = np.array(groups)
    is_member = np.array([x.startswith("g") for x in groups])
    nn = np.argsort(-sims, axis=1)[:, :3]
    rec3 = [(g[nn[i]] == g[i]).sum() / 3 for i in np.flatnonzero(is_member)]
    iu = np.triu_indices(len(vecs), 1)
    s = sims[iu]
    same = (g[iu[0]] == g[iu[1]]) & is_member[iu[0]]
    order = np.argsort(-s)
    tp = np.cumsum(same[order])
    prec = tp / np.arange(1, len(order) + 1)
    ok = prec >= 0.95
    r_at_p = float(tp[ok].max() / same.sum()) if ok.any() else 0.0
    return {"recall@3": float(np.mean(rec3)), "R@P0.95": r_at_p}


# -- embedding variants ----------------------------------------------------------------------
def region_gem(m, p: float, grids: int, mode: str = "sum"):
    """R-MAC-like pooling of a (n, h, w, c) map: GeM over overlapping regions, each unit-norm.

    Grid g (1..grids) has g x g regions of side 2/(g+1) of the map (1: the whole map; 2: four
    of 2/3; 3: nine of 1/2), each GeM-pooled and L2-normalised; "sum" adds every region (small
    regions dominate, as in R-MAC), "mean" averages within a grid first (each grid weighs 1).
    """
    import tensorflow as tf

    h = int(m.shape[1])
    xp = tf.maximum(m, 1e-6) ** p
    total = None
    for g in range(1, grids + 1):
        r = round(h * 2 / (g + 1)) if g > 1 else h
        if g > 1 and r < 2:  # as RegionalGeM: no one-cell regions
            continue
        st = max(1, (h - r) // (g - 1)) if g > 1 else 1
        pooled = tf.nn.avg_pool2d(xp, r, st, "VALID") ** (1 / p)
        v = tf.math.l2_normalize(pooled, axis=-1)
        v = tf.reduce_sum(v, axis=(1, 2)) if mode == "sum" else tf.reduce_mean(v, axis=(1, 2))
        total = v if total is None else total + v
    return tf.math.l2_normalize(total, axis=1)


def level_features(
    store: Path,
    paths: list[Path],
    p: float,
    flip: bool,
    scales=(1.0,),
    grids: int = 1,
    mode: str = "sum",
):
    """GeM(p)-pooled, L2-normalised features of every encoder level, averaged over flips."""
    import keras
    import tensorflow as tf

    import lookalike.encoder.model  # noqa: F401  (registers GeMPooling)
    from lookalike.images import load_image
    from lookalike.store import Store

    st = Store.open(store)
    cfg = st.model_config()
    enc = keras.models.load_model(st.model_dir / "encoder.keras", compile=False)
    names = {layer.name for layer in enc.layers}
    outs = [
        enc.get_layer(f"conv{i}_relu" if f"conv{i}_relu" in names else f"down{i}_relu").output
        for i in range(1, len(cfg.filters) + 1)
    ]
    sub = keras.Model(enc.input, outs)
    size = cfg.image_size

    @tf.function
    def run(x):
        x = tf.cast(x, tf.float32)
        views = []
        for sc in scales:
            if sc < 1.0:
                o = (1 - sc) / 2
                n = tf.shape(x)[0]
                boxes = tf.tile([[o, o, 1 - o, 1 - o]], [n, 1])
                v = tf.image.crop_and_resize(x, boxes, tf.range(n), [size, size])
            else:
                v = x
            views += [v] + ([tf.reverse(v, axis=[2])] if flip else [])
        pooled = None
        for v in views:
            maps = sub(v, training=False)
            feats = [region_gem(m, p, grids, mode) for m in maps]
            pooled = feats if pooled is None else [a + b for a, b in zip(pooled, feats)]
        return pooled

    chunks = []
    for i in range(0, len(paths), 256):
        px = np.stack([load_image(q, size) for q in paths[i : i + 256]])
        chunks.append([f.numpy() for f in run(px)])
    return [np.concatenate([c[lv] for c in chunks]) for lv in range(len(cfg.filters))]


def whiten(f: np.ndarray, dim: int, shrink: float, power: float = 0.5) -> np.ndarray:
    mean = f.mean(0)
    c = np.cov((f - mean).T)
    w, v = np.linalg.eigh(c)
    o = np.argsort(w)[::-1]
    w, v = np.clip(w[o], 0, None), v[:, o]
    d = min(dim, len(w))
    floor = shrink * w.mean() + 1e-12
    e = (f - mean) @ (v[:, :d] / (w[:d] + floor) ** power)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def alpha_qe(vecs: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Alpha query expansion (Radenovic et al.): q' = q + sum of top-n neighbours * sim^alpha."""
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    nn = np.argsort(-sims, axis=1)[:, :n]
    w = np.clip(np.take_along_axis(sims, nn, 1), 0, None) ** alpha
    q = vecs + (w[:, :, None] * vecs[nn]).sum(1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def load_sets():
    intel = sorted(INTEL.glob("*/*.jpg"))
    intel_labels = [p.parent.name for p in intel]
    rows = list(csv.DictReader(open(NEARDUP / "groups.csv")))
    nd = [NEARDUP / "images" / r["file"] for r in rows]
    nd_groups = [r["group_id"] for r in rows]
    return intel, intel_labels, nd, nd_groups


def embed(name: str, variants: list[str], sets: tuple[str, ...] = ("intel", "neardup")) -> None:
    from lookalike.store import is_trained_store

    intel, intel_labels, nd, nd_groups = load_sets()
    cache: dict = {}
    for spec in variants:
        opts = dict(
            levels="2,3,4",
            p=3.0,
            dim=128,
            shrink=0.1,
            flip=1,
            qe=0,
            alpha=3.0,
            power=0.5,
            scales="1.0",
            grids=1,
            mode="sum",
        )
        for kv in spec.split(";") if spec else []:
            k, v = kv.split("=")
            opts[k] = type(opts[k])(v) if not isinstance(opts[k], str) else v
        levels = [int(x) - 1 for x in str(opts["levels"]).split(",")]
        row = {"name": name, "variant": spec or "default"}
        for set_name, paths, target in (("intel", intel, intel_labels), ("neardup", nd, nd_groups)):
            store = OUT / f"{name}-{set_name}"
            if set_name not in sets or not is_trained_store(store):
                continue  # not trained (yet)
            scales = tuple(float(x) for x in str(opts["scales"]).split(","))
            key = (set_name, opts["p"], opts["flip"], scales, opts["grids"], opts["mode"])
            if key not in cache:
                cache[key] = level_features(
                    store,
                    paths,
                    opts["p"],
                    bool(opts["flip"]),
                    scales,
                    opts["grids"],
                    opts["mode"],
                )
            f = np.concatenate([cache[key][lv] for lv in levels], axis=1)
            e = (
                whiten(f, opts["dim"], opts["shrink"], opts["power"])
                if opts["dim"] > 0
                else (f / np.linalg.norm(f, axis=1, keepdims=True))
            )
            if opts["qe"]:
                e = alpha_qe(e, opts["qe"], opts["alpha"])
            m = retrieval_metrics(e, target) if set_name == "intel" else neardup_metrics(e, target)
            row.update({k: round(v, 3) for k, v in m.items()})
        print(json.dumps(row), flush=True)
        with open(OUT / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("name")
    t.add_argument("--set", default="both", choices=["intel", "neardup", "both"])
    t.add_argument("--override", nargs="*", default=[])
    e = sub.add_parser("embed")
    e.add_argument("name")
    e.add_argument("--variant", nargs="*", default=[""])
    e.add_argument("--set", default="both", choices=["intel", "neardup", "both"])
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.cmd == "train":
        overrides = dict(kv.split("=", 1) for kv in args.override)
        sets = ["intel", "neardup"] if args.set == "both" else [args.set]
        train(args.name, sets, {k: parse_value(v) for k, v in overrides.items()})
    else:
        embed(args.name, args.variant, ("intel", "neardup") if args.set == "both" else (args.set,))


if __name__ == "__main__":
    main()
