"""What a reviewer decided about groups, remembered in the store's SQLite database.

Two tables, created here on first use (the store's own schema is not touched):
- ``dedupe_apart(a, b)``: pairs of files marked "not duplicates" (by path, a < b), so the
  pair never joins a group again, whatever the threshold, and survives re-indexing;
- ``dedupe_keep(path)``: files chosen with "keep this one instead": they come first when
  groups are built, so each is the kept photo of its group.
Paths, not sha256: two identical files are still two files a reviewer can tell apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError, NotFoundError

if TYPE_CHECKING:
    from ..store import Store

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dedupe_apart (a TEXT NOT NULL, b TEXT NOT NULL, "
    "PRIMARY KEY (a, b))",
    "CREATE TABLE IF NOT EXISTS dedupe_keep (path TEXT PRIMARY KEY)",
)


def _has_tables(store: Store) -> bool:
    row = store.db.conn.execute(
        "SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name='dedupe_apart'"
    ).fetchone()
    return bool(row[0])


def _write(store: Store, statements: Iterable[tuple[str, tuple]]) -> None:
    """Run statements in one transaction, the tables created first (writer lock held)."""
    with store.writing(), store.db.transaction() as cur:
        for sql in SCHEMA:
            cur.execute(sql)
        for sql, args in statements:
            cur.execute(sql, args)


def _paths(store: Store, ids: list[int]) -> list[str]:
    records = store.db.get_many(ids)
    missing = [i for i in ids if i not in records]
    if missing:
        raise NotFoundError(f"no image with id {missing[0]}")
    return [records[i].path for i in ids]


def mark_apart(store: Store, ids: list[int]) -> int:
    """Remember every pair of these images as "not duplicates"; returns the pairs stored."""
    ids = sorted({int(i) for i in ids})
    if len(ids) < 2:
        raise InvalidArgumentError("give at least two image ids that are not duplicates")
    paths = sorted(set(_paths(store, ids)))
    pairs = [(a, b) for n, a in enumerate(paths) for b in paths[n + 1 :]]
    _write(store, [("INSERT OR IGNORE INTO dedupe_apart VALUES (?, ?)", p) for p in pairs])
    return len(pairs)


def prefer(store: Store, image_id: int, others: list[int] = ()) -> None:
    """Keep image_id instead of the others (their own earlier choices are forgotten)."""
    paths = _paths(store, [int(image_id), *[int(i) for i in others]])
    forget = [("DELETE FROM dedupe_keep WHERE path = ?", (p,)) for p in paths[1:]]
    _write(store, [*forget, ("INSERT OR IGNORE INTO dedupe_keep VALUES (?)", (paths[0],))])


def reviewed(store: Store) -> tuple[set[tuple[int, int]], set[int]]:
    """(pairs (a < b) of ids marked apart, ids chosen to keep), from the tables above."""
    with store.lock:
        if not _has_tables(store):
            return set(), set()
        conn = store.db.conn
        apart = conn.execute(
            "SELECT i.id, j.id FROM dedupe_apart d JOIN images i ON i.path = d.a "
            "JOIN images j ON j.path = d.b"
        ).fetchall()
        keep = conn.execute(
            "SELECT i.id FROM dedupe_keep k JOIN images i ON i.path = k.path"
        ).fetchall()
    return {(min(a, b), max(a, b)) for a, b in apart}, {r[0] for r in keep}
