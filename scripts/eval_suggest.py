"""Issue 8's measurement: label suggestion by look-alikes, k-fold cross-validated.

    python scripts/eval_suggest.py [--photos ../shared/datasets/intel_scenes/images] [--folds 5]
    python scripts/eval_suggest.py --photos SMALL --epochs 1 --tiny        # smoke

Labels are the first folder under PHOTOS. The labelled files are split into seeded, stratified
folds; for each fold, the other folds are linked into a scratch folder, trained on and indexed
with `--labels folders` (lookalike.indexer.index_folder), and every held-out file is sent to
Engine.suggest_bytes (k neighbours, similarity-weighted vote). top-1 / top-3 accuracy: the share
of held-out files whose label is the first / among the first three suggested (no suggestion
counts as a miss). Beside it, on the same folds: the majority class of the training folds, and a
raw-pixel kNN (16x16 thumbnails via lookalike.images.load_image, mean-centred, cosine, the same
lookalike.labels.vote). Prints a markdown table (mean ± sample std over folds) and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = HERE.parent / "shared" / "datasets" / "intel_scenes" / "images"
TINY_MODEL = dict(image_size=32, filters=(8, 16, 16, 16), code_channels=4, embedding_dim=16)
METHODS = ("lookalike", "raw_pixels", "majority")


def labelled_files(photos: Path) -> tuple[list[Path], list[str]]:
    """Files under PHOTOS/<label>/..., and their labels (top-level files are left out)."""
    from lookalike.images import find_images
    from lookalike.labels import folder_label

    files, labels = [], []
    for path in find_images(photos):
        label = folder_label(path.relative_to(photos).as_posix())
        if label:
            files.append(path)
            labels.append(label[0])
    return files, labels


def stratified_folds(labels: list[str], n_folds: int, seed: int) -> np.ndarray:
    """(n,) fold of each item: each label's items shuffled (seeded) and dealt round-robin.

    The dealing continues from label to label, so fold sizes differ by at most one.
    """
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), np.int64)
    start = 0
    for label in sorted(set(labels)):
        members = np.flatnonzero(np.array(labels) == label)
        members = members[rng.permutation(len(members))]
        fold[members] = (start + np.arange(len(members))) % n_folds
        start += len(members)
    return fold


def link_tree(files: list[Path], photos: Path, dst: Path) -> None:
    """Mirror files under dst at their paths relative to photos (symlinks, else copies)."""
    for src in files:
        link = dst / src.relative_to(photos)
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(src, link)
        except OSError:
            shutil.copyfile(src, link)


def hits(suggested: list[list[str]], truth: list[str]) -> dict[str, float]:
    """top-1 and top-3 accuracy of ranked label suggestions."""
    n = max(1, len(truth))
    return {
        "top1": sum(s[:1] == [t] for s, t in zip(suggested, truth)) / n,
        "top3": sum(t in s[:3] for s, t in zip(suggested, truth)) / n,
    }


def raw_pixel_suggestions(
    train_vecs: np.ndarray, train_labels: list[str], test_vecs: np.ndarray, k: int
) -> list[list[str]]:
    """The raw-pixel kNN's ranked labels: cosine of thumbnails, the same vote as lookalike."""
    from lookalike.labels import vote

    out = []
    for start in range(0, len(test_vecs), 512):
        sim = test_vecs[start : start + 512] @ train_vecs.T  # (q, n_train) cosine
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        for row, idx in zip(sim, top):
            ranked = vote((((train_labels[j],), row[j]) for j in idx), top=3)
            out.append([label for label, _ in ranked])
    return out


def run_fold(args, files, labels, raw, fold, f: int, scratch: Path) -> dict:
    """Train and index the other folds, suggest for fold f; every method's top-1/top-3."""
    from lookalike.config import IndexOptions, ModelConfig
    from lookalike.engine import Engine
    from lookalike.images import read_file
    from lookalike.indexer import index_folder

    train = np.flatnonzero(fold != f)
    test = np.flatnonzero(fold == f)
    truth = [labels[i] for i in test]
    train_labels = [labels[i] for i in train]
    work = scratch / f"fold{f}"
    link_tree([files[i] for i in train], args.photos, work / "photos")
    base = ModelConfig(**TINY_MODEL) if args.tiny else ModelConfig()
    model = base.replace(epochs=args.epochs, seed=args.seed)
    t0 = time.perf_counter()
    report = index_folder(
        work / "photos", work / "store", model=model, options=IndexOptions(labels="folders")
    )
    index_seconds = time.perf_counter() - t0
    engine = Engine.open(work / "store")
    t0 = time.perf_counter()
    try:
        suggested = []
        for i in test:
            ranked, _ = engine.suggest_bytes(read_file(files[i]), k=args.k, top=3)
            suggested.append([label for label, _ in ranked])
    finally:
        engine.close()
    suggest_seconds = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    majority = [label for label, _ in sorted(Counter(train_labels).items(), key=_by_count)[:3]]
    scores = {
        "lookalike": hits(suggested, truth),
        "raw_pixels": hits(
            raw_pixel_suggestions(raw[train], train_labels, raw[test], args.k), truth
        ),
        "majority": hits([majority] * len(test), truth),
    }
    return {
        "fold": f,
        "train": len(train),
        "test": len(test),
        "indexed": report.images,
        "skipped": len(report.failed),
        "index_seconds": round(index_seconds, 1),
        "train_seconds": round(report.train_seconds, 1),
        "suggest_ms_per_image": round(1000 * suggest_seconds / max(1, len(test)), 2),
        "majority": majority[0],
        "scores": scores,
    }


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


def summarise(folds: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> metric -> {mean, std}: std is the sample std over folds (0 for one fold)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in METHODS:
        out[method] = {}
        for metric in ("top1", "top3"):
            values = np.array([fd["scores"][method][metric] for fd in folds])
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            out[method][metric] = {"mean": float(values.mean()), "std": std}
    return out


def markdown(summary: dict, n: int, n_folds: int, k: int) -> str:
    """The table for the README."""
    names = {
        "lookalike": f"lookalike (k={k} look-alikes, weighted vote)",
        "raw_pixels": f"raw-pixel kNN (16x16, cosine, k={k}, same vote)",
        "majority": "majority class of the training folds",
    }
    lines = [
        f"| method ({n} images, {n_folds}-fold CV) | top-1 accuracy | top-3 accuracy |",
        "|---|---|---|",
    ]
    for method in METHODS:
        s = summary[method]
        cells = [f"{s[m]['mean']:.3f} ± {s[m]['std']:.3f}" for m in ("top1", "top3")]
        lines.append(f"| {names[method]} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="PHOTOS/<label>/<file>")
    ap.add_argument("--folds", type=int, default=5, help="cross-validation folds (>= 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the folds and of training")
    ap.add_argument("-k", "--k", type=int, default=10, help="neighbours that vote")
    ap.add_argument("--epochs", type=int, help="training epochs (default: the model's budget)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke tests)")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    args.photos = args.photos.expanduser().resolve()
    if not args.photos.is_dir():
        ap.error(f"photos folder not found: {args.photos}")
    if args.folds < 2:
        ap.error("--folds must be at least 2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from lookalike.evaluation.baselines import raw_pixel_vectors

    started = time.perf_counter()
    files, labels = labelled_files(args.photos)
    counts = Counter(labels)
    if len(counts) < 2 or min(counts.values()) < args.folds:
        ap.error(f"need 2+ labels with {args.folds}+ files each under {args.photos}: {counts}")
    fold = stratified_folds(labels, args.folds, args.seed)
    raw = raw_pixel_vectors(files)
    results = []
    with tempfile.TemporaryDirectory(prefix="lookalike-cv-") as tmp:
        for f in range(args.folds):
            results.append(run_fold(args, files, labels, raw, fold, f, Path(tmp)))
            print(
                f"fold {f + 1}/{args.folds}: "
                + ", ".join(
                    f"{m} {s['top1']:.3f}/{s['top3']:.3f}" for m, s in results[-1]["scores"].items()
                )
                + f" (top-1/top-3; {results[-1]['index_seconds']:.0f} s indexing)",
                file=sys.stderr,
                flush=True,
            )
    summary = summarise(results)
    report = {
        "photos": str(args.photos),
        "images": len(files),
        "labels": dict(sorted(counts.items())),
        "folds": args.folds,
        "seed": args.seed,
        "k": args.k,
        "model": "tiny" if args.tiny else "default",
        "epochs": args.epochs,
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "summary": summary,
        "per_fold": results,
        "seconds": round(time.perf_counter() - started, 1),
        "notes": [
            "folds: each label's files shuffled with the seed and dealt round-robin (stratified)",
            "lookalike: trained and indexed on the other folds only; Engine.suggest_bytes",
            "vote: each neighbour weighs max(cosine, 0); confidence = weight of the neighbours "
            "carrying a label / weight of all k; ties by label name",
            "std: sample standard deviation over folds",
        ],
    }
    print(markdown(summary, len(files), args.folds, args.k))
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
