"""The store's SQLite table of images: stable ids, file facts, embeddings, labels."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreWriteError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,  -- stable: never reused after a delete
    path      TEXT NOT NULL UNIQUE,               -- relative to the photos root, '/' separated
    size      INTEGER NOT NULL,                   -- bytes
    mtime     REAL NOT NULL,                      -- seconds since the epoch
    sha256    TEXT NOT NULL,
    width     INTEGER NOT NULL,
    height    INTEGER NOT NULL,
    embedding BLOB NOT NULL,                      -- float32 little-endian, unit norm
    labels    TEXT,                               -- '|'-separated, or NULL
    model     INTEGER NOT NULL DEFAULT 0,         -- serial of the model that embedded it
    phash     INTEGER                             -- 64-bit pHash as signed int64, or NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- labels of removed rows, by content: a photo that comes back gets them again
CREATE TABLE IF NOT EXISTS removed_labels (
    sha256  TEXT PRIMARY KEY,
    labels  TEXT NOT NULL,
    removed REAL NOT NULL                         -- seconds since the epoch
);
-- dedupe's local-feature verification, by content: a changed file has a new sha256
CREATE TABLE IF NOT EXISTS verified_pairs (
    sha_a   TEXT NOT NULL,                        -- sha_a <= sha_b
    sha_b   TEXT NOT NULL,
    version TEXT NOT NULL,                        -- the verifier's settings (verification.VERSION)
    inliers INTEGER NOT NULL,
    PRIMARY KEY (sha_a, sha_b, version)
) WITHOUT ROWID;
"""
# the images table's secondary indexes, by name; MetaDB.bulk_load drops them for a while
SECONDARY_INDEXES = {
    "images_sha256": "CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256)",
    # the web page's "newest first" pages (GET /images): 0.05 ms instead of a 150 ms sort at 50k
    "images_mtime": "CREATE INDEX IF NOT EXISTS images_mtime ON images(mtime)",
}
SCHEMA += "".join(f"{statement};\n" for statement in SECONDARY_INDEXES.values())
STATE_PREFIX = "state."  # meta keys holding the store's state (JSON values)


@dataclass(frozen=True)
class ImageRecord:
    """One row of the images table, without its embedding."""

    id: int
    path: str
    size: int
    mtime: float
    sha256: str
    width: int
    height: int
    labels: tuple[str, ...] = ()
    phash: int | None = None  # lookalike.images.phash64 of the decoded pixels; None: not known


@dataclass
class NewRows:
    """Rows of new paths as columns (lists of Python values; embedding an (n, dim) array)."""

    path: list[str]
    size: list[int]
    mtime: list[float]
    sha256: list[str]
    width: list[int]
    height: list[int]
    phash: list[int | None]
    embedding: np.ndarray


def _blobs(vectors: np.ndarray) -> list[bytes]:
    """Each row of an (n, dim) array as float32 little-endian bytes, without a loop."""
    v = np.ascontiguousarray(vectors, dtype="<f4")
    return v.view(np.dtype((np.void, 4 * v.shape[1]))).ravel().tolist() if len(v) else []


_COLUMNS = "id, path, size, mtime, sha256, width, height, labels, phash"


def _record(row) -> ImageRecord:
    labels = tuple(row[7].split("|")) if row[7] else ()
    return ImageRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], labels, row[8])


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns a table made by an older version lacks (rows get NULL)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(images)")}
    if "phash" not in columns:
        try:
            conn.execute("ALTER TABLE images ADD COLUMN phash INTEGER")
        except sqlite3.OperationalError as exc:  # another process added it meanwhile
            if "duplicate column" not in str(exc):
                raise


class MetaDB:
    """SQLite in WAL mode; every write bumps a generation counter in the same transaction.

    The FAISS index file records the generation it was built from; a mismatch on open means a
    run was interrupted after some commits, and the index is rebuilt from the embeddings here.
    """

    def __init__(self, path: Path):
        self.path = path
        # a store on read-only media (or without write permission) can still be searched
        self.readonly = not os.access(path.parent, os.W_OK) or (
            path.exists() and not os.access(path, os.W_OK)
        )
        if self.readonly:
            if not path.exists():
                raise StoreWriteError(f"{path} does not exist and its folder is read-only")
            uri = f"{path.resolve().as_uri()}?immutable=1"
            self.conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            return
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        with _write_errors(path):
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)
            _migrate(self.conn)

    def close(self) -> None:
        self.conn.close()

    # -- meta -------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", "0"))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE ... COMMIT; rolled back on any error. A full disk or a read-only
        store becomes StoreWriteError with SQLite's own reason."""
        if self.readonly:
            raise StoreWriteError(f"store table {self.path} is read-only; nothing was changed")
        cur = self.conn.cursor()
        with _write_errors(self.path):
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:  # SQLite may have rolled back already (disk full)
                    self.conn.execute("ROLLBACK")
                raise

    # -- state: every mutable setting of the store, changed in transactions -------------------
    def snapshot(self) -> tuple[int, dict[str, Any]]:
        """(generation, state) read in one transaction, so the two agree."""
        rows = self.conn.execute(
            "SELECT key, value FROM meta WHERE key = 'generation' OR key LIKE 'state.%'"
        ).fetchall()
        generation, state = 0, {}
        for key, value in rows:
            if key == "generation":
                generation = int(value)
            else:
                state[key[len(STATE_PREFIX) :]] = json.loads(value)
        return generation, state

    def set_state(
        self, updates: dict[str, Any], deletes: Iterable[str] = (), bump: bool = False
    ) -> None:
        """Write state keys (JSON values) in one transaction; ``bump`` also advances the
        generation (a change the index depends on, like a new model)."""
        with self.transaction() as cur:
            for key, value in updates.items():
                cur.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    (STATE_PREFIX + key, json.dumps(value, sort_keys=True)),
                )
            for key in deletes:
                cur.execute("DELETE FROM meta WHERE key = ?", (STATE_PREFIX + key,))
            if bump:
                _bump(cur)

    # -- writes -------------------------------------------------------------------------------
    def write(
        self,
        upserts: Iterable[tuple[ImageRecord, np.ndarray]] = (),
        deletes: Iterable[int] = (),
        touches: Iterable[tuple[int, float, int]] = (),
        model: int = 0,
        before_commit: Callable[[list[int]], None] | None = None,
    ) -> list[int]:
        """One transaction: insert or replace rows by path, delete ids, update (mtime, size).

        ``model`` is the serial of the model that made the upserted embeddings. Returns the ids
        of the upserted rows in order; replacing a path keeps its id. ``before_commit(ids)``
        runs inside the transaction, last: if it raises, nothing is written.
        """
        deletes = [int(i) for i in deletes]
        with self.transaction() as cur:
            _keep_labels(cur, deletes)
            ids = [_upsert(cur, rec, vec, model) for rec, vec in upserts]
            cur.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in deletes])
            cur.executemany(
                "UPDATE images SET mtime = ?, size = ? WHERE id = ?",
                [(m, s, int(i)) for i, m, s in touches],
            )
            _bump(cur)
            if before_commit is not None:
                before_commit(ids)
        return ids

    def insert_new(
        self,
        rows: list[tuple[ImageRecord, np.ndarray]],
        touches: Iterable[tuple[int, float, int]] = (),
        model: int = 0,
    ) -> list[int]:
        """write() for rows whose paths are not in the table, in one executemany: ~5x faster.

        New rows take the labels a removed row of the same sha256 had, as in write(). The ids
        are consecutive (AUTOINCREMENT inside one IMMEDIATE transaction), checked before commit:
        a path already present fails the whole call (UNIQUE) and nothing is written.
        """
        params = [
            (
                r.path, r.size, r.mtime, r.sha256, r.width, r.height,
                np.ascontiguousarray(v, dtype="<f4").tobytes(),
                "|".join(r.labels) if r.labels else None, r.sha256, model, r.phash,
            )
            for r, v in rows
        ]  # fmt: skip
        return self._insert(params, len(params), touches)

    def insert_columns(
        self, columns: NewRows, touches: Iterable[tuple[int, float, int]] = (), model: int = 0
    ) -> list[int]:
        """insert_new() for rows given as columns (no labels of their own): the merge of
        millions of rows builds no object per row."""
        c = columns
        blobs = _blobs(c.embedding)
        params = zip(
            c.path, c.size, c.mtime, c.sha256, c.width, c.height, blobs,
            repeat(None), c.sha256, repeat(model), c.phash,
        )  # fmt: skip
        return self._insert(params, len(c.path), touches)

    def _insert(self, params: Iterable[tuple], n: int, touches) -> list[int]:
        with self.transaction() as cur:
            row = cur.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
            first = (row[0] if row else 0) + 1
            cur.executemany(
                "INSERT INTO images (path, size, mtime, sha256, width, height, embedding, labels,"
                " model, phash) VALUES (?, ?, ?, ?, ?, ?, ?, COALESCE(?, (SELECT labels FROM"
                " removed_labels WHERE sha256 = ?)), ?, ?)",
                params,
            )
            last = cur.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
            if n and last[0] != first + n - 1:
                raise StoreWriteError(f"ids of {n} new rows are not consecutive")
            cur.executemany(
                "UPDATE images SET mtime = ?, size = ? WHERE id = ?",
                [(m, s, int(i)) for i, m, s in touches],
            )
            _bump(cur)
        return list(range(first, first + n))

    @contextmanager
    def bulk_load(self) -> Iterator[None]:
        """Drop the secondary indexes (sha256, mtime) for a load of many new rows and build
        them again at the end, each in one sort instead of a random insert per row. A load
        interrupted in any way (even killed) leaves a correct table: the next open of the
        table creates them again (SCHEMA), and until then queries scan instead of seeking."""
        with self.transaction() as cur:
            for name in SECONDARY_INDEXES:
                cur.execute(f"DROP INDEX IF EXISTS {name}")
        try:
            yield
        except BaseException:
            try:
                self._create_indexes()
            except Exception as exc:  # a full disk, say: the load's own error is the one to see
                log.warning("indexes not built again (the next open builds them): %s", exc)
            raise
        self._create_indexes()

    def _create_indexes(self) -> None:
        with self.transaction() as cur:
            for statement in SECONDARY_INDEXES.values():
                cur.execute(statement)

    def set_labels(self, path_labels: Iterable[tuple[str, tuple[str, ...]]]) -> int:
        """Set the labels of the given paths in one transaction (no re-embedding); returns the
        number of rows whose path is known."""
        changed = 0
        with self.transaction() as cur:
            for path, labels in path_labels:
                cur.execute(
                    "UPDATE images SET labels = ? WHERE path = ?",
                    ("|".join(labels) if labels else None, path),
                )
                changed += cur.rowcount
        return changed

    # -- reads --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def get(self, image_id: int) -> ImageRecord | None:
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM images WHERE id = ?", (int(image_id),)
        ).fetchone()
        return _record(row) if row else None

    def get_many(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        ids = [int(i) for i in ids]
        out: dict[int, ImageRecord] = {}
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                f"SELECT {_COLUMNS} FROM images WHERE id IN ({marks})", chunk
            ):
                out[row[0]] = _record(row)
        return out

    def by_path(self, path: str) -> ImageRecord | None:
        row = self.conn.execute(f"SELECT {_COLUMNS} FROM images WHERE path = ?", (path,)).fetchone()
        return _record(row) if row else None

    def by_sha256(self, sha256: str) -> list[ImageRecord]:
        rows = self.conn.execute(f"SELECT {_COLUMNS} FROM images WHERE sha256 = ?", (sha256,))
        return [_record(r) for r in rows]

    def file_states(self) -> dict[str, tuple[int, int, float, str, int]]:
        """path -> (id, size, mtime, sha256, model) for every row: what incremental runs compare."""
        rows = self.conn.execute("SELECT path, id, size, mtime, sha256, model FROM images")
        return {r[0]: (r[1], r[2], r[3], r[4], r[5]) for r in rows}

    def without_phash(self) -> set[str]:
        """Paths of the rows with no pHash (written by an older version)."""
        return {r[0] for r in self.conn.execute("SELECT path FROM images WHERE phash IS NULL")}

    def phashes(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, hashes) of every row with a pHash, in id order: (m,) int64 and (m,) uint64."""
        rows = self.conn.execute(
            "SELECT id, phash FROM images WHERE phash IS NOT NULL ORDER BY id"
        ).fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        return ids, np.array([r[1] for r in rows], dtype=np.int64).view(np.uint64)

    def records(self) -> Iterator[ImageRecord]:
        """Every row in id order (streamed)."""
        for row in self.conn.execute(f"SELECT {_COLUMNS} FROM images ORDER BY id"):
            yield _record(row)

    def embeddings(
        self, dim: int, chunk: int = 10_000, model: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) in chunks, in id order: (m,) int64 and (m, dim) float32.

        With ``model``, only the rows that model embedded (a retrain that stopped half-way
        leaves rows of the old one); a blob of the wrong length is skipped, never reshaped.
        """
        last, where, args = -1, "", ()
        if model is not None:
            where, args = " AND model = ?", (int(model),)
        while True:
            rows = self.conn.execute(
                f"SELECT id, embedding FROM images WHERE id > ?{where} ORDER BY id LIMIT ?",
                (last, *args, chunk),
            ).fetchall()
            if not rows:
                return
            last = int(rows[-1][0])
            good = [r for r in rows if len(r[1]) == 4 * dim]
            if len(good) < len(rows):
                log.warning(
                    "%d stored embeddings are not %d-d; skipped", len(rows) - len(good), dim
                )
            if not good:
                continue
            ids = np.array([r[0] for r in good], dtype=np.int64)
            vecs = np.frombuffer(b"".join(r[1] for r in good), dtype="<f4").reshape(-1, dim)
            yield ids, vecs.astype(np.float32)

    # -- dedupe's verification cache (no generation bump: the index does not depend on it) ---
    def verified_inliers(
        self, pairs: Iterable[tuple[str, str]], version: str
    ) -> dict[tuple[str, str], int]:
        """The cached values of the (sha_a, sha_b) pairs that have them, for this version."""
        # one primary-key lookup a pair: a row-value IN (VALUES ...) list scans the table
        query = "SELECT inliers FROM verified_pairs WHERE sha_a = ? AND sha_b = ? AND version = ?"
        out: dict[tuple[str, str], int] = {}
        try:
            for a, b in pairs:
                row = self.conn.execute(query, (a, b, version)).fetchone()
                if row is not None:
                    out[(a, b)] = row[0]
        except sqlite3.OperationalError as exc:  # a read-only store of an older version
            if "no such table" in str(exc):
                return {}
            raise
        return out

    def put_verified(
        self,
        rows: Iterable[tuple[str, str, int]],
        version: str,
        prune: bool = False,
        current: Iterable[str] = (),
    ) -> None:
        """Store (sha_a, sha_b, value) rows of one version in one transaction (inlier counts
        with sha_a <= sha_b; other versions may keep ordered pairs); with prune, also drop the
        rows of versions other than this one and ``current``, and of contents no row of the
        table has any more."""
        with self.transaction() as cur:
            cur.executemany(
                "INSERT OR REPLACE INTO verified_pairs VALUES (?, ?, ?, ?)",
                [(a, b, version, int(n)) for a, b, n in rows],
            )
            if prune:
                keep = sorted({version, *current})
                marks = ", ".join("?" * len(keep))
                cur.execute(f"DELETE FROM verified_pairs WHERE version NOT IN ({marks})", keep)
                cur.execute(
                    "DELETE FROM verified_pairs WHERE sha_a NOT IN (SELECT sha256 FROM images)"
                    " OR sha_b NOT IN (SELECT sha256 FROM images)"
                )

    def count(self, model: int | None = None) -> int:
        """Rows in all, or rows embedded by one model."""
        if model is None:
            return len(self)
        return self.conn.execute(
            "SELECT COUNT(*) FROM images WHERE model = ?", (model,)
        ).fetchone()[0]


def _bump(cur: sqlite3.Cursor) -> None:
    """Advance the generation inside the caller's transaction."""
    row = cur.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    cur.execute(
        "INSERT OR REPLACE INTO meta VALUES ('generation', ?)",
        (str(int(row[0]) + 1 if row else 1),),
    )


def _keep_labels(cur: sqlite3.Cursor, ids: list[int]) -> None:
    """Remember the labels of rows about to be deleted, by sha256 (a photo that comes back,
    from a re-index of the right folder or an undo, gets its labels again)."""
    import time

    for start in range(0, len(ids), 900):
        chunk = ids[start : start + 900]
        marks = ",".join("?" * len(chunk))
        cur.execute(
            "INSERT OR REPLACE INTO removed_labels SELECT sha256, labels, ? FROM images"
            f" WHERE id IN ({marks}) AND labels IS NOT NULL",
            (time.time(), *chunk),
        )


_WRITTEN = "path, size, mtime, sha256, width, height, embedding, labels, model, phash"
_UPDATE = (
    "UPDATE images SET size=:size, mtime=:mtime, sha256=:sha256, width=:width, height=:height,"
    " embedding=:embedding, labels=COALESCE(:labels, labels), model=:model, phash=:phash"
    " WHERE id=:id"
)
_INSERT = (
    f"INSERT INTO images ({_WRITTEN}) VALUES"
    " (:path, :size, :mtime, :sha256, :width, :height, :embedding, :labels, :model, :phash)"
)


def _upsert(cur: sqlite3.Cursor, rec: ImageRecord, vec: np.ndarray, model: int) -> int:
    """Insert or replace one row by path; returns its id. Replacing keeps the id, and the
    labels unless the record brings some; a new row gets the labels a removed row of the
    same bytes left (``_restored_labels``)."""
    values = {
        "path": rec.path,
        "size": rec.size,
        "mtime": rec.mtime,
        "sha256": rec.sha256,
        "width": rec.width,
        "height": rec.height,
        "embedding": np.ascontiguousarray(vec, dtype="<f4").tobytes(),
        "labels": "|".join(rec.labels) if rec.labels else None,
        "model": model,
        "phash": rec.phash,
    }
    row = cur.execute("SELECT id FROM images WHERE path = ?", (rec.path,)).fetchone()
    if row:
        cur.execute(_UPDATE, values | {"id": row[0]})
        return row[0]
    values["labels"] = values["labels"] or _restored_labels(cur, rec.sha256)
    cur.execute(_INSERT, values)
    return cur.lastrowid


def _restored_labels(cur: sqlite3.Cursor, sha256: str) -> str | None:
    row = cur.execute("SELECT labels FROM removed_labels WHERE sha256 = ?", (sha256,)).fetchone()
    return row[0] if row else None


@contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """SQLite's reasons for not writing (full disk, read-only file) as one StoreWriteError."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if any(w in text for w in ("full", "readonly", "read-only", "unable to open", "I/O")):
            raise StoreWriteError(f"cannot write the store table {path}: {text}") from None
        raise
