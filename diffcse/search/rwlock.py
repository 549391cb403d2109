"""Locks of a search index: in memory, a readers-writer lock (many searches at once, one add/delete
at a time); on disk, the writer lock of an index directory (one writing process at a time).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffcse.search.errors import IndexLockedError, SearchIndexError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: only writers within one process exclude each other
    fcntl = None  # type: ignore[assignment]


class RWLock:
    """Readers share, writers exclude everyone; waiting writers block new readers (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared for the duration of the block."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock exclusively for the duration of the block."""
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# --------------------------------------------------------------------- inter-process writer lock

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
# How often a waiting writer retries: flock has no timed wait, and 50 ms is far below any save.
_POLL_S = 0.05


class _DirLock:
    """One index directory's writer lock in this process: a thread mutex plus the flock it guards.

    flock locks belong to an open file description, so two opens in one process would lock each
    other out; every writer in this process therefore shares one descriptor, and the mutex (an
    RLock, so a save inside writer() re-enters) decides which thread holds it.
    """

    def __init__(self, lock_file: Path) -> None:
        self.lock_file = lock_file
        self.mutex = threading.RLock()
        self.depth = 0
        self.fd: int | None = None
        self.holder: dict = {}


_REGISTRY: dict[str, _DirLock] = {}
_REGISTRY_MUTEX = threading.Lock()


def _holder_text(holder: dict) -> str:
    """'pid 123: diffcse index add ..., since 12:00:01' from a lock file's record."""
    if not holder.get("pid"):
        return "a process that has not yet recorded itself"
    text = f"pid {holder['pid']}"
    if holder.get("command"):
        text += f": {holder['command']}"
    if holder.get("since"):
        text += f", since {holder['since']}"
    return text


def _read_holder(lock_file: Path) -> dict:
    """The record the current holder wrote into the lock file ({} when unreadable)."""
    try:
        data = json.loads(lock_file.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _default_command() -> str:
    """A description of this process for the lock file; never the full argv (it may hold secrets)."""
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


def _locked_error(directory: Path, holder: dict, timeout: float | None) -> IndexLockedError:
    """The one-line error of a writer that gave up waiting."""
    waited = f"{timeout:g}s" if timeout is not None else "ever"
    return IndexLockedError(
        f"index {directory} is being written by another writer ({_holder_text(holder)}); "
        f"gave up after waiting {waited} (--lock-timeout): let it finish, or stop it"
    )


def _flock_wait(state: _DirLock, directory: Path, deadline: float | None, timeout: float | None) -> int:
    """Open the lock file and flock it exclusively, polling until deadline; returns the descriptor."""
    while True:
        try:
            fd = os.open(state.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise SearchIndexError(f"cannot lock index {directory} for writing: {err.strerror}") from None
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    raise _locked_error(directory, _read_holder(state.lock_file), timeout) from None
                if not told and timeout != 0:
                    # Say why nothing happens, once: the wait can last up to the timeout.
                    waiting = f"up to {timeout:g}s" if timeout is not None else "until it finishes"
                    log.warning("index %s is being written by %s; waiting %s", directory,
                                _holder_text(_read_holder(state.lock_file)), waiting)
                    told = True
                time.sleep(_POLL_S)
        # The lock file is never deleted by diffcse; if someone removed it meanwhile, the lock we
        # hold is on an orphan inode that the next writer would not see: start again on the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(state.lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def index_lock(directory: str | os.PathLike[str], timeout: float | None = 60.0, command: str | None = None) -> Iterator[None]:
    """Hold the writer lock of an index directory (flock on <dir>/.lock) for the block.

    One writer per directory across processes and threads; re-entrant in the holding thread. A
    waiting writer gives up after `timeout` seconds (None: waits for ever) with IndexLockedError
    naming the holder's pid and command, which the holder records in the lock file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SearchIndexError(f"cannot lock index {directory}: it is not a directory")
    key = str(directory.resolve())
    with _REGISTRY_MUTEX:
        state = _REGISTRY.setdefault(key, _DirLock(Path(key) / LOCK_NAME))
    deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
    if not state.mutex.acquire(timeout=-1 if deadline is None else max(deadline - time.monotonic(), 0.0)):
        # Another thread of this process holds it.
        raise _locked_error(directory, state.holder, timeout)
    try:
        if state.depth == 0:
            holder = {
                "pid": os.getpid(),
                "command": (command or _default_command())[:300],
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            if fcntl is not None:
                fd = _flock_wait(state, directory, deadline, timeout)
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
                state.fd = fd
            state.holder = holder
        state.depth += 1
        try:
            yield
        finally:
            state.depth -= 1
            if state.depth == 0:
                state.holder = {}
                if state.fd is not None:
                    fd, state.fd = state.fd, None
                    try:
                        # Cleared before unlocking: the record always describes the current holder.
                        os.ftruncate(fd, 0)
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    finally:
                        os.close(fd)
    finally:
        state.mutex.release()


def lock_holder(directory: str | os.PathLike[str]) -> dict | None:
    """The record of the process holding the directory's writer lock ({pid, command, since}), or None."""
    lock_file = Path(directory) / LOCK_NAME
    if fcntl is None or not lock_file.is_file():
        return None
    fd = os.open(lock_file, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(lock_file)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
