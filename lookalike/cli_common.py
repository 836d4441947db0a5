"""What every command line module shares: consoles, one-line errors, common options, progress.

Sits below lookalike/cli.py and lookalike/evaluation/cli.py, so both import it and neither
imports the other (imports point down).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from .errors import LookalikeError

out = Console()
err = Console(stderr=True, soft_wrap=True)

StoreOpt = Annotated[
    Path, typer.Option("--store", "-s", help="Store folder.", envvar="LOOKALIKE_STORE")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
# -h as well as --help on every command; help text wraps at the terminal, not at 80 columns
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


def print_error(message: str) -> None:
    """Print `error: message` on stderr (no markup parsed in the message)."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, markup=True)


def fail(message: str, code: int = 1) -> None:
    """Print `error: message` on stderr and exit with code."""
    print_error(message)
    raise typer.Exit(code)


@contextmanager
def errors_to_exit():
    """Library errors become one line on stderr and exit status 1, not a traceback."""
    try:
        yield
    except LookalikeError as exc:
        fail(str(exc))
    except OSError as exc:  # an unwritable report path, a full disk: the system's reason
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        err.print("interrupted; the store is consistent and the next run continues the work")
        raise typer.Exit(130) from None


class CountColumn(ProgressColumn):
    """`done/total` (`done/?` while the total is unknown); nothing where the description counts."""

    def render(self, task: Task) -> Text:
        if task.fields.get("no_count"):
            return Text("")
        total = "?" if task.total is None else f"{int(task.total)}"
        return Text(f"{int(task.completed)}/{total}", style="progress.download")


class Phases:
    """The time spent in each stage of a run, from the times of its progress calls.

    A stage runs from the end of the stage before it (its last call) to its own last call, so
    the set-up between two stages (loading TensorFlow before training, say) counts for the
    stage it prepares; the first stage starts at its first call.
    """

    def __init__(self) -> None:
        self.order: list[str] = []
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def see(self, key: str) -> None:
        now = time.perf_counter()
        if key not in self.first:
            self.first[key] = now
            self.order.append(key)
        self.last[key] = now

    def seconds(self) -> dict[str, float]:
        """Seconds of each stage, in the order the stages began."""
        out: dict[str, float] = {}
        previous = self.first[self.order[0]] if self.order else 0.0
        for key in self.order:
            out[key] = max(0.0, self.last[key] - previous)
            previous = max(previous, self.last[key])
        return out


def stage_key(stage: str) -> str:
    """The bar a stage belongs to: every `epoch ...` stage shares the one training bar."""
    return "train" if stage.startswith("epoch") else stage


@contextmanager
def progress_bar(enabled: bool, phases: Phases | None = None) -> Iterator:
    """A rich progress bar fed by (stage, done, total) callbacks; silent when disabled.

    total 0 means unknown (the bar counts up: `123/?`). The bar refreshes on its own timer,
    so the elapsed time keeps running between callbacks; a stage's clock stops when it is done.
    """
    if not enabled:

        def track(stage: str, done: int, total: int) -> None:
            if phases is not None:
                phases.see(stage_key(stage))

        yield track
        return
    bar = Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        CountColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        auto_refresh=True,
        refresh_per_second=4,
    )
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        key = stage_key(stage)
        if phases is not None:
            phases.see(key)
        if key not in tasks:
            tasks[key] = bar.add_task(stage, total=total or None, no_count=key == "train")
        bar.update(tasks[key], completed=done, total=total or None, description=stage)

    with bar:
        yield update
