"""The SQLite side of an index: id -> text + JSON metadata + the user's document id, HNSW tombstones, and
an FTS5 full-text index over the texts (BM25), changed in the same transactions as the rows."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from diffcse.search.errors import CorruptIndexError, SearchIndexError
from diffcse.search.filters import Where

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, text TEXT NOT NULL, metadata TEXT, doc_id TEXT);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY);
"""
# Format 2 on top of format 1 (items without doc_id, no full-text index). Every statement is
# idempotent, so the same script creates a new store and upgrades an old one. The full-text index
# has external content (the texts are stored once, in items); deletes reach it by trigger (FTS5 must
# be given the old text), inserts by add() itself: an AFTER INSERT trigger made adding rows 9x slower
# than inserting into the FTS table directly.
_SCHEMA_V2 = """
CREATE UNIQUE INDEX IF NOT EXISTS items_doc_id ON items(doc_id) WHERE doc_id IS NOT NULL;
CREATE VIRTUAL TABLE IF NOT EXISTS items_fts USING fts5(text, content='items', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS items_fts_delete AFTER DELETE ON items BEGIN
    INSERT INTO items_fts(items_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER IF NOT EXISTS items_fts_update AFTER UPDATE OF text ON items BEGIN
    INSERT INTO items_fts(items_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO items_fts(rowid, text) VALUES (new.id, new.text);
END;
"""
# SQLite caps the number of '?' parameters per statement; fetch ids in slices below it.
_SQL_BATCH = 900


class TextStore:
    """Texts, metadata and document ids by id in a private SQLite file; copy-on-write over a saved one.

    A store opened from a saved index reads that file read-only; the first write copies it to a
    private temp file, so a saved generation is never modified in place. One connection is
    shared by all threads behind a mutex: row look-ups are microseconds, the faiss search that
    precedes them is what runs in parallel.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        self._tmpdir: str | None = None
        self._readonly_source: Path | None = None
        if path is None:
            self._conn = self._open_private()
            self.upgrade()
        else:
            path = Path(path)
            if not path.is_file():
                raise CorruptIndexError(f"store file {path} is missing")
            self._readonly_source = path
            try:
                self._conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
                self._conn.execute("SELECT count(*) FROM items").fetchone()
                self._conn.execute("SELECT count(*) FROM tombstones").fetchone()
            except sqlite3.DatabaseError as err:
                raise CorruptIndexError(f"store file {path} is not a readable SQLite index store ({err})") from None

    def _open_private(self, source: sqlite3.Connection | None = None) -> sqlite3.Connection:
        """A fresh read-write database in a private temp dir, optionally a copy of source."""
        self._tmpdir = tempfile.mkdtemp(prefix="diffcse-store-")
        conn = sqlite3.connect(os.path.join(self._tmpdir, "store.sqlite"), check_same_thread=False)
        # A private scratch copy: durability comes from save(), which writes a fresh file. The
        # journal stays (in memory): a failed faiss step rolls the store back, and with
        # journal_mode=OFF a ROLLBACK is undefined behaviour.
        conn.execute("PRAGMA journal_mode=MEMORY")
        conn.execute("PRAGMA synchronous=OFF")
        if source is not None:
            source.backup(conn)
        conn.executescript(_SCHEMA)
        conn.commit()
        return conn

    def _writable(self) -> sqlite3.Connection:
        """Switch from the read-only saved file to a private copy on the first write."""
        if self._readonly_source is not None:
            old = self._conn
            self._conn = self._open_private(old)
            old.close()
            self._readonly_source = None
        return self._conn

    # ----------------------------------------------------------------- format

    def is_current(self) -> bool:
        """Whether the store has format 2's tables (document ids, the full-text index)."""
        with self._lock:
            return self._is_current()

    def _is_current(self) -> bool:
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(items)")}
        names = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master")}
        return "doc_id" in columns and {"items_fts", "items_doc_id", "items_fts_delete", "items_fts_update"} <= names

    def upgrade(self) -> bool:
        """Bring a format-1 store to format 2 (doc_id column, FTS5 index built from the texts); False if current."""
        with self._lock:
            if self._is_current():
                return False
            conn = self._writable()
            columns = {row[1] for row in conn.execute("PRAGMA table_info(items)")}
            had_fts = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'items_fts'").fetchone() is not None
            if "doc_id" not in columns:
                conn.execute("ALTER TABLE items ADD COLUMN doc_id TEXT")
            try:
                conn.executescript(_SCHEMA_V2)
            except sqlite3.OperationalError as err:
                if "fts5" in str(err):
                    raise SearchIndexError(
                        f"this Python's sqlite3 (SQLite {sqlite3.sqlite_version}) was built without FTS5, "
                        "which the index's full-text search needs"
                    ) from None
                raise
            if not had_fts:
                # External content: 'rebuild' indexes every row of items as it stands.
                conn.execute("INSERT INTO items_fts(items_fts) VALUES ('rebuild')")
            conn.commit()
            return True

    # ----------------------------------------------------------------- writes

    def add(
        self,
        ids: Sequence[int],
        texts: Sequence[str],
        metadata: Sequence[str | None],
        doc_ids: Sequence[str | None] | None = None,
    ) -> None:
        """Insert rows (metadata already JSON-encoded) and index their texts, inside the current transaction."""
        docs = doc_ids if doc_ids is not None else [None] * len(ids)
        ids = [int(i) for i in ids]
        with self._lock:
            conn = self._writable()
            conn.executemany(
                "INSERT INTO items (id, text, metadata, doc_id) VALUES (?, ?, ?, ?)",
                zip(ids, texts, metadata, docs, strict=True),
            )
            conn.executemany("INSERT INTO items_fts (rowid, text) VALUES (?, ?)", zip(ids, texts, strict=True))

    def delete(self, ids: Sequence[int], tombstone: bool) -> None:
        """Remove rows (inside the current transaction); tombstone=True also records the ids."""
        with self._lock:
            conn = self._writable()
            conn.executemany("DELETE FROM items WHERE id = ?", ((int(i),) for i in ids))
            if tombstone:
                conn.executemany("INSERT OR IGNORE INTO tombstones (id) VALUES (?)", ((int(i),) for i in ids))

    def clear_tombstones(self, ids: Sequence[int]) -> None:
        """Forget tombstones whose vectors are gone from faiss (after an HNSW rebuild), in the current transaction."""
        with self._lock:
            conn = self._writable()
            conn.executemany("DELETE FROM tombstones WHERE id = ?", ((int(i),) for i in ids))

    def commit(self) -> None:
        """Commit pending inserts/deletes."""
        with self._lock:
            self._conn.commit()

    def rollback(self) -> None:
        """Drop pending inserts/deletes (the faiss side failed)."""
        with self._lock:
            self._conn.rollback()

    # ----------------------------------------------------------------- reads

    def rows(self, ids: Iterable[int]) -> dict[int, tuple[str, dict | None, str | None]]:
        """Rows for the given ids that exist: id -> (text, metadata, doc_id)."""
        wanted = list(dict.fromkeys(int(i) for i in ids))
        out: dict[int, tuple[str, dict | None, str | None]] = {}
        with self._lock:
            for start in range(0, len(wanted), _SQL_BATCH):
                part = wanted[start : start + _SQL_BATCH]
                marks = ",".join("?" * len(part))
                for row_id, text, meta, doc_id in self._conn.execute(
                    f"SELECT id, text, metadata, doc_id FROM items WHERE id IN ({marks})", part
                ):
                    out[row_id] = (text, json.loads(meta) if meta is not None else None, doc_id)
        return out

    def get(self, ids: Iterable[int]) -> dict[int, tuple[str, dict | None]]:
        """Rows for the given ids that exist: id -> (text, metadata)."""
        return {i: (text, meta) for i, (text, meta, _) in self.rows(ids).items()}

    def existing(self, ids: Iterable[int]) -> list[int]:
        """The subset of ids present, in the order given."""
        ids = [int(i) for i in ids]
        found: set[int] = set()
        with self._lock:
            unique = list(dict.fromkeys(ids))
            for start in range(0, len(unique), _SQL_BATCH):
                part = unique[start : start + _SQL_BATCH]
                marks = ",".join("?" * len(part))
                found.update(r[0] for r in self._conn.execute(f"SELECT id FROM items WHERE id IN ({marks})", part))
        return [i for i in ids if i in found]

    def ids_for_docs(self, doc_ids: Iterable[str]) -> dict[str, int]:
        """Internal id of each given document id that exists."""
        wanted = list(dict.fromkeys(doc_ids))
        out: dict[str, int] = {}
        with self._lock:
            for start in range(0, len(wanted), _SQL_BATCH):
                part = wanted[start : start + _SQL_BATCH]
                marks = ",".join("?" * len(part))
                out.update(self._conn.execute(f"SELECT doc_id, id FROM items WHERE doc_id IN ({marks})", part).fetchall())
        return out

    def filter_ids(self, where: Where) -> np.ndarray:
        """Ids (int64, ascending) of the rows whose metadata passes the filter."""
        with self._lock:
            cur = self._conn.execute(f"SELECT id FROM items WHERE {where.sql} ORDER BY id", where.params)
            return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def lexical(self, match: str, limit: int, where: Where | None = None) -> list[tuple[int, float]]:
        """BM25 top `limit` (id, score) for an FTS5 MATCH expression, best first (score = -bm25(), higher is better)."""
        sql = "SELECT items_fts.rowid, bm25(items_fts) AS s FROM items_fts"
        params: tuple = (match,)
        if where is None:
            sql += " WHERE items_fts MATCH ?"
        else:
            # CROSS JOIN fixes the loop order: the full-text matches outside, each row's filter
            # inside. Written as `rowid IN (SELECT ...)`, SQLite ran the MATCH once per filtered
            # row instead (minutes, not a fraction of a second, at 200k rows).
            sql += f" CROSS JOIN items ON items.id = items_fts.rowid WHERE items_fts MATCH ? AND ({where.sql})"
            params += where.params
        sql += " ORDER BY s, items_fts.rowid LIMIT ?"
        with self._lock:
            return [(int(i), -float(s)) for i, s in self._conn.execute(sql, (*params, int(limit)))]

    def tombstones(self) -> list[int]:
        """Ids deleted from an index kind that cannot remove vectors (HNSW)."""
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT id FROM tombstones ORDER BY id")]

    def count(self) -> int:
        """Number of live rows."""
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM items").fetchone()[0])

    def tombstone_count(self) -> int:
        """Number of tombstones."""
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM tombstones").fetchone()[0])

    def doc_count(self) -> int:
        """Number of live rows that carry a document id."""
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM items WHERE doc_id IS NOT NULL").fetchone()[0])

    def fts_count(self) -> int:
        """Number of texts in the full-text index (one docsize row per indexed text)."""
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM items_fts_docsize").fetchone()[0])

    # ----------------------------------------------------------------- files

    def backup_to(self, path: Path) -> None:
        """Write a consistent copy of the store to path (a new file), fsynced."""
        with self._lock:
            dest = sqlite3.connect(path)
            try:
                self._conn.backup(dest)
                dest.execute("PRAGMA journal_mode=DELETE")
                dest.commit()
            finally:
                dest.close()
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())

    def close(self) -> None:
        """Close the connection and drop the private copy."""
        with self._lock:
            try:
                self._conn.close()
            finally:
                if self._tmpdir is not None:
                    shutil.rmtree(self._tmpdir, ignore_errors=True)
                    self._tmpdir = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown may have torn down sqlite3 already
            pass


# Users' words, never FTS5 syntax: each word becomes a quoted string (in which only '"' is special),
# so AND/OR/NOT/NEAR, '*', '^', ':', '(' and column filters in a query are just text.
_WORD = re.compile(r"\w+")
MAX_QUERY_TERMS = 64


def fts_query(text: str) -> str | None:
    """An FTS5 MATCH expression OR-ing the query's words, each quoted; None when it has no words."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(text)))[:MAX_QUERY_TERMS]
    if not words:
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
