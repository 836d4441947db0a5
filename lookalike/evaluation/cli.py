"""`lookalike eval retrieval|neardup`: parse flags, call one driver of .run, print a table or JSON.

Registered on the main app by lookalike/cli.py; shares lookalike/cli_common.py with it (no import
of the main CLI from here). TensorFlow loads only when a command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ..cli_common import CONTEXT, JsonOpt, errors_to_exit, fail, out, progress_bar

eval_app = typer.Typer(
    help="Measure retrieval and near-duplicate quality against baselines.",
    no_args_is_help=True,
    context_settings=CONTEXT,
)

PhotosArg = Annotated[Path, typer.Argument(help="Folder of photos (walked recursively).")]
EvalStoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store", "-s", help="Store of PHOTOS to evaluate; default: train a temporary one."
    ),
]
# advanced: the model a temporary store trains (tests pass a tiny one)
EpochsOpt = Annotated[int | None, typer.Option(help="Training epochs (upper bound).", hidden=True)]
ImageSizeOpt = Annotated[int | None, typer.Option(help="Model input side, pixels.", hidden=True)]
ModelConfigOpt = Annotated[
    str | None,
    typer.Option(help="ModelConfig fields as a JSON object, for training.", hidden=True),
]


def _model(model_config: str | None, epochs: int | None, image_size: int | None):
    from ..config import ModelConfig
    from ..errors import InvalidArgumentError

    base = ModelConfig()
    if model_config:
        try:
            data = json.loads(model_config)
        except ValueError as exc:
            raise InvalidArgumentError(f"--model-config is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidArgumentError("--model-config must be a JSON object of ModelConfig fields")
        base = ModelConfig.from_dict(data)
    return base.replace(epochs=epochs, image_size=image_size)


def _run(driver, **kwargs) -> dict[str, Any]:
    """Call a driver with the main CLI's progress bar and error handling."""
    with errors_to_exit():
        with progress_bar(sys.stderr.isatty()) as progress:
            return driver(progress=progress, **kwargs)


_TABLE: dict[str, Any] = dict(
    box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0)
)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _column_groups(keys: list[str], most: int = 6) -> list[list[str]]:
    """Metric names split into runs of at most `most`, label_* figures apart from the rest."""
    groups: list[list[str]] = []
    for family in (
        [k for k in keys if not k.startswith("label_")],
        [k for k in keys if k.startswith("label_")],
    ):
        groups += [family[i : i + most] for i in range(0, len(family), most)]
    return groups


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    methods = report["methods"]
    if report["task"] == "transforms":
        table = Table(
            title="recall@1 of a transformed copy's original", title_justify="left", **_TABLE
        )
        table.add_column("transform")
        for name in methods:
            table.add_column(name, justify="right")
        for tname in report["transforms"]:
            cells = [_fmt(m["by_transform"].get(tname)) for m in methods.values()]
            table.add_row(tname, *cells)
        table.add_row("all", *[_fmt(m["recall@1"]) for m in methods.values()], style="bold")
        out.print(table)
    else:
        keys = list(next(iter(methods.values())))
        for group in _column_groups(keys):  # one table per group, so each fits 80 columns
            table = Table(title=f"{report['task']}", title_justify="left", **_TABLE)
            table.add_column("method")
            for key in group:
                table.add_column(key, justify="right")
            for name, scores in methods.items():
                table.add_row(name, *[_fmt(scores[key]) for key in group])
            out.print(table)
    facts = {k: report.get(k) for k in ("n", "images", "k", "groups", "sample") if k in report}
    if "kept_original" in report:  # dedupe groups that keep their ground-truth original
        facts["kept_original"] = "{kept} of {of}".format(**report["kept_original"])
    out.print(
        ", ".join(f"{k} {v}" for k, v in facts.items()) + f"; {report['seconds']['total']:.1f} s",
        highlight=False,
        soft_wrap=True,
    )
    for note in report.get("notes", []):
        out.print(f"[dim]note: {escape(note)}[/dim]", highlight=False)


@eval_app.command()
def retrieval(
    photos: PhotosArg,
    store: EvalStoreOpt = None,
    k: Annotated[
        int, typer.Option("-k", "--k", min=1, max=1000, help="Neighbours per query.")
    ] = 10,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="CSV `path,labels` ('|' between labels) instead of folders: label figures only.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    epochs: EpochsOpt = None,
    image_size: ImageSizeOpt = None,
    model_config: ModelConfigOpt = None,
) -> None:
    """Every labelled photo (PHOTOS/<label>/<file>) queries the others: p@1, p@k, map@k, kNN vote,
    and the suggested labels' p@3, r@3 and best micro-F1."""
    from .run import evaluate_retrieval

    with errors_to_exit():
        model = _model(model_config, epochs, image_size)
    report = _run(
        evaluate_retrieval, photos=photos, store=store, k=k, model=model, labels_csv=labels
    )
    _print(report, as_json)


@eval_app.command()
def neardup(
    photos: PhotosArg,
    groups: Annotated[
        Path | None,
        typer.Option(help="CSV of file,group_id; single-member groups are distractors."),
    ] = None,
    transforms: Annotated[
        bool, typer.Option("--transforms", help="Make transformed copies of a sample; no labels.")
    ] = False,
    store: EvalStoreOpt = None,
    sample: Annotated[int, typer.Option(min=1, help="Photos sampled with --transforms.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the --transforms sample.")] = 0,
    as_json: JsonOpt = False,
    epochs: EpochsOpt = None,
    image_size: ImageSizeOpt = None,
    model_config: ModelConfigOpt = None,
) -> None:
    """Near-duplicate search and dedupe: recall@3, mrr, pair P/R/F1, recall at precision 0.95."""
    from .run import evaluate_neardup, evaluate_transforms

    if (groups is None) == (not transforms):
        fail("give either --groups GROUPS.csv or --transforms", code=2)
    with errors_to_exit():
        model = _model(model_config, epochs, image_size)
    if transforms:
        report = _run(
            evaluate_transforms,
            photos=photos,
            store=store,
            sample=sample,
            seed=seed,
            model=model,
        )
    else:
        report = _run(evaluate_neardup, photos=photos, groups_csv=groups, store=store, model=model)
    _print(report, as_json)
