"""Shuffled training order without exact duplicates inside a batch, and corpora read from disk.

In-batch negatives make a sentence's exact duplicate in the same batch a false negative: the loss
pushes apart two identical inputs. `DistinctBatchSampler` shuffles as usual, then moves any item
whose text (by a 64-bit hash, never a string compare) is already in its batch to a later batch,
and counts how many it moved. Every item still appears exactly once per epoch.

`LineCorpus` trains on a text file larger than memory: a one-pass line-offset index (memory-mapped,
under the run's folder, reused while the file is unchanged) and per-item reads, so RAM holds
neither the sentences nor, beyond the pages in use, their offsets.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Sampler

from diffcse.core.errors import InputError
from diffcse.core.io import atomic_path, check_input_file, read_json, write_json_atomic

log = logging.getLogger(__name__)

_BLOCK = 1 << 24  # bytes read per step while indexing a corpus file
_SLICE = 1 << 16  # indices turned into Python ints at a time
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


def text_key(data: bytes) -> int:
    """A stable 64-bit key of a text (same text, same key, in every process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def ids_key(ids: list[int]) -> int:
    """A 64-bit key of a token-id sequence (Python's int-tuple hash is not salted per process)."""
    return hash(tuple(ids))


def _iter_slices(values: np.ndarray) -> Iterator[int]:
    """The values as Python ints, converted a slice at a time (bounded memory)."""
    for start in range(0, len(values), _SLICE):
        yield from values[start : start + _SLICE].tolist()


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
        yield from _iter_slices(self.order())

    def order(self) -> np.ndarray:
        """This epoch's order of every index, each exactly once."""
        n, size = len(self.keys), self.group_size
        index_type = np.int32 if n < 2**31 else np.int64
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(n).astype(index_type)
        keys = self.keys
        out = np.empty(n, dtype=index_type)
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

        for i in _iter_slices(perm):
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
        self.starts, self.lengths, self.keys = build_line_index(self.path, Path(index_dir), encoding_errors)
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.starts)

    def text(self, i: int) -> str:
        """The stripped text of item i (read from disk; the index build checked its UTF-8)."""
        if self._fd is None or self._pid != os.getpid():  # one descriptor per data-loader worker
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start = int(self.starts[i])
        raw = os.pread(self._fd, int(self.lengths[i]), start)
        try:
            return raw.decode("utf-8", errors=self.encoding_errors).strip()
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: invalid UTF-8 at byte {start}: the file changed after it was indexed") from None

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


# The line index: raw arrays (memory-mapped), and a small JSON written last that says they are complete.
_INDEX_ARRAYS = (("starts", np.int64), ("lengths", np.uint32), ("keys", np.int64))


def build_line_index(path: Path, index_dir: Path, encoding_errors: str = "strict") -> tuple[np.ndarray, ...]:
    """(byte offsets, byte lengths, text keys) of the non-blank lines of path, memory-mapped; built once.

    The index lives in index_dir under a name derived from the file's path, size and mtime, so a
    changed file is indexed again. It is written a block at a time (memory stays at one block) and
    completed by its JSON. Invalid UTF-8 is found here, with its line number, not mid-run.
    """
    stat = path.stat()
    tag = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    meta_file = index_dir / f"{path.name}.{tag}.json"
    files = {name: index_dir / f"{path.name}.{tag}.{name}.bin" for name, _ in _INDEX_ARRAYS}
    meta = read_json(meta_file)
    if meta is None:
        index_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            tmps = {name: stack.enter_context(atomic_path(files[name], suffix=".bin")) for name, _ in _INDEX_ARRAYS}
            handles = {name: stack.enter_context(open(tmp, "wb")) for name, tmp in tmps.items()}
            count = 0
            for block in _index_blocks(path, encoding_errors):
                for (name, dtype), array in zip(_INDEX_ARRAYS, block, strict=True):
                    array.astype(dtype).tofile(handles[name])
                count += len(block[0])
            for fh in handles.values():
                fh.flush()
            if not count:
                raise InputError(f"training file {path} has no sentences")
        write_json_atomic(meta_file, {"lines": count, "file": path.name, "bytes": stat.st_size})
        meta = {"lines": count}
    count = int(meta["lines"])
    return tuple(
        np.memmap(files[name], dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
        for name, dtype in _INDEX_ARRAYS
    )


def _index_blocks(path: Path, encoding_errors: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(offsets, lengths, keys) of the non-blank lines, one block of whole lines at a time."""
    offset, lineno, carry = 0, 0, b""
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_BLOCK)
            data = carry + block
            if not data:
                return
            cut = len(data) if not block else data.rfind(b"\n") + 1
            if cut == 0:
                carry = data  # one line longer than a block: read on
                continue
            part, carry = data[:cut], data[cut:]
            if encoding_errors == "strict":
                _check_utf8(part, path, lineno)
            yield _index_block(part, offset)
            lineno += part.count(b"\n")
            offset += len(part)
            if not block:
                return


def _check_utf8(part: bytes, path: Path, first_line: int) -> None:
    """Invalid UTF-8 anywhere in the block is an error naming its line."""
    try:
        part.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + part.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: invalid UTF-8 (fix the file, or pass --encoding-errors replace)") from None


def _index_block(part: bytes, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets, lengths and keys of the non-blank lines of one block of whole lines."""
    buf = np.frombuffer(part, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    ends = np.append(newlines, len(buf)) if len(buf) and buf[-1] != 10 else newlines
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
    # Lines holding only whitespace carry no sentence: count their non-space bytes.
    solid = np.concatenate([[0], np.cumsum(~_WHITESPACE[buf])])
    keep = (solid[ends] - solid[starts]) > 0
    starts, ends = starts[keep].astype(np.int64), ends[keep].astype(np.int64)
    keys = np.fromiter((text_key(part[a:b].strip()) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)),
                       dtype=np.int64, count=len(starts))
    return starts + offset, ends - starts, keys
