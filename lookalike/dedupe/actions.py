"""Acting on dedupe groups: move or delete every non-kept member, without ever losing a photo.

A delete is a move into the store's trash (STORE/trash/<run>/<path>): it can be undone like any
move, and the space comes back only when the trash is emptied (``empty_trash``, a separate,
confirmed step). Nothing here unlinks a photo that exists nowhere else.

Safety, in order:
- A plan names each file with the sha256 the store recorded; a file whose bytes changed since
  it was indexed is skipped, and nothing is moved or deleted unless the group's kept file is
  still there with its recorded bytes.
- Before the first change the plan is written to STORE/dedupe-journal.json (atomically). A run
  that is killed leaves the journal; the next run (``resume``) finishes it, and only then is
  the journal removed.
- A move never overwrites: the destination is taken with ``os.link`` (which fails if the name
  exists) and the source is unlinked after; across filesystems the file is copied to a
  temporary name, fsynced, checked against its sha256, linked or renamed into place, and only
  then is the source unlinked. A taken name gets a numbered suffix (``photo-1.jpg``). So a kill
  at any moment leaves the file at its old place, its new place, or both; a resumed run that
  finds a destination with the file's sha256 treats the move as done.
- The store is updated (rows and index) after the files, in batches; until then it still opens
  and lists the moved rows, which the resumed run removes.
- Undo: the journal also holds each acted-on row (its facts and embedding); a finished run is
  kept as STORE/dedupe-done/<time>.json with where each file went. ``undo`` moves every moved
  file of the last run back to its place (never over another file) and puts its row back in
  the store, deleted files included (from the trash, while it has not been emptied).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from ..index.meta import ImageRecord
from ..store import TRASH, UPLOAD_PREFIX, Store, write_json_atomic
from .grouping import Group

log = logging.getLogger(__name__)

JOURNAL = "dedupe-journal.json"
DONE = "dedupe-done"  # finished runs, one JSON file each, for undo
STORE_BATCH = 500  # files acted on between two store updates
MAX_SUFFIX = 10_000


@dataclass(frozen=True)
class Action:
    """Move one non-kept member of a group to dest (trash: a delete, dest in the store's trash).

    Journals of older versions hold deletes as dest None; ``pending`` gives them a trash dest.
    """

    id: int
    path: str  # table path of the member
    sha256: str  # its bytes when indexed
    keep: str  # table path of its group's kept image
    keep_sha256: str
    dest: str | None  # absolute destination before any numbered suffix
    trash: bool = False  # a delete: dest is in the store's trash


@dataclass
class Outcome:
    """What became of one action: moved / gone (file already absent) / skipped; a delete is a
    move to the trash (``action.trash``)."""

    action: Action
    status: str
    to: str | None = None  # where a moved file now is
    reason: str | None = None  # why it was skipped

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.action.path, "status": self.status}
        if self.to is not None:
            out["to"] = self.to
        if self.reason is not None:
            out["reason"] = self.reason
        return out


@dataclass
class ActionReport:
    """The outcomes of a run, and how many rows left the store."""

    outcomes: list[Outcome] = field(default_factory=list)
    removed: int = 0

    @property
    def skipped(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "files": [o.to_dict() for o in self.outcomes]}


# -- planning ----------------------------------------------------------------------------------
def destination(move_to: Path, rel_path: str) -> Path:
    """Where a member goes under move_to: its path relative to PHOTOS (uploads: uploads/)."""
    if rel_path.startswith(UPLOAD_PREFIX):
        return move_to / "uploads" / rel_path[len(UPLOAD_PREFIX) :]
    return move_to / rel_path


def check_move_to(store: Store, move_to: Path) -> Path:
    """The absolute move-to folder; refused inside PHOTOS or the store (it would be indexed)."""
    target = Path(move_to).expanduser().resolve()
    for inside, name in ((store.photos_root, "the photos folder"), (store.root, "the store")):
        if inside is not None and target.is_relative_to(inside.resolve()):
            raise InvalidArgumentError(
                f"--move-to {target} is inside {name} ({inside}); pick a folder outside it, "
                "or the moved photos would be indexed again"
            )
    if target.exists() and not target.is_dir():
        raise InvalidArgumentError(f"--move-to {target} exists and is not a folder")
    return target


def plan_actions(
    store: Store, groups: Iterable[Group], move_to: Path | None = None, delete: bool = False
) -> list[Action]:
    """One action per non-kept member: a move under move_to, or (delete=True) to the trash."""
    if (move_to is None) == (not delete):
        raise InvalidArgumentError("give exactly one of a move-to folder or delete")
    target = check_move_to(store, move_to) if move_to is not None else store.new_trash_dir()
    groups = list(groups)
    ids = [m.id for g in groups for m in g.members]
    records = store.db.get_many(ids)
    actions = []
    for g in groups:
        keep = records.get(g.keep.id)
        if keep is None:
            continue
        for m in g.others:
            rec = records.get(m.id)
            if rec is None:
                continue
            dest = str(destination(target, rec.path))
            actions.append(
                Action(rec.id, rec.path, rec.sha256, keep.path, keep.sha256, dest, delete)
            )
    return actions


def preview(store: Store, action: Action) -> Path:
    """The destination a move would take now (numbered if the name is taken)."""
    for cand in _candidates(Path(action.dest)):
        if not os.path.lexists(cand) or _is_same(cand, action.sha256):
            return cand
    raise InvalidArgumentError(f"no free name for {action.dest}")


# -- the journal -------------------------------------------------------------------------------
def journal_path(store: Store) -> Path:
    return store.root / JOURNAL


def pending(store: Store) -> list[Action]:
    """The actions of an interrupted run, [] if there is none."""
    path = journal_path(store)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    actions = [Action(**a) for a in data["actions"]]
    if any(a.dest is None for a in actions):  # an older version's deletes: to the trash now
        trash = store.new_trash_dir()
        actions = [
            replace(a, dest=str(destination(trash, a.path)), trash=True) if a.dest is None else a
            for a in actions
        ]
    return actions


def resume(store: Store) -> ActionReport | None:
    """Finish an interrupted run, if there is one (holding the store's writer lock)."""
    with store.writing():
        store.require_complete()
        return _resume(store)


def apply_actions(store: Store, actions: list[Action]) -> ActionReport:
    """Move or delete the files of a plan, journalled, and remove them from the store; the
    whole run holds the store's writer lock, so no index run sees it half done."""
    with store.writing():
        store.require_complete()  # a retrain half-way since the groups were found
        return _apply_actions(store, actions)


def undo(store: Store) -> UndoReport:
    """Put back every moved file of the last finished run and its row (writer lock held)."""
    with store.writing():
        store.require_complete()
        return _undo(store)


def _resume(store: Store) -> ActionReport | None:
    """Finish an interrupted run, if there is one."""
    actions = pending(store)
    if not actions:
        journal_path(store).unlink(missing_ok=True)
        return None
    if any(a.trash for a in actions):  # older deletes got their trash dest: write it down
        data = json.loads(journal_path(store).read_text())
        data["actions"] = [asdict(a) for a in actions]
        write_json_atomic(journal_path(store), data)
    log.info("finishing an interrupted dedupe run: %d files", len(actions))
    return _run(store, actions)


def _apply_actions(store: Store, actions: list[Action]) -> ActionReport:
    """Move or delete the files of a plan, journalled, and remove them from the store."""
    if journal_path(store).exists():
        raise InvalidArgumentError(
            f"an interrupted dedupe run is pending in {journal_path(store)}; finish it first"
        )
    if not actions:
        return ActionReport()
    journal = {"version": 2, "actions": [asdict(a) for a in actions], "rows": _rows(store, actions)}
    write_json_atomic(journal_path(store), journal)
    return _run(store, actions)


def _rows(store: Store, actions: list[Action]) -> list[dict[str, Any]]:
    """The store rows of the actions (facts and embedding) as JSON, so undo can restore them."""
    with store.lock:
        records = store.db.get_many([a.id for a in actions])
        ids = np.array(sorted(records), dtype=np.int64)
        vectors = store.index.reconstruct(ids) if len(ids) else []
    return [
        asdict(records[int(i)])
        | {"vector": base64.b64encode(np.asarray(v, "<f4").tobytes()).decode("ascii")}
        | {"model": store.model_serial}
        for i, v in zip(ids.tolist(), vectors)
    ]


def _run(store: Store, actions: list[Action]) -> ActionReport:
    report = ActionReport()
    batch: list[int] = []
    for action in actions:
        try:
            outcome = _act(store, action)
        except OSError as exc:  # one unreadable or unwritable file must not stop the rest
            outcome = Outcome(action, "skipped", reason=f"{type(exc).__name__}: {exc}")
        report.outcomes.append(outcome)
        if outcome.status != "skipped":
            batch.append(action.id)
        if len(batch) >= STORE_BATCH:
            report.removed += store.remove_images(batch)
            batch = []
    if batch:
        report.removed += store.remove_images(batch)
    _finish(store, report)
    return report


def _finish(store: Store, report: ActionReport) -> None:
    """Keep the finished run (journal plus outcomes) under DONE for undo; drop the journal."""
    path = journal_path(store)
    data = json.loads(path.read_text()) if path.exists() else {"actions": [], "rows": []}
    data["outcomes"] = [o.to_dict() for o in report.outcomes]
    data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    done = store.root / DONE
    done.mkdir(exist_ok=True)
    name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{time.time_ns() % 10**9:09d}.json"
    write_json_atomic(done / name, data)
    path.unlink(missing_ok=True)


def last_run(store: Store) -> Path | None:
    """The record of the last finished run that was not undone, or None."""
    done = store.root / DONE
    runs = sorted(done.glob("*.json")) if done.is_dir() else []
    return runs[-1] if runs else None


@dataclass
class UndoReport:
    """What undo did: files put back, files it could not put back (with why), rows restored."""

    restored: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    record: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "restored": self.restored,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "rows": self.rows,
            "record": self.record,
        }


def _undo(store: Store) -> UndoReport:
    """Put back every moved file of the last finished run and its row in the store."""
    if journal_path(store).exists():
        raise InvalidArgumentError("an interrupted dedupe run is pending; finish it first (--yes)")
    path = last_run(store)
    if path is None:
        raise InvalidArgumentError("no dedupe clean-up to undo")
    data = json.loads(path.read_text())
    rows = {r["path"]: r for r in data.get("rows", [])}
    shas = {a["path"]: a["sha256"] for a in data["actions"]}
    report = UndoReport(record=path.name)
    back: list[dict[str, Any]] = []
    for o in data.get("outcomes", []):
        if o["status"] != "moved":
            if o["status"] == "deleted":  # by a version before the trash
                report.failed.append((o["path"], "deleted: it cannot come back"))
            continue
        why = _put_back(store, o["path"], Path(o["to"]), shas[o["path"]])
        if why:
            report.failed.append((o["path"], why))
        else:
            report.restored.append(o["path"])
            if o["path"] in rows:
                back.append(rows[o["path"]])
    report.rows = _restore_rows(store, back)
    path.rename(path.with_suffix(".undone"))
    return report


def _put_back(store: Store, rel_path: str, moved: Path, sha: str) -> str | None:
    """Move a file back to its place in the collection; a reason when it cannot."""
    home = store.file_path(rel_path)
    if os.path.lexists(home):
        return "done already" if _is_same(home, sha) else f"{home} is taken by another file"
    if not os.path.lexists(moved) and moved.is_relative_to(store.root / TRASH):
        return "deleted: the trash was emptied since"
    if not _is_same(moved, sha):
        return f"{moved} is missing or changed"
    home.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(moved, home)
    except FileExistsError:
        return f"{home} is taken by another file"
    except OSError:
        if not _copy_into(moved, home, sha):
            return f"{home} is taken by another file"
    _fsync_dir(home.parent)
    moved.unlink()
    return None


def _restore_rows(store: Store, rows: list[dict[str, Any]]) -> int:
    """Put rows back into the table and the index (those of the store's current model)."""
    keep = [r for r in rows if r.get("model") == store.model_serial]
    if not keep:
        return 0
    fields = set(ImageRecord.__dataclass_fields__)
    with store.writing():
        records = [
            ImageRecord(
                **{k: (tuple(v) if k == "labels" else v) for k, v in r.items() if k in fields}
            )
            for r in keep
        ]
        vectors = np.stack(
            [np.frombuffer(base64.b64decode(r["vector"]), "<f4") for r in keep]
        ).astype(np.float32)
        ids = store.add_rows(records, vectors, store.model_serial)  # all or nothing
    return len(ids)


# -- the trash ---------------------------------------------------------------------------------
@dataclass
class TrashReport:
    """The trash's runs (oldest first), its files and bytes; emptied: whether they are gone."""

    runs: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    emptied: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trash_contents(store: Store) -> TrashReport:
    """What the store's trash holds (a dry run of ``empty_trash``)."""
    report = TrashReport()
    root = store.root / TRASH
    for run in sorted(root.iterdir()) if root.is_dir() else []:
        report.runs.append(run.name)
        for path in run.rglob("*"):
            if path.is_file() and not path.is_symlink():
                report.files += 1
                report.bytes += path.stat().st_size
    return report


def empty_trash(store: Store) -> TrashReport:
    """Delete everything in the store's trash, for good (writer lock held; no dedupe run may
    be pending, since it may be moving files there)."""
    with store.writing():
        if journal_path(store).exists():
            raise InvalidArgumentError(
                "an interrupted dedupe run is pending; finish it first (--yes)"
            )
        report = trash_contents(store)
        for name in report.runs:
            shutil.rmtree(store.root / TRASH / name)
        report.emptied = True
    return report


# -- one file ----------------------------------------------------------------------------------
def _act(store: Store, action: Action) -> Outcome:
    src = store.file_path(action.path)
    if not os.path.lexists(src):
        if action.dest is not None:
            for cand in _candidates(Path(action.dest)):
                if not os.path.lexists(cand):
                    break
                if _is_same(cand, action.sha256):
                    return Outcome(action, "moved", to=str(cand))
        return Outcome(action, "gone")
    if not src.is_file() or _sha256(src) != action.sha256:
        return Outcome(action, "skipped", reason="changed since it was indexed")
    keep = store.file_path(action.keep)
    if keep.resolve() == src.resolve():  # one is a symbolic link to the other
        return Outcome(action, "skipped", reason=f"it is the kept file {action.keep} itself")
    if not keep.is_file() or _sha256(keep) != action.keep_sha256:
        return Outcome(
            action, "skipped", reason=f"the kept file {action.keep} is missing or changed"
        )
    return Outcome(action, "moved", to=str(_move(src, Path(action.dest), action.sha256)))


def _candidates(base: Path):
    yield base
    for n in itertools.count(1):
        if n > MAX_SUFFIX:
            raise InvalidArgumentError(f"no free name for {base} after {MAX_SUFFIX} tries")
        yield base.with_name(f"{base.stem}-{n}{base.suffix}")


def _move(src: Path, base: Path, sha: str) -> Path:
    """Move src to base or the first free numbered name beside it; never overwrites."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for cand in _candidates(base):
        if os.path.lexists(cand):
            if _is_same(cand, sha):  # an interrupted run already put it here
                break
            continue
        try:
            os.link(src, cand)  # atomic, and fails if the name exists
        except FileExistsError:
            continue
        except OSError:  # another filesystem, or no hard links there
            if not _copy_into(src, cand, sha):
                continue
        break
    _fsync_dir(cand.parent)
    src.unlink()
    _fsync_dir(src.parent)
    return cand


def _copy_into(src: Path, dest: Path, sha: str) -> bool:
    """Copy src to dest through a verified, fsynced temporary file; False if dest got taken."""
    tmp = dest.with_name(f".{dest.name}.lookalike-part")
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())
    shutil.copystat(src, tmp)
    try:
        if _sha256(tmp) != sha:
            raise OSError(f"copy of {src} to {dest} does not match the original")
        try:
            os.link(tmp, dest)
        except FileExistsError:
            return False
        except OSError:
            if os.path.lexists(dest):
                return False
            os.rename(tmp, dest)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _is_same(path: Path, sha: str) -> bool:
    return path.is_file() and _sha256(path) == sha


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
