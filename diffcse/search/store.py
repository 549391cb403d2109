"""The SQLite side of an index: id -> text + JSON metadata, and HNSW tombstones."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from diffcse.search.errors import CorruptIndexError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, text TEXT NOT NULL, metadata TEXT);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY);
"""
# SQLite caps the number of '?' parameters per statement; fetch ids in slices below it.
_SQL_BATCH = 900


class TextStore:
    """Texts and metadata by id in a private SQLite file; copy-on-write over a saved one.

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
        # A private scratch copy: durability comes from save(), which writes a fresh file.
        conn.execute("PRAGMA journal_mode=OFF")
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

    def add(self, ids: Sequence[int], texts: Sequence[str], metadata: Sequence[str | None]) -> None:
        """Insert rows (metadata already JSON-encoded) inside the current transaction."""
        with self._lock:
            conn = self._writable()
            conn.executemany(
                "INSERT INTO items (id, text, metadata) VALUES (?, ?, ?)",
                zip((int(i) for i in ids), texts, metadata, strict=True),
            )

    def commit(self) -> None:
        """Commit pending inserts/deletes."""
        with self._lock:
            self._conn.commit()

    def rollback(self) -> None:
        """Drop pending inserts/deletes (the faiss side failed)."""
        with self._lock:
            self._conn.rollback()

    def get(self, ids: Iterable[int]) -> dict[int, tuple[str, dict | None]]:
        """Rows for the given ids that exist: id -> (text, metadata)."""
        wanted = list(dict.fromkeys(int(i) for i in ids))
        out: dict[int, tuple[str, dict | None]] = {}
        with self._lock:
            for start in range(0, len(wanted), _SQL_BATCH):
                part = wanted[start : start + _SQL_BATCH]
                marks = ",".join("?" * len(part))
                for row_id, text, meta in self._conn.execute(
                    f"SELECT id, text, metadata FROM items WHERE id IN ({marks})", part
                ):
                    out[row_id] = (text, json.loads(meta) if meta is not None else None)
        return out

    def existing(self, ids: Iterable[int]) -> list[int]:
        """The subset of ids present, in the order given."""
        found = self.get(ids)
        return [int(i) for i in ids if int(i) in found]

    def delete(self, ids: Sequence[int], tombstone: bool) -> None:
        """Remove rows (inside the current transaction); tombstone=True also records the ids."""
        with self._lock:
            conn = self._writable()
            conn.executemany("DELETE FROM items WHERE id = ?", ((int(i),) for i in ids))
            if tombstone:
                conn.executemany("INSERT OR IGNORE INTO tombstones (id) VALUES (?)", ((int(i),) for i in ids))

    def tombstones(self) -> list[int]:
        """Ids deleted from an index kind that cannot remove vectors (HNSW)."""
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT id FROM tombstones ORDER BY id")]

    def count(self) -> int:
        """Number of live rows."""
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM items").fetchone()[0])

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
