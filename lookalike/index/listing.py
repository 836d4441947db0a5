"""One indexing run's listing of the photos and its to-do list, in a scratch SQLite file.

A run of ten million photos cannot hold its listing as Python objects (~740 bytes an entry):
the scan streams it here in chunks, and the removal guard, the removed rows and the to-do list
are queries against the store's table (attached read-only). Memory stays bounded by the chunk
sizes whatever the size of the collection. The file is scratch: made anew by every run,
deleted at its end, and named like the store's other temporary files, so a killed run's copy
is removed by the next writer (lookalike.store.LEFTOVERS).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

CHUNK = 50_000  # rows a query or an executemany takes at a time
LISTING_FILE = "listing.tmp"  # in the store's folder

SCHEMA = """
CREATE TABLE listing (
    pos   INTEGER PRIMARY KEY,  -- collection order of this run (uploads last)
    rel   TEXT NOT NULL,        -- the table's path
    size  INTEGER,              -- an object's facts from the listing; NULL for a file
    mtime REAL
);
CREATE TABLE todo (
    pos      INTEGER PRIMARY KEY,
    rel      TEXT NOT NULL,
    size     INTEGER NOT NULL,  -- the facts the plan saw
    mtime    REAL NOT NULL,
    kind     TEXT NOT NULL,     -- added | maybe | stale
    id       INTEGER,           -- the table's row (NULL when added), and what it holds
    sha256   TEXT,
    model    INTEGER,
    no_phash INTEGER NOT NULL
);
-- shard rows of an interrupted Ray job: files that need no embedding
CREATE TABLE covered (rel TEXT NOT NULL, size INTEGER NOT NULL, mtime REAL NOT NULL);
"""
TODO_COLUMNS = "pos, rel, size, mtime, kind, id, sha256, model, no_phash"
UNCOVERED = (
    " AND NOT EXISTS (SELECT 1 FROM covered c WHERE c.rel = t.rel"
    " AND c.size = t.size AND c.mtime = t.mtime)"
)


class Listing:
    """STORE/listing.tmp, with the store's table attached (read-only) as ``store``."""

    def __init__(self, folder: Path, table: Path):
        self.path = folder / LISTING_FILE
        self.path.unlink(missing_ok=True)
        self.conn = sqlite3.connect(  # uri=True: ATTACH below takes a read-only URI
            self.path.resolve().as_uri(), uri=True, isolation_level=None, check_same_thread=False
        )
        self.conn.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=FILE;"
            "PRAGMA cache_size=-65536;" + SCHEMA
        )
        uri = f"{table.resolve().as_uri()}?mode=ro"
        self.conn.execute("ATTACH DATABASE ? AS store", (uri,))
        self.count = 0  # entries listed
        self.files = 0  # of them, files of the photos (the rest: uploads)
        self.todo_count = 0

    def close(self) -> None:
        self.conn.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Listing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the listing ----------------------------------------------------------------------
    def add(self, entries: Iterable[tuple[str, int | None, float | None]]) -> int:
        """Append (rel, size, mtime) entries in order, CHUNK at a time; returns how many."""
        before = self.count
        chunk: list[tuple] = []
        for rel, size, mtime in entries:
            chunk.append((self.count, rel, size, mtime))
            self.count += 1
            if len(chunk) == CHUNK:
                self._insert("listing", chunk)
                chunk = []
        self._insert("listing", chunk)
        return self.count - before

    def indexed(self) -> None:
        """Index the listing by path (one sort), once the scan is done."""
        self.conn.execute("CREATE INDEX IF NOT EXISTS listing_rel ON listing(rel)")

    def _insert(self, table: str, rows: list[tuple]) -> None:
        if rows:
            marks = ",".join("?" * len(rows[0]))
            self.conn.execute("BEGIN")
            self.conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
            self.conn.execute("COMMIT")

    def sample(self, positions: np.ndarray) -> list[tuple[int, str, int | None, float | None]]:
        """(pos, rel, size, mtime) of the entries at these positions, in position order."""
        out: list[tuple] = []
        positions = np.sort(np.asarray(positions, np.int64))
        for start in range(0, len(positions), 900):  # SQLite's bound-parameter limit
            chunk = positions[start : start + 900].tolist()
            marks = ",".join("?" * len(chunk))
            out += self.conn.execute(
                f"SELECT pos, rel, size, mtime FROM listing WHERE pos IN ({marks}) ORDER BY pos",
                chunk,
            ).fetchall()
        return out

    # -- against the store's table ----------------------------------------------------------
    def gone(self, keep_prefix: str | None = None) -> tuple[int, int]:
        """(rows of the table whose path is not listed, rows in all); rows whose path starts
        with keep_prefix are never counted as gone."""
        where = ""
        args: tuple = ()
        if keep_prefix:
            where, args = " AND NOT (i.path >= ? AND i.path < ?)", _prefix_range(keep_prefix)
        gone = self.conn.execute(
            "SELECT COUNT(*) FROM store.images i"
            " WHERE NOT EXISTS (SELECT 1 FROM listing l WHERE l.rel = i.path)" + where,
            args,
        ).fetchone()[0]
        return gone, self.conn.execute("SELECT COUNT(*) FROM store.images").fetchone()[0]

    def removed_ids(self) -> np.ndarray:
        """Ids of the table's rows whose path is not listed, in id order."""
        ids = [
            r[0]
            for r in self.conn.execute(
                "SELECT id FROM store.images i"
                " WHERE NOT EXISTS (SELECT 1 FROM listing l WHERE l.rel = i.path) ORDER BY id"
            )
        ]
        return np.array(ids, dtype=np.int64)

    def joined(self) -> Iterator[list[tuple]]:
        """The listing in position order, CHUNK rows at a time, each with its table row:
        (pos, rel, size, mtime, id, size, mtime, sha256, model, phash IS NULL); the table's
        columns are NULL for a path it does not hold."""
        last = -1
        while True:
            rows = self.conn.execute(
                "SELECT l.pos, l.rel, l.size, l.mtime, i.id, i.size, i.mtime, i.sha256,"
                " i.model, i.phash IS NULL FROM listing l LEFT JOIN store.images i"
                " ON i.path = l.rel WHERE l.pos > ? ORDER BY l.pos LIMIT ?",
                (last, CHUNK),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield rows

    # -- the to-do list ---------------------------------------------------------------------
    def add_todo(self, rows: list[tuple]) -> None:
        """Append to-do rows (TODO_COLUMNS, in position order)."""
        self._insert("todo", rows)
        self.todo_count += len(rows)

    def todo(self, uncovered: bool = False) -> Iterator[tuple]:
        """The to-do rows (TODO_COLUMNS) in position order, read CHUNK at a time; with
        ``uncovered``, only those the covered rows do not hold."""
        where = UNCOVERED if uncovered else ""
        last = -1
        while True:
            rows = self.conn.execute(
                f"SELECT {TODO_COLUMNS} FROM todo t WHERE pos > ?{where} ORDER BY pos LIMIT ?",
                (last, CHUNK),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield from rows

    def todo_count_uncovered(self) -> int:
        """To-do rows the covered rows do not hold."""
        return self.conn.execute(f"SELECT COUNT(*) FROM todo t WHERE 1{UNCOVERED}").fetchone()[0]

    def todo_of(self, rels: list[str], positions: list[int]) -> dict[str, tuple]:
        """rel -> to-do row of these paths (those that have one; rows of other paths may come
        along). ``positions``: where each path is expected (a shard row's position): one
        range scan finds them when they are right, a lookup by path the others."""
        out: dict[str, tuple] = {}
        if positions:
            rows = self.conn.execute(
                f"SELECT {TODO_COLUMNS} FROM todo WHERE pos BETWEEN ? AND ? ORDER BY pos LIMIT ?",
                (min(positions), max(positions), 2 * len(positions) + 16),
            ).fetchall()  # bounded: a shard of another run is found by path below
            out = {row[1]: row for row in rows}
        rest = [rel for rel in rels if rel not in out]
        for start in range(0, len(rest), 900):
            chunk = rest[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                f"SELECT {', '.join('t.' + c for c in TODO_COLUMNS.split(', '))} FROM listing l"
                f" JOIN todo t ON t.pos = l.pos WHERE l.rel IN ({marks})",
                chunk,
            ):
                out[row[1]] = row
        return out

    def cover(self, rows: Iterable[tuple[str, int, float]]) -> None:
        """Record (rel, size, mtime) rows of shards already on disk."""
        chunk: list[tuple] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == CHUNK:
                self._insert("covered", chunk)
                chunk = []
        self._insert("covered", chunk)
        self.conn.execute("CREATE INDEX IF NOT EXISTS covered_rel ON covered(rel)")


def _prefix_range(prefix: str) -> tuple[str, str]:
    """(low, high): the strings starting with prefix are those >= low and < high."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)
