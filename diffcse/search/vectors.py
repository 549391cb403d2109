"""Exact vectors kept on disk beside a compressed index, read back to re-score its candidates.

An append-only float32 file, row i = internal id i (ids are never reused, so a deleted or
replaced document's row simply stays unread). Rows are read with pread, not a memory map, so
serving a 10^7-vector index keeps them out of the process's resident memory; the kernel's page
cache holds the hot ones.

A new generation hard-links the previous generation's file and appends the rows added since:
readers of the older generation only read its first `rows`, so the shared file can grow under
them. A writer killed after appending leaves rows past the manifest's count; the next writer
truncates them before appending its own. Rows added but not saved wait in an unnamed temp file,
so a streaming build of 10^7 vectors never holds them in RAM.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO

import numpy as np

from diffcse.search.errors import CorruptIndexError

VECTORS_FILE = "vectors.f32"
_COPY_CHUNK = 64 << 20


class ExactVectors:
    """The exact (normalised float32) vectors of an index: saved rows in a file, unsaved ones in a temp file."""

    def __init__(self, dim: int, path: Path | None = None, rows: int = 0) -> None:
        self.dim = dim
        self.row_bytes = dim * 4
        self._path = path
        self._saved = rows
        self._fd: int | None = None
        if path is not None:
            self._fd = os.open(path, os.O_RDONLY)
            size = os.fstat(self._fd).st_size
            if size < rows * self.row_bytes:
                os.close(self._fd)
                raise CorruptIndexError(
                    f"exact-vector file {path} is {size} bytes but the manifest says {rows} rows "
                    f"({rows * self.row_bytes} bytes): truncated"
                )
        self._pending: IO[bytes] | None = None
        self._pending_rows = 0

    @property
    def rows(self) -> int:
        """Rows held, saved and unsaved."""
        return self._saved + self._pending_rows

    def append(self, first_id: int, vectors: np.ndarray) -> None:
        """Keep the rows of ids first_id.. (they must follow the last row held)."""
        if first_id != self.rows:
            raise CorruptIndexError(f"exact vectors hold {self.rows} rows but id {first_id} was to come next")
        if self._pending is None:
            self._pending = _new_pending()
        self._pending.seek(self._pending_rows * self.row_bytes)
        self._pending.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
        self._pending.flush()
        self._pending_rows += len(vectors)

    def truncate(self, rows: int) -> None:
        """Forget the unsaved rows from `rows` on (an add that failed after its rows were kept)."""
        if rows < self._saved:
            raise CorruptIndexError(f"cannot drop saved exact-vector rows ({rows} < {self._saved})")
        self._pending_rows = min(self._pending_rows, rows - self._saved)

    def read(self, ids: np.ndarray) -> np.ndarray:
        """The rows of ids (each < rows), in the order given."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        pending = self._pending.fileno() if self._pending is not None else None
        for j, i in enumerate(np.asarray(ids, dtype=np.int64).tolist()):
            if 0 <= i < self._saved:
                fd, offset = self._fd, i * self.row_bytes
            elif self._saved <= i < self.rows:
                fd, offset = pending, (i - self._saved) * self.row_bytes
            else:
                raise CorruptIndexError(f"id {i} has no exact vector (the file holds {self.rows} rows)")
            if os.preadv(fd, [out[j]], offset) != self.row_bytes:
                raise CorruptIndexError(f"exact-vector file {self._path} ended before the row of id {i}")
        return out

    def write(self, folder: Path, link: bool) -> dict:
        """Write every row to folder/VECTORS_FILE (fsynced); link: share the saved file's inode and append only the new rows.

        Returns the manifest entry. Only the index's one writer calls this, under its lock.
        """
        dest = folder / VECTORS_FILE
        saved_bytes = self._saved * self.row_bytes
        linked = False
        if link and self._path is not None:
            try:
                os.link(self._path, dest)
                linked = True
            except OSError:
                pass
        with open(dest, "r+b" if linked else "wb") as out:
            if linked:
                # Rows past the saved count are a killed writer's: no manifest names them.
                out.truncate(saved_bytes)
                out.seek(saved_bytes)
            elif self._fd is not None:
                _copy(self._fd, out, saved_bytes)
            if self._pending is not None:
                _copy(self._pending.fileno(), out, self._pending_rows * self.row_bytes)
            out.flush()
            os.fsync(out.fileno())
        return {"name": VECTORS_FILE, "bytes": self.rows * self.row_bytes, "rows": self.rows}

    def adopt(self, path: Path, rows: int) -> None:
        """After a save published `path` holding the first `rows` rows: read those from it; rows added since stay pending."""
        if not self._saved <= rows <= self.rows:
            raise CorruptIndexError(f"a save published {rows} exact-vector rows; this index holds {self.rows}")
        fd = os.open(path, os.O_RDONLY)
        later = self.rows - rows
        pending = None
        if later:
            # Rows another thread added between the save and this call: move them to a new pending file.
            pending = _new_pending()
            skip = (rows - self._saved) * self.row_bytes
            pending.write(os.pread(self._pending.fileno(), later * self.row_bytes, skip))
            pending.flush()
        self.close()
        self._fd, self._path, self._saved = fd, path, rows
        self._pending, self._pending_rows = pending, later

    def close(self) -> None:
        """Release the file descriptor and the pending temp file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._pending is not None:
            self._pending.close()
            self._pending = None
            self._pending_rows = 0


def _new_pending() -> IO[bytes]:
    """An unnamed temp file for rows not saved yet (gone when closed or when the process dies)."""
    return tempfile.TemporaryFile(prefix="diffcse-vectors-")


def _copy(fd: int, out: IO[bytes], nbytes: int) -> None:
    """Append the first nbytes of fd to the open file out."""
    offset = 0
    while offset < nbytes:
        chunk = os.pread(fd, min(_COPY_CHUNK, nbytes - offset), offset)
        if not chunk:
            raise CorruptIndexError(f"exact-vector data ended at byte {offset} of {nbytes}")
        out.write(chunk)
        offset += len(chunk)
