"""What a reviewer decided about groups, remembered in the store's SQLite database.

Two tables, created here on first use (the store's own schema is not touched):
- ``dedupe_apart(a, b)``: pairs of files marked "not duplicates" (by sha256, a < b), so the
  pair never joins a group again, whatever the threshold, and survives re-indexing;
- ``dedupe_keep(sha256)``: files chosen with "keep this one instead": they come first when
  groups are built, so each is the kept photo of its group.
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
    "CREATE TABLE IF NOT EXISTS dedupe_keep (sha256 TEXT PRIMARY KEY)",
)


def _has_tables(store: Store) -> bool:
    row = store.db.conn.execute(
        "SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name='dedupe_apart'"
    ).fetchone()
    return bool(row[0])


def _write(store: Store, statements: Iterable[tuple[str, tuple]]) -> None:
    """Run statements in one transaction, the tables created first."""
    with store.writing():
        conn = store.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in SCHEMA:
                conn.execute(sql)
            for sql, args in statements:
                conn.execute(sql, args)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _shas(store: Store, ids: list[int]) -> list[str]:
    records = store.db.get_many(ids)
    missing = [i for i in ids if i not in records]
    if missing:
        raise NotFoundError(f"no image with id {missing[0]}")
    return [records[i].sha256 for i in ids]


def mark_apart(store: Store, ids: list[int]) -> int:
    """Remember every pair of these images as "not duplicates"; returns the pairs stored."""
    ids = sorted({int(i) for i in ids})
    if len(ids) < 2:
        raise InvalidArgumentError("give at least two image ids that are not duplicates")
    shas = sorted(set(_shas(store, ids)))
    pairs = [(a, b) for n, a in enumerate(shas) for b in shas[n + 1 :]]
    _write(store, [("INSERT OR IGNORE INTO dedupe_apart VALUES (?, ?)", p) for p in pairs])
    return len(pairs)


def prefer(store: Store, image_id: int, others: list[int] = ()) -> None:
    """Keep image_id instead of the others (their own earlier choices are forgotten)."""
    shas = _shas(store, [int(image_id), *[int(i) for i in others]])
    forget = [("DELETE FROM dedupe_keep WHERE sha256 = ?", (s,)) for s in shas[1:]]
    _write(store, [*forget, ("INSERT OR IGNORE INTO dedupe_keep VALUES (?)", (shas[0],))])


def reviewed(store: Store) -> tuple[set[tuple[int, int]], set[int]]:
    """(pairs (a < b) of ids marked apart, ids chosen to keep), from the tables above."""
    with store.lock:
        if not _has_tables(store):
            return set(), set()
        conn = store.db.conn
        apart = conn.execute(
            "SELECT i.id, j.id FROM dedupe_apart d JOIN images i ON i.sha256 = d.a "
            "JOIN images j ON j.sha256 = d.b"
        ).fetchall()
        keep = conn.execute(
            "SELECT i.id FROM dedupe_keep k JOIN images i ON i.sha256 = k.sha256"
        ).fetchall()
    return {(min(a, b), max(a, b)) for a, b in apart}, {r[0] for r in keep}
