"""`lookalike dedupe`: parse flags, group the store's near-duplicates, list them, or move, delete,
undo and empty the trash (lookalike.dedupe.actions); `--against` lists a folder's files the
collection already has. Registered on the main app by lookalike/cli.py; shares
lookalike/cli_common.py with it. No TensorFlow at import time.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..cli_common import StoreOpt, err, errors_to_exit, fail, out


class Keep(str, Enum):
    """dedupe --keep: which photo of a group is kept (lookalike.dedupe.keep)."""

    original = "original"  # most real detail; never an upload over a collection file
    largest = "largest"
    smallest = "smallest"
    oldest = "oldest"
    newest = "newest"
    shortest_path = "shortest-path"


ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        min=-1.0,
        max=1.0,
        help="Cosine at or above which photos are duplicates "
        "(default: the store's calibrated value).",
    ),
]
PhashOpt = Annotated[
    int,
    typer.Option(
        "--phash-max",
        min=-1,
        max=16,
        help="Also group photos whose perceptual hashes differ in at most this many bits "
        "(-1: cosine only).",
    ),
]
KeepOpt = Annotated[
    Keep,
    typer.Option(
        help="Which to keep: original (most real detail; never an upload over a "
        "collection file), largest, smallest, oldest, newest, shortest-path."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the groups as JSON.")]
CsvOpt = Annotated[
    Path | None, typer.Option("--csv", help="Write one row per member to this CSV file.")
]
HtmlOpt = Annotated[
    Path | None, typer.Option("--html", help="Write a page of thumbnails to this file.")
]
MoveOpt = Annotated[
    Path | None, typer.Option("--move-to", help="Move the others here (under their paths).")
]
DeleteOpt = Annotated[
    bool,
    typer.Option(
        "--delete",
        help="Delete the others: into the store's trash (STORE/trash), from where --undo "
        "puts them back until --empty-trash.",
    ),
]
YesOpt = Annotated[
    bool, typer.Option("--yes", help="Really move, delete or empty the trash (else: dry run).")
]
EmptyTrashOpt = Annotated[
    bool,
    typer.Option(
        "--empty-trash",
        help="Delete the photos in the store's trash for good (with --yes), freeing space.",
    ),
]
AgainstOpt = Annotated[
    Path | None,
    typer.Option("--against", help="List files of this folder the collection already has."),
]
UndoOpt = Annotated[
    bool, typer.Option("--undo", help="Put back every moved file of the last clean-up.")
]
VerifyOpt = Annotated[
    bool,
    typer.Option(help="Also group pairs under the threshold that local features verify (crops)."),
]


def dedupe(
    store: StoreOpt,
    threshold: ThresholdOpt = None,
    phash_max: PhashOpt = 10,
    as_json: JsonOpt = False,
    csv_file: CsvOpt = None,
    html_file: HtmlOpt = None,
    keep: KeepOpt = Keep.original,
    move_to: MoveOpt = None,
    delete: DeleteOpt = False,
    yes: YesOpt = False,
    empty_trash: EmptyTrashOpt = False,
    against: AgainstOpt = None,
    undo_last: UndoOpt = False,
    verify: VerifyOpt = True,
) -> None:
    """Group near-duplicate photos; review them, or move or delete all but one of each group."""
    _check_flags(locals())  # the flags as given, before anything else is named here
    from ..store import Store
    from .actions import apply_actions, plan_actions
    from .grouping import BAND, find_groups
    from .report import write_csv, write_html

    removes = bool(move_to or delete)
    with errors_to_exit(), Store.open(store) as st:
        _check_store(st, removes or undo_last, complete=not empty_trash)
        if undo_last:
            return _dedupe_undo(st, as_json)
        if empty_trash:
            return _dedupe_empty_trash(st, yes, as_json)
        _finish_interrupted(st, yes, removes)
        t = threshold if threshold is not None else _calibrated(st)
        phash = phash_max if phash_max >= 0 else None
        if against is not None:
            return _dedupe_against(st, against, t, phash, as_json)
        from .verification import verified_pairs  # OpenCV: only where groups are made

        band = BAND if threshold is None else 0.0  # the calibrated default: a second witness
        groups = find_groups(st, t, keep.value, phash, verified_pairs if verify else None, band)
        if csv_file:
            write_csv(groups, csv_file)
        if html_file:
            write_html(st, groups, t, html_file)
        actions = plan_actions(st, groups, move_to, delete) if removes else []
        report = apply_actions(st, actions) if yes else None
        if as_json:
            return _print_json(st, groups, t, phash, actions if removes else None, report)
        _print_groups(groups, t, phash)
        _print_actions(st, actions, report)


# (flag, the flags it cannot go with, the error): flags that ask for different things
CONFLICTS = [
    ("as_json", {"csv_file"}, "--json and --csv are alternatives; give one"),
    ("move_to", {"delete"}, "--move-to and --delete are alternatives; give one"),
    (
        "against",
        {"move_to", "delete", "csv_file", "html_file"},
        "--against only lists matches; it takes no --move-to, --delete, --csv or --html",
    ),
    (
        "undo_last",
        {"move_to", "delete", "against", "csv_file", "html_file", "yes"},
        "--undo puts back the last clean-up; it takes no other action",
    ),
    (
        "empty_trash",
        {"move_to", "delete", "against", "csv_file", "html_file", "undo_last"},
        "--empty-trash empties the store's trash; it takes no other action but --yes",
    ),
]


def _check_flags(given: dict) -> None:
    """One clear line, and nothing done, for flags that ask for different things."""
    for flag, others, message in CONFLICTS:
        if given[flag] and any(given[o] for o in others):
            fail(message)


def _check_store(st, removes: bool, complete: bool) -> None:
    """A clear error for a store without a model, a collection dedupe cannot move files of,
    or (for groups, moves and undo) rows not all embedded by one model."""
    from ..errors import InvalidArgumentError
    from ..photos import is_url

    st.model_config()
    if removes and is_url(st.photos_root):
        raise InvalidArgumentError(
            f"the photos are in {st.photos_root}: dedupe does not move or delete objects; "
            "write the keys to remove with --csv and remove them with your storage's tools"
        )
    if complete:
        st.require_complete()


def _finish_interrupted(st, yes: bool, removes: bool) -> None:
    """--yes finishes an interrupted clean-up first; without it, say one is pending."""
    from .actions import pending, resume

    waiting = pending(st)
    if yes and not (removes or waiting):
        fail("--yes confirms --move-to, --delete or --empty-trash; give one of them")
    if waiting and yes:
        done = resume(st)
        err.print(f"finished an interrupted run: {len(done.outcomes)} files")
    elif waiting:
        err.print("note: an interrupted dedupe run is pending; --yes finishes it")


def _calibrated(st) -> float:
    """The store's dedupe threshold, measured once per model."""
    from .calibration import calibrate_store
    from .thresholds import calibrated_threshold, capped_note

    t = calibrated_threshold(st)
    if t is None:
        err.print("measuring this store's dedupe threshold (once per model)...")
        t = calibrate_store(st).threshold
    if t >= 1.0:  # safe, and it finds less: say why and what the user can do
        err.print(capped_note(st.info.get("dedupe_calibration") or {}), markup=False)
    return t


def _print_json(st, groups: list, t: float, phash: int | None, actions, report) -> None:
    """The groups as JSON; with --move-to or --delete, the actions and what was done."""
    from .grouping import groups_to_dict

    data = groups_to_dict(groups, t, phash)
    if actions is not None:
        data["actions"] = _actions_json(st, actions, report is not None)
        data["applied"] = report.to_dict() if report else None
    print(json.dumps(data))


def _say(line: str) -> None:
    """One line as it is: a path is never broken across lines, nor its [brackets] read as style."""
    out.print(line, highlight=False, markup=False, soft_wrap=True)


def _dedupe_undo(st, as_json: bool) -> None:
    """`dedupe --undo`: put back the last clean-up and say what came back."""
    from .actions import undo

    done = undo(st)
    if as_json:
        print(json.dumps(done.to_dict()))
        return
    for p in done.restored:
        _say(f"put back {p}")
    for p, why in done.failed:
        err.print(f"not put back {p}: {why}", highlight=False, markup=False)
    _say(
        f"{len(done.restored)} files put back, {done.rows} rows restored "
        f"(run `lookalike index` for any row of an older model)"
    )


def _dedupe_empty_trash(st, yes: bool, as_json: bool) -> None:
    """`dedupe --empty-trash [--yes]`: what the trash holds; with --yes, delete it for good."""
    from .actions import empty_trash, trash_contents

    report = empty_trash(st) if yes else trash_contents(st)
    if as_json:
        print(json.dumps(report.to_dict()))
        return

    size = f"{report.files} files, {report.bytes / 1e6:.1f} MB in {len(report.runs)} clean-ups"
    if report.emptied:
        _say(f"emptied the trash of {st.root}: {size} deleted for good")
    elif report.files:
        _say(f"the trash of {st.root} holds {size}")
        _say("dry run: nothing deleted; add --yes to delete them for good (no undo)")
    else:
        _say(f"the trash of {st.root} is empty")


def _dedupe_against(st, against: Path, t: float, phash: int | None, as_json: bool) -> None:
    """`dedupe --against FOLDER`: the folder's files the collection already has."""
    from ..engine import Engine
    from .incoming import find_known

    known = find_known(Engine(st), against, t, phash_max=phash)
    if as_json:
        print(json.dumps(known.to_dict()))
        return
    for k in known.known:
        best = ", ".join(
            f"{p} ({s:.4f}{', a crop of this file' if p in k.crops else ''})" for p, s in k.matches
        )
        _say(f"{k.path}  ->  {best}")
    _say(
        f"{len(known.known)} of {known.checked} files already have a near-duplicate "
        f"(threshold {t:.4f})"
    )
    partial = sum(k.only_crops for k in known.known)
    if partial:
        _say(f"{partial} of them the collection has only as crops: keep those files")
    for f in known.failed:
        err.print(f"  {f.path}: {f.error}", highlight=False, markup=False)


def _actions_json(st, actions: list, applied: bool) -> list[dict]:
    """The planned actions for --json: a dry run says where each file would go."""
    from .actions import preview

    return [
        {"path": a.path, "action": "delete" if a.trash else "move"}
        | ({} if applied else {"to": str(preview(st, a))})
        for a in actions
    ]


def _print_groups(groups: list, t: float, phash: int | None) -> None:
    """The groups, one line a member, the kept one marked."""
    for number, g in enumerate(groups, 1):
        out.print(f"group {number} (kept: {g.reason})", style="bold", markup=False, soft_wrap=True)
        for m in g.members:
            mark = "keep" if m.id == g.keep.id else "    "
            link = "" if m.id == g.keep.id else f" [{m.link}]"
            _say(f"  {mark} {m.score:.4f} {m.width}x{m.height} {m.bytes:>10,} B  {m.path}{link}")
    spare = sum(len(g.others) for g in groups)
    rule = f"threshold {t:.4f}" + (f", pHash distance <= {phash}" if phash is not None else "")
    _say(f"{len(groups)} groups, {spare} photos besides the kept ones ({rule})")


def _print_actions(st, actions: list, report) -> None:
    """What a run did (report) or, in a dry run, what it would do."""
    from .actions import preview

    if report is not None:
        for o in report.outcomes:
            verb = "deleted (to the trash)" if o.action.trash and o.status == "moved" else o.status
            where = f" -> {o.to}" if o.to else (f": {o.reason}" if o.reason else "")
            _say(f"{verb} {o.action.path}{where}")
        if report.skipped:
            err.print(f"{len(report.skipped)} files skipped (listed above)")
        if any(a.trash for a in actions):
            _say(
                "deleted photos are in the store's trash: `--undo` puts them back, "
                "`--empty-trash --yes` frees the space"
            )
        return
    for a in actions:
        dest = preview(st, a)
        _say(
            f"would delete {a.path} (to the trash: {dest})"
            if a.trash
            else f"would move {a.path} -> {dest}"
        )
    if actions:
        _say("dry run: nothing changed; add --yes to do it")
