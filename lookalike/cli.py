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


class Keep(str, Enum):
    """dedupe --keep: which photo of a group is kept (lookalike.dedupe.keep)."""

    original = "original"  # most real detail; never an upload over a collection file
    largest = "largest"
    smallest = "smallest"
    oldest = "oldest"
    newest = "newest"
    shortest_path = "shortest-path"


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


@app.command()
def index(
    photos: Annotated[
        str,
        typer.Argument(
            metavar="PHOTOS",
            help="Folder of photos (walked recursively), or a bucket prefix: s3://BUCKET/PREFIX, "
            'gs://BUCKET/PREFIX (needs pip install "lookalike\\[s3]" or "lookalike\\[gcs]").',
        ),
    ],
    store: StoreOpt,
    epochs: Annotated[
        int | None, typer.Option(help="Training epochs (default: from the training budget).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size.")] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Model input side, pixels (multiple of 16).")
    ] = None,
    latent_dim: Annotated[int | None, typer.Option(help="Embedding dimension.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed: same seed, same model.")] = None,
    train_budget: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            help="Training budget (samples and time cap) as a multiple of the default's, "
            "e.g. 0.5: quicker, 2: twice the samples and time.",
        ),
    ] = None,
    index_type: Annotated[
        IndexType,
        typer.Option(help="flat: exact; ivf: approximate; auto: flat below 200,000 images."),
    ] = IndexType.auto,
    retrain: Annotated[
        bool, typer.Option(help="Train a new model even if the store has one.")
    ] = False,
    labels: Annotated[
        str | None,
        typer.Option(
            metavar="folders|CSV",
            help="'folders': each photo's folder name is its label; or a CSV file of "
            "path,labels rows.",
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="[ADDRESS]",
            help="Embed on a Ray cluster at ADDRESS (e.g. auto, ray://head:10001); bare --ray "
            'starts a local one. Needs pip install "lookalike\\[ray]".',
        ),
    ] = None,
    ray_workers: Annotated[
        int | None,
        typer.Option(min=1, help="Embedding actors with --ray (default: the cluster's CPUs - 1)."),
    ] = None,
    prune: Annotated[
        bool,
        typer.Option(
            help="Allow removing more than half of the stored photos (refused by default: an "
            "empty or wrong folder must not wipe the store)."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the autoencoder if needed, embed new and changed photos, update the index."""
    from .config import IndexOptions, ModelConfig, RayOptions
    from .indexer import index_folder
    from .store import Store, is_trained_store

    with errors_to_exit():
        base = ModelConfig()
        trained = is_trained_store(store)
        if trained:
            with Store.open(store) as st:
                base = st.model_config()
        overrides = dict(
            epochs=epochs,
            batch_size=batch_size,
            image_size=image_size,
            embedding_dim=latent_dim,
            seed=seed,
        )
        model = base.replace(**overrides)
        if train_budget is not None:
            model = model.with_budget(train_budget)
        options = IndexOptions(
            index_type=index_type.value, retrain=retrain, labels=labels, prune=prune
        )
        flags = [*overrides.values(), train_budget]
        if any(v is not None for v in flags) and trained and not retrain:
            err.print("note: model flags apply when training; add --retrain to train anew")
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
        phases = {k: round(v, 3) for k, v in phase_seconds(phases.seconds()).items()}
        print(json.dumps(report.to_dict() | {"phase_seconds": phases}))
        return
    out.print(
        f"{report.images} images indexed: {report.added} added, {report.updated} updated, "
        f"{report.removed} removed, {report.unchanged} unchanged"
        + (f" ({report.reembedded} re-embedded)" if report.reembedded else "")
        + (f"; model trained in {report.train_seconds:.1f} s" if report.trained else "")
        + f"; {report.seconds:.1f} s in all"
    )
    out.print(phase_line(phases.seconds()), highlight=False)
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
        out.print(f"{n:>8}  {label}", highlight=False, markup=False)
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
    err.print(f"lookalike: serving {store} on http://{host}:{port}/ (API docs at /docs)")
    uvicorn.run(
        "lookalike.api.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        timeout_keep_alive=5,  # s an idle connection stays open: a page's thumbnails, no more
    )


@app.command()
def dedupe(
    store: StoreOpt,
    threshold: Annotated[
        float | None,
        typer.Option(
            min=-1.0,
            max=1.0,
            help="Cosine at or above which photos are duplicates "
            "(default: the store's calibrated value).",
        ),
    ] = None,
    phash_max: Annotated[
        int,
        typer.Option(
            "--phash-max",
            min=-1,
            max=16,
            help="Also group photos whose perceptual hashes differ in at most this many bits "
            "(-1: cosine only).",
        ),
    ] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the groups as JSON.")] = False,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Write one row per member to this CSV file.")
    ] = None,
    html_file: Annotated[
        Path | None, typer.Option("--html", help="Write a page of thumbnails to this file.")
    ] = None,
    keep: Annotated[
        Keep,
        typer.Option(
            help="Which to keep: original (most real detail; never an upload over a "
            "collection file), largest, smallest, oldest, newest, shortest-path."
        ),
    ] = Keep.original,
    move_to: Annotated[
        Path | None, typer.Option("--move-to", help="Move the others here (under their paths).")
    ] = None,
    delete: Annotated[
        bool,
        typer.Option(
            "--delete",
            help="Delete the others: into the store's trash (STORE/trash), from where --undo "
            "puts them back until --empty-trash.",
        ),
    ] = False,
    yes: Annotated[
        bool,
        typer.Option("--yes", help="Really move, delete or empty the trash (else: dry run)."),
    ] = False,
    empty_trash: Annotated[
        bool,
        typer.Option(
            "--empty-trash",
            help="Delete the photos in the store's trash for good (with --yes), freeing space.",
        ),
    ] = False,
    against: Annotated[
        Path | None,
        typer.Option("--against", help="List files of this folder the collection already has."),
    ] = None,
    undo_last: Annotated[
        bool,
        typer.Option("--undo", help="Put back every moved file of the last clean-up."),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            help="Also group pairs under the threshold that local features verify (crops)."
        ),
    ] = True,
) -> None:
    """Group near-duplicate photos; review them, or move or delete all but one of each group."""
    from .dedupe.actions import apply_actions, pending, plan_actions, resume
    from .dedupe.grouping import BAND, calibrated_threshold, find_groups, groups_to_dict
    from .dedupe.report import write_csv, write_html
    from .errors import InvalidArgumentError
    from .photos import is_url
    from .store import Store

    if as_json and csv_file:
        fail("--json and --csv are alternatives; give one")
    if move_to and delete:
        fail("--move-to and --delete are alternatives; give one")
    if against and (move_to or delete or csv_file or html_file):
        fail("--against only lists matches; it takes no --move-to, --delete, --csv or --html")
    if undo_last and (move_to or delete or against or csv_file or html_file or yes):
        fail("--undo puts back the last clean-up; it takes no other action")
    if empty_trash and (move_to or delete or against or csv_file or html_file or undo_last):
        fail("--empty-trash empties the store's trash; it takes no other action but --yes")
    with errors_to_exit(), Store.open(store) as st:
        st.model_config()  # a clear error for a store without a model
        if (move_to or delete or undo_last) and is_url(st.photos_root):
            raise InvalidArgumentError(
                f"the photos are in {st.photos_root}: dedupe does not move or delete objects; "
                "write the keys to remove with --csv and remove them with your storage's tools"
            )
        if not empty_trash:  # groups, moves and undo need every row embedded by one model
            st.require_complete()
        if undo_last:
            return _dedupe_undo(st, as_json)
        if empty_trash:
            return _dedupe_empty_trash(st, yes, as_json)
        if yes and not (move_to or delete or empty_trash or pending(st)):
            fail("--yes confirms --move-to, --delete or --empty-trash; give one of them")
        if pending(st):
            if yes:
                done = resume(st)
                err.print(f"finished an interrupted run: {len(done.outcomes)} files")
            else:
                err.print("note: an interrupted dedupe run is pending; --yes finishes it")
        t = threshold if threshold is not None else calibrated_threshold(st)
        if t is None:
            from .dedupe.calibration import calibrate_store

            err.print("measuring this store's dedupe threshold (once per model)...")
            t = calibrate_store(st).threshold
        phash = phash_max if phash_max >= 0 else None
        if against is not None:
            return _dedupe_against(st, against, t, phash, as_json)
        from .dedupe.verification import verified_pairs

        band = BAND if threshold is None else 0.0  # the calibrated default: a second witness
        groups = find_groups(st, t, keep.value, phash, verified_pairs if verify else None, band)
        if csv_file:
            write_csv(groups, csv_file)
        if html_file:
            write_html(st, groups, t, html_file)
        actions = plan_actions(st, groups, move_to, delete) if move_to or delete else []
        report = apply_actions(st, actions) if yes else None
        if as_json:
            data = groups_to_dict(groups, t, phash)
            if move_to or delete:
                data["actions"] = _actions_json(st, actions, yes)
                data["applied"] = report.to_dict() if report else None
            print(json.dumps(data))
            return
        _print_groups(groups, t, phash)
        _print_actions(st, actions, report)


def _dedupe_undo(st, as_json: bool) -> None:
    """`dedupe --undo`: put back the last clean-up and say what came back."""
    from .dedupe.actions import undo

    done = undo(st)
    if as_json:
        print(json.dumps(done.to_dict()))
        return
    for p in done.restored:
        out.print(f"put back {p}", highlight=False, markup=False, soft_wrap=True)
    for p, why in done.failed:
        err.print(f"not put back {p}: {why}", highlight=False, markup=False)
    out.print(
        f"{len(done.restored)} files put back, {done.rows} rows restored "
        f"(run `lookalike index` for any row of an older model)"
    )


def _dedupe_empty_trash(st, yes: bool, as_json: bool) -> None:
    """`dedupe --empty-trash [--yes]`: what the trash holds; with --yes, delete it for good."""
    from .dedupe.actions import empty_trash, trash_contents

    report = empty_trash(st) if yes else trash_contents(st)
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    size = f"{report.files} files, {report.bytes / 1e6:.1f} MB in {len(report.runs)} clean-ups"
    if report.emptied:
        out.print(f"emptied the trash of {st.root}: {size} deleted for good")
    elif report.files:
        out.print(f"the trash of {st.root} holds {size}")
        out.print("dry run: nothing deleted; add --yes to delete them for good (no undo)")
    else:
        out.print(f"the trash of {st.root} is empty")


def _dedupe_against(st, against: Path, t: float, phash: int | None, as_json: bool) -> None:
    """`dedupe --against FOLDER`: the folder's files the collection already has."""
    from .dedupe.incoming import find_known
    from .engine import Engine

    known = find_known(Engine(st), against, t, phash_max=phash)
    if as_json:
        print(json.dumps(known.to_dict()))
        return
    for k in known.known:
        best = ", ".join(
            f"{p} ({s:.4f}{', a crop of this file' if p in k.crops else ''})" for p, s in k.matches
        )
        out.print(f"{k.path}  ->  {best}", highlight=False, markup=False, soft_wrap=True)
    out.print(
        f"{len(known.known)} of {known.checked} files already have a near-duplicate "
        f"(threshold {t:.4f})"
    )
    partial = sum(k.only_crops for k in known.known)
    if partial:
        out.print(f"{partial} of them the collection has only as crops: keep those files")
    for f in known.failed:
        err.print(f"  {f.path}: {f.error}", highlight=False, markup=False)


def _actions_json(st, actions: list, applied: bool) -> list[dict]:
    """The planned actions for --json: a dry run says where each file would go."""
    from .dedupe.actions import preview

    return [
        {"path": a.path, "action": "delete" if a.trash else "move"}
        | ({} if applied else {"to": str(preview(st, a))})
        for a in actions
    ]


def _print_groups(groups: list, t: float, phash: int | None) -> None:
    """The groups, one line a member, the kept one marked."""
    for number, g in enumerate(groups, 1):
        out.print(f"group {number} (kept: {g.reason})", style="bold", markup=False)
        for m in g.members:
            mark = "keep" if m.id == g.keep.id else "    "
            link = "" if m.id == g.keep.id else f" [{m.link}]"
            out.print(
                f"  {mark} {m.score:.4f} {m.width}x{m.height} {m.bytes:>10,} B  {m.path}{link}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    spare = sum(len(g.others) for g in groups)
    rule = f"threshold {t:.4f}" + (f", pHash distance <= {phash}" if phash is not None else "")
    out.print(f"{len(groups)} groups, {spare} photos besides the kept ones ({rule})")


def _print_actions(st, actions: list, report) -> None:
    """What a run did (report) or, in a dry run, what it would do."""
    from .dedupe.actions import preview

    def say(line: str) -> None:
        out.print(line, highlight=False, markup=False, soft_wrap=True)

    if report is not None:
        for o in report.outcomes:
            verb = "deleted (to the trash)" if o.action.trash and o.status == "moved" else o.status
            where = f" -> {o.to}" if o.to else (f": {o.reason}" if o.reason else "")
            say(f"{verb} {o.action.path}{where}")
        if report.skipped:
            err.print(f"{len(report.skipped)} files skipped (listed above)")
        if any(a.trash for a in actions):
            say(
                "deleted photos are in the store's trash: `--undo` puts them back, "
                "`--empty-trash --yes` frees the space"
            )
        return
    for a in actions:
        dest = preview(st, a)
        say(
            f"would delete {a.path} (to the trash: {dest})"
            if a.trash
            else f"would move {a.path} -> {dest}"
        )
    if actions:
        say("dry run: nothing changed; add --yes to do it")


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
