"""Command line: each command parses its flags and calls one library function."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .cli_common import (
    CONTEXT,
    JsonOpt,
    Phases,
    StoreOpt,
    err,
    errors_to_exit,
    fail,
    out,
    print_error,
    progress_bar,
)
from .dedupe.cli import dedupe  # no TensorFlow at import time
from .errors import LookalikeError
from .evaluation.cli import eval_app  # no TensorFlow at import time
from .version import __version__

app = typer.Typer(
    help="Look-alike photo search and deduplication, trained on your own photos.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
)
app.add_typer(eval_app, name="eval")


class IndexType(str, Enum):
    """--index-type: the FAISS index a store keeps."""

    auto = "auto"  # flat below lookalike.index.knn.AUTO_IVF_THRESHOLD images, ivf above
    flat = "flat"  # exact search
    ivf = "ivf"  # approximate search, recall measured when built


# `index` phases as the summary line names them: stages of the progress callbacks -> phase
PHASE_OF = {"decode": "train", "whitening": "train", "merge": "embed"}


def _version(value: bool) -> None:
    if value:
        print(f"lookalike {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


PhotosArg = Annotated[
    str,
    typer.Argument(
        metavar="PHOTOS",
        help="Folder of photos (walked recursively), or a bucket prefix: s3://BUCKET/PREFIX, "
        'gs://BUCKET/PREFIX (needs pip install "lookalike\\[s3]" or "lookalike\\[gcs]").',
    ),
]
EpochsOpt = Annotated[
    int | None, typer.Option(help="Training epochs (default: from the training budget).")
]
BatchOpt = Annotated[int | None, typer.Option(help="Training batch size.")]
ImageSizeOpt = Annotated[
    int | None, typer.Option(help="Model input side, pixels (multiple of 16).")
]
LatentOpt = Annotated[int | None, typer.Option(help="Embedding dimension.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed: same seed, same model.")]
BudgetOpt = Annotated[
    float | None,
    typer.Option(
        min=0.01,
        help="Training budget (samples and time cap) as a multiple of the default's, "
        "e.g. 0.5: quicker, 2: twice the samples and time.",
    ),
]
IndexTypeOpt = Annotated[
    IndexType,
    typer.Option(help="flat: exact; ivf: approximate; auto: flat below 200,000 images."),
]
RetrainOpt = Annotated[bool, typer.Option(help="Train a new model even if the store has one.")]
LabelsOpt = Annotated[
    str | None,
    typer.Option(
        metavar="folders|CSV",
        help="'folders': each photo's folder name is its label; or a CSV file of path,labels rows.",
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="[ADDRESS]",
        help="Embed on a Ray cluster at ADDRESS (e.g. auto, ray://head:10001); bare --ray "
        'starts a local one. Needs pip install "lookalike\\[ray]".',
    ),
]
RayWorkersOpt = Annotated[
    int | None,
    typer.Option(min=1, help="Embedding actors with --ray (default: the cluster's CPUs - 1)."),
]
PruneOpt = Annotated[
    bool,
    typer.Option(
        help="Allow removing more than half of the stored photos (refused by default: an "
        "empty or wrong folder must not wipe the store)."
    ),
]


@app.command()
def index(
    photos: PhotosArg,
    store: StoreOpt,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    image_size: ImageSizeOpt = None,
    latent_dim: LatentOpt = None,
    seed: SeedOpt = None,
    train_budget: BudgetOpt = None,
    index_type: IndexTypeOpt = IndexType.auto,
    retrain: RetrainOpt = False,
    labels: LabelsOpt = None,
    ray: RayOpt = None,
    ray_workers: RayWorkersOpt = None,
    prune: PruneOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the autoencoder if needed, embed new and changed photos, update the index."""
    from .config import IndexOptions, RayOptions
    from .indexer import index_folder

    with errors_to_exit():
        overrides = dict(
            epochs=epochs,
            batch_size=batch_size,
            image_size=image_size,
            embedding_dim=latent_dim,
            seed=seed,
        )
        model = _model_to_train(store, overrides, train_budget, retrain)
        options = IndexOptions(
            index_type=index_type.value, retrain=retrain, labels=labels, prune=prune
        )
        phases = Phases()
        with progress_bar(sys.stderr.isatty() or not as_json, phases) as progress:
            report = index_folder(
                photos,
                store,
                model=model,
                options=options,
                progress=progress,
                ray=RayOptions(address=ray, workers=ray_workers) if ray is not None else None,
            )
    if as_json:
        phase_s = {k: round(v, 3) for k, v in phase_seconds(phases.seconds()).items()}
        print(json.dumps(report.to_dict() | {"phase_seconds": phase_s}))
        return
    _print_index_report(report, phases.seconds())


def _model_to_train(store: Path, overrides: dict, train_budget: float | None, retrain: bool):
    """The ModelConfig a training of this store would use: the store's own (or the default for
    a new store) with the flags given; a note where the flags cannot apply."""
    from .config import ModelConfig
    from .store import Store, is_trained_store

    base = ModelConfig()
    trained = is_trained_store(store)
    if trained:
        with Store.open(store) as st:
            base = st.model_config()
    model = base.replace(**overrides)
    if train_budget is not None:
        model = model.with_budget(train_budget)
    flags = [*overrides.values(), train_budget]
    if any(v is not None for v in flags) and trained and not retrain:
        err.print("note: model flags apply when training; add --retrain to train anew")
    return model


def _print_index_report(report, seconds: dict[str, float]) -> None:
    """One line of counts, one of phase times, and the files skipped (on stderr)."""
    out.print(
        f"{report.images} images indexed: {report.added} added, {report.updated} updated, "
        f"{report.removed} removed, {report.unchanged} unchanged"
        + (f" ({report.reembedded} re-embedded)" if report.reembedded else "")
        + (f"; model trained in {report.train_seconds:.1f} s" if report.trained else "")
        + f"; {report.seconds:.1f} s in all",
        soft_wrap=True,  # one line, as scripts that read it expect
    )
    out.print(phase_line(seconds), highlight=False, soft_wrap=True)
    if report.failed:
        err.print(f"{len(report.failed)} files skipped:")
        for f in report.failed:
            err.print(f"  {f.path}: {f.error}", highlight=False, markup=False)


def phase_seconds(seconds: dict[str, float]) -> dict[str, float]:
    """Seconds of each progress stage -> seconds of each phase (scan, train, embed, ...)."""
    phases: dict[str, float] = {}
    for stage, s in seconds.items():
        name = PHASE_OF.get(stage, stage)
        phases[name] = phases.get(name, 0.0) + s
    return phases


def phase_line(seconds: dict[str, float]) -> str:
    """`time: scan 0.2 s, train 95.1 s, ...` from the seconds of each progress stage."""
    phases = phase_seconds(seconds)
    return "time: " + ", ".join(f"{name} {s:.1f} s" for name, s in phases.items())


def query_files(queries: list[Path]) -> tuple[list[Path], int]:
    """Each query argument's image files (a file as given, a folder walked recursively), and
    how many arguments were refused.

    Checked before any model loads: a missing path or a folder without images is reported at
    once, `error: ...` on stderr, and the others still run; with none left, the command exits 1.
    """
    from .images import find_images

    files: list[Path] = []
    refused = 0
    for query in queries:
        if not query.exists():
            print_error(f"no such file or folder: {query}")
            refused += 1
            continue
        found = list(find_images(query)) if query.is_dir() else [query]
        if not found:
            print_error(
                f"no images found in {query} (looked for .jpg, .png, .webp, .gif, .bmp, .tif)"
            )
            refused += 1
        files += found
    if not files:
        raise typer.Exit(1)
    return files, refused


@app.command()
def search(
    queries: Annotated[list[Path], typer.Argument(help="Image files or folders to query with.")],
    store: StoreOpt,
    k: Annotated[
        int, typer.Option("-k", "--k", min=1, max=1000, help="Neighbours per query.")
    ] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Print the k most similar stored photos of each query image."""
    from .engine import Engine
    from .images import read_file

    files, failed = query_files(queries)
    with errors_to_exit():
        engine = Engine.open(store)
        for path in files:
            try:
                hits = engine.search_bytes(read_file(path), k)
            except LookalikeError as exc:
                err.print(f"{path}: {exc}", highlight=False, markup=False)
                failed += 1
                continue
            label = str(path)
            if as_json:
                print(json.dumps({"query": label, "results": [h.to_dict() for h in hits]}))
                continue
            table = Table(title=escape(label), title_justify="left", show_edge=False)
            table.add_column("rank", justify="right")
            table.add_column("score", justify="right")
            table.add_column("path", overflow="fold")
            with_labels = any(h.labels for h in hits)
            if with_labels:
                table.add_column("labels", overflow="fold")
            for rank, h in enumerate(hits, 1):
                cells = [str(rank), f"{h.score:.4f}", escape(h.path)]
                table.add_row(*cells, *([escape(", ".join(h.labels))] if with_labels else []))
            out.print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def info(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """Describe a store: images, embedding, index, model and training, pictures, size on disk."""
    from .store import FORMAT_VERSION, METRIC, Store

    with errors_to_exit():
        with Store.open(store) as st:
            training = st.training_record()
            model_dir = st.model_dir
            data = {
                "store": str(st.root),
                "photos": str(st.photos_root) if st.photos_root else None,
                "images": len(st.db),
                "re_embedding": _re_embedding(st),
                "embedding_dim": st.info.get("embedding_dim"),
                "metric": METRIC,
                "index_type": st.info.get("index_type"),
                "ivf": {k: v for k, v in st.info["ivf"].items() if k != "sweep"}
                if st.info.get("index_type") == "ivf" and st.info.get("ivf")
                else None,
                "image_size": st.info.get("image_size"),
                "train_loss": training["loss"][training["best_epoch"] - 1] if training else None,
                "val_loss": training.get("best_val_loss"),
                "epochs": training.get("epochs_run"),
                "best_epoch": training.get("best_epoch"),
                "train_seconds": training.get("seconds"),
                "pictures": [str(p) for p in sorted(model_dir.glob("*.png"))],
                "disk_bytes": st.disk_bytes(),
                "format_version": FORMAT_VERSION,
                "versions": st.snapshot().get("versions", {}),
            }
    if as_json:
        print(json.dumps(data))
        return
    table = Table(show_header=False, show_edge=False)
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")  # long paths wrap, never end in an ellipsis
    for key, value in data.items():
        shown = info_value(key, value)
        if shown is not None:
            table.add_row(key, escape(shown))
    out.print(table)


def _re_embedding(st) -> dict | None:
    """A retrain's unfinished re-embedding: the new model's rows so far, of all."""
    serial = st.info.get("reembedding")
    if serial is None:
        return None
    return {"model": serial, "done": st.db.count(int(serial)), "of": len(st.db)}


def info_value(key: str, value) -> str | None:
    """One `info` value as a person reads it; None leaves the row out."""
    if value is None:
        return None if key in ("ivf", "re_embedding") else "-"
    if key == "re_embedding":
        return (
            f"{value['done']:,} of {value['of']:,} photos by the new model so far; searches "
            "use the previous model until `lookalike index` has embedded them all"
        )
    if key == "versions":
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if key == "pictures":
        return "\n".join(value) if value else "-"
    if key == "disk_bytes":
        return f"{value / 1e6:.1f} MB"
    if key == "ivf":
        return (
            f"nprobe {value['nprobe']}: recall@10 {value['recall_at_10']:.3f} against exact "
            f"search ({value['queries']} stored vectors)"
        )
    if key == "train_seconds":
        return _duration(value)
    if key == "images":
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"  # losses: 0.01234, not 0.01234000
    return str(value)


def _duration(seconds: float) -> str:
    """105.4 -> '1 min 45 s'; 12.34 -> '12.3 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


@app.command()
def suggest(
    queries: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    store: StoreOpt,
    k: Annotated[
        int, typer.Option("-k", "--k", min=1, max=1000, help="Neighbours that vote.")
    ] = 10,
    top: Annotated[int, typer.Option(min=1, max=100, help="Labels to suggest.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Suggest labels for each query from its k labelled look-alikes (a weighted vote)."""
    from .engine import Engine
    from .images import read_file

    files, failed = query_files(queries)
    with errors_to_exit():
        engine = Engine.open(store)
        for path in files:
            try:
                labels, hits = engine.suggest_bytes(read_file(path), k, top)
            except LookalikeError as exc:
                err.print(f"{path}: {exc}", highlight=False, markup=False)
                failed += 1
                continue
            if as_json:
                print(
                    json.dumps(
                        {
                            "query": str(path),
                            "labels": [{"label": lab, "score": round(s, 6)} for lab, s in labels],
                            "neighbours": [h.to_dict() for h in hits],
                        }
                    )
                )
            else:
                shown = ", ".join(f"{lab} ({s:.2f})" for lab, s in labels) or "(no labels)"
                out.print(f"{path}: {shown}", highlight=False, markup=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


labels_app = typer.Typer(
    help="Show and change the labels of stored images (no re-embedding).", no_args_is_help=True
)
app.add_typer(labels_app, name="labels")


@labels_app.command("set")
def labels_set(
    paths: Annotated[list[str], typer.Argument(help="Stored paths, relative to PHOTOS.")],
    store: StoreOpt,
    labels: Annotated[
        str, typer.Option("--labels", "-l", help="Labels, '|'-separated; '' clears.")
    ],
) -> None:
    """Set the labels of stored images."""
    from .labels import split_labels
    from .store import Store

    with errors_to_exit():
        with Store.open(store) as st:
            unknown = [p for p in paths if st.db.by_path(p) is None]
            if unknown:
                fail(f"not in the store: {', '.join(unknown[:5])}")
            changed = st.db.set_labels([(p, split_labels(labels)) for p in paths])
    out.print(f"labels set on {changed} images")


@labels_app.command("import")
def labels_import(
    csv_file: Annotated[Path, typer.Argument(help="CSV of `path,labels` rows.")],
    store: StoreOpt,
) -> None:
    """Read labels from a CSV into the store (also re-read by later `lookalike index` runs)."""
    from .labels import apply_labels
    from .store import Store

    with errors_to_exit():
        with Store.open(store) as st:
            source = str(csv_file.expanduser().resolve())
            changed = apply_labels(st.db, source)
            st.info["labels_source"] = source
            st.save_info()
    out.print(f"labels set on {changed} images")


@labels_app.command("show")
def labels_show(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """How many stored images carry each label."""
    from collections import Counter

    from .store import Store

    with errors_to_exit():
        with Store.open(store) as st:
            counts = Counter(lab for rec in st.db.records() for lab in rec.labels)
            unlabelled = sum(1 for rec in st.db.records() if not rec.labels)
    if as_json:
        print(json.dumps({"labels": dict(sorted(counts.items())), "unlabelled": unlabelled}))
        return
    for label, n in sorted(counts.items()):
        out.print(f"{n:>8}  {label}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"{unlabelled:>8}  (no label)", highlight=False, markup=False)


@app.command()
def serve(
    store: StoreOpt,
    host: Annotated[
        str, typer.Option(help="Interface to listen on.", envvar="LOOKALIKE_HOST")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", envvar="LOOKALIKE_PORT")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, help="Worker processes.", envvar="LOOKALIKE_WORKERS")
    ] = 1,
) -> None:
    """Serve the HTTP API and the web page (settings also from LOOKALIKE_* variables)."""
    import os

    import uvicorn

    from .store import Store

    with errors_to_exit():
        with Store.open(store) as st:
            st.model_config()  # fail fast, with one clear line, on a bad store
    os.environ["LOOKALIKE_STORE"] = str(store)
    err.print(
        f"lookalike: serving {store} on http://{host}:{port}/ (API docs at /docs)",
        highlight=False,
        markup=False,
    )
    uvicorn.run(
        "lookalike.api.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        timeout_keep_alive=5,  # s an idle connection stays open: a page's thumbnails, no more
    )


app.command()(dedupe)


RAY_LOCAL = "local"


def ray_flag_argv(argv: list[str]) -> list[str]:
    """Let `--ray` go without a value: `--ray` alone means a local Ray instance.

    The word after `--ray` is its ADDRESS only when it looks like one ("auto", "local", or
    containing ":"), so `lookalike index --ray PHOTOS --store S` keeps PHOTOS as the folder.
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--ray":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or not (nxt in ("auto", RAY_LOCAL) or ":" in nxt):
                out[-1] = f"--ray={RAY_LOCAL}"
    return out


def main() -> None:
    """Entry point of the `lookalike` command."""
    app(args=ray_flag_argv(sys.argv[1:]), prog_name="lookalike")


if __name__ == "__main__":
    main()
