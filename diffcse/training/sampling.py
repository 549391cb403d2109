"""Shuffled training order without exact duplicates inside a batch, and corpora read from disk.

In-batch negatives make a sentence's exact duplicate in the same batch a false negative: the loss
pushes apart two identical inputs. `DistinctBatchSampler` shuffles as usual, then moves any item
whose text (by a 64-bit hash, never a string compare) is already in its batch to a later batch,
and counts how many it moved. Every item still appears exactly once per epoch.

`LineCorpus` trains on a text file larger than memory: a one-pass line-offset index (memory-mapped
beside the run, reused while the file is unchanged) and per-item reads, so RAM holds the offsets,
not the sentences.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Sampler

from diffcse.core.errors import InputError
from diffcse.core.io import atomic_path, check_input_file, decode_line

log = logging.getLogger(__name__)

_BLOCK = 1 << 24  # bytes read per step while indexing a corpus file
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


def text_key(data: bytes) -> int:
    """A stable 64-bit key of a text (same text, same key, in every process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def ids_key(ids: list[int]) -> int:
    """A 64-bit key of a token-id sequence (Python's int-tuple hash is not salted per process)."""
    return hash(tuple(ids))


class DistinctBatchSampler(Sampler[int]):
    """A shuffled order in which each aligned run of `group_size` items holds no two equal keys.

    `group_size` is the batch the loss sees: the per-device batch times the number of processes
    (their rows are gathered as one another's negatives). The order depends only on (seed, epoch),
    so a resumed run skips to exactly where it was.
    """

    def __init__(self, keys: np.ndarray, group_size: int, seed: int = 0) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.keys = keys
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0
        self.moved = 0
        self.unavoidable = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of this epoch (called by the data loader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        return iter(order.tolist())

    def order(self) -> np.ndarray:
        """This epoch's order of every index, each exactly once."""
        n, size = len(self.keys), self.group_size
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        keys = self.keys
        out = np.empty(n, dtype=np.int64)
        filled = start = moved = waiting = 0
        seen: set[int] = set()
        # Deferred items by key (oldest first): a batch takes at most one of each waiting key, so a
        # text with many copies costs one look per batch, not one per copy.
        pending: dict[int, deque[int]] = {}

        def place(i: int, k: int) -> None:
            nonlocal filled, start, seen
            out[filled] = i
            filled += 1
            seen.add(k)
            if filled - start == size:
                start, seen = filled, set()

        def retry_pending() -> None:
            # Deferred items go first into each new batch, where their twin is not; placing one may
            # start another batch, so look again until nothing moves.
            nonlocal waiting
            progress = True
            while pending and progress:
                progress = False
                for k in list(pending):
                    if k in seen:
                        continue
                    queue = pending[k]
                    place(queue.popleft(), k)
                    waiting -= 1
                    progress = True
                    if not queue:
                        del pending[k]

        for i in perm.tolist():
            k = int(keys[i])
            if k in seen:
                pending.setdefault(k, deque()).append(i)
                waiting += 1
                moved += 1
                continue
            group = start
            place(i, k)
            if start != group and pending:
                retry_pending()
        unavoidable = 0
        while pending:
            # Only the tail is left and every waiting item's twin is in its batch: more copies of a
            # text than batches remain. Place one anyway (the Trainer drops a last partial batch).
            before = waiting
            retry_pending()
            if waiting == before:
                k = next(iter(pending))
                place(pending[k].popleft(), k)
                waiting -= 1
                unavoidable += 1
                if not pending[k]:
                    del pending[k]
        self.moved, self.unavoidable = moved, unavoidable
        if moved:
            log.info("epoch %d: moved %d duplicate texts to later batches (%d left in the tail)", self.epoch, moved, unavoidable)
        return out


class LineCorpus(Dataset):
    """Sentences of a large text file, read from disk per item through a memory-mapped line index."""

    def __init__(self, path: str | Path, tokenizer: object, max_seq_length: int, index_dir: str | Path,
                 encoding_errors: str = "strict") -> None:
        self.path = check_input_file(path, "training file")
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.encoding_errors = encoding_errors
        self.starts, self.ends, self.linenos, self.keys = build_line_index(self.path, Path(index_dir))
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.starts)

    def text(self, i: int) -> str:
        """The stripped text of item i (read from disk)."""
        if self._fd is None or self._pid != os.getpid():  # one descriptor per data-loader worker
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = int(self.starts[i]), int(self.ends[i])
        raw = os.pread(self._fd, end - start, start)
        return decode_line(raw, self.path, int(self.linenos[i]), self.encoding_errors)[0].strip()

    def __getitem__(self, i: int) -> dict:
        ids = self.tokenizer(self.text(i), truncation=False, add_special_tokens=True)["input_ids"]
        if len(ids) > self.max_seq_length:
            # Keep the final [SEP]/</s>, as the tokenizer's own truncation does.
            ids = ids[: self.max_seq_length - 1] + ids[-1:]
        return {"views": [ids]}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1  # descriptors do not cross into worker processes
        return state


def build_line_index(path: Path, index_dir: Path) -> tuple[np.ndarray, ...]:
    """(starts, ends, line numbers, text keys) of the non-blank lines of path, memory-mapped; built once.

    The index lives in index_dir under a name derived from the file's path, size and mtime, so a
    changed file is indexed again. Invalid UTF-8 is found here, with its line number, not mid-run.
    """
    stat = path.stat()
    tag = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    files = {name: index_dir / f"{path.name}.{tag}.{name}.npy" for name in ("starts", "ends", "linenos", "keys")}
    if all(f.is_file() for f in files.values()):
        return tuple(np.load(files[name], mmap_mode="r") for name in ("starts", "ends", "linenos", "keys"))
    index_dir.mkdir(parents=True, exist_ok=True)
    starts, ends, linenos, keys = [], [], [], []
    offset, lineno, carry = 0, 0, b""
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_BLOCK)
            data = carry + block
            if not block:
                if not data:
                    break
                cut = len(data)  # a last line without a newline
            else:
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
            part, carry = data[:cut], data[cut:]
            _check_utf8(part, path, lineno)
            s, e, ln, k = _index_block(part, offset, lineno)
            starts.append(s)
            ends.append(e)
            linenos.append(ln)
            keys.append(k)
            lineno += part.count(b"\n") + (0 if part.endswith(b"\n") else 1)
            offset += len(part)
            if not block:
                break
    arrays = {
        "starts": np.concatenate(starts) if starts else np.zeros(0, np.int64),
        "ends": np.concatenate(ends) if ends else np.zeros(0, np.int64),
        "linenos": np.concatenate(linenos) if linenos else np.zeros(0, np.int64),
        "keys": np.concatenate(keys) if keys else np.zeros(0, np.int64),
    }
    if not len(arrays["starts"]):
        raise InputError(f"training file {path} has no sentences")
    for name, array in arrays.items():
        with atomic_path(files[name], suffix=".npy") as tmp:
            np.save(tmp, array)
    return tuple(np.load(files[name], mmap_mode="r") for name in ("starts", "ends", "linenos", "keys"))


def _check_utf8(part: bytes, path: Path, first_line: int) -> None:
    """Invalid UTF-8 anywhere in the block is an error naming its line."""
    try:
        part.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + part.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: invalid UTF-8 (fix the file; a file read from disk is not repaired)") from None


def _index_block(part: bytes, offset: int, first_line: int) -> tuple[np.ndarray, ...]:
    """Line spans of one block of whole lines: non-blank lines only, with their keys."""
    buf = np.frombuffer(part, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    ends = np.append(newlines, len(buf)) if len(buf) and buf[-1] != 10 else newlines
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
    # Lines holding only whitespace carry no sentence: count their non-space bytes.
    solid = np.concatenate([[0], np.cumsum(~_WHITESPACE[buf])])
    keep = (solid[ends] - solid[starts]) > 0
    starts, ends = starts[keep].astype(np.int64), ends[keep].astype(np.int64)
    linenos = np.flatnonzero(keep).astype(np.int64) + first_line + 1
    keys = np.fromiter((text_key(part[a:b].strip()) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)),
                       dtype=np.int64, count=len(starts))
    return starts + offset, ends + offset, linenos, keys
