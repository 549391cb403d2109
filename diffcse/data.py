"""Training inputs: read sentence files and triple CSVs with errors that name the line."""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SUPERVISED_COLUMNS = ("sent0", "sent1", "hard_neg")


class InputError(ValueError):
    """Bad user input; the message names the file and line or field."""


@dataclass
class SentenceFile:
    """The sentences of a one-per-line file and what was skipped."""

    sentences: list[str]
    empty_lines: int
    replaced_lines: int


def data_root() -> Path:
    """The data root: $DIFFCSE_DATA_DIR, else the repo's data/ folder."""
    env = os.environ.get("DIFFCSE_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data"


def default_corpus() -> Path:
    """The default unlabeled corpus under the data root."""
    return data_root() / "corpus" / "derived" / "sentences.txt"


def _decode(raw: bytes, path: Path, lineno: int, errors: str) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError as err:
        if errors == "replace":
            return raw.decode("utf-8", errors="replace"), True
        raise InputError(
            f"{path}:{lineno}: invalid UTF-8 at byte {err.start} of the line "
            "(fix the file, or pass --encoding-errors replace)"
        ) from None


def read_sentences(path: str | Path, encoding_errors: str = "strict") -> SentenceFile:
    """Read one sentence per line; skip and count empty lines; invalid UTF-8 names the line."""
    path = Path(path)
    if encoding_errors not in ("strict", "replace"):
        raise InputError(f"--encoding-errors must be 'strict' or 'replace', not {encoding_errors!r}")
    if not path.is_file():
        raise InputError(f"training file {path} does not exist")
    sentences: list[str] = []
    empty = replaced = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            text, was_replaced = _decode(raw.rstrip(b"\r\n"), path, lineno, encoding_errors)
            replaced += was_replaced
            text = text.strip()
            if not text:
                empty += 1
                continue
            sentences.append(text)
    if empty:
        log.info("%s: skipped %d empty lines", path, empty)
    if replaced:
        log.warning("%s: replaced invalid UTF-8 on %d lines", path, replaced)
    return SentenceFile(sentences, empty, replaced)


def read_triples(path: str | Path, encoding_errors: str = "strict") -> list[tuple[str, ...]]:
    """Read a supervised CSV with a header naming sent0, sent1 and (optionally) hard_neg."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training file {path} does not exist")
    raw = path.read_bytes()
    text_lines = []
    for lineno, line in enumerate(raw.splitlines(keepends=True), start=1):
        text_lines.append(_decode(line, path, lineno, encoding_errors)[0])
    reader = csv.DictReader(io.StringIO("".join(text_lines)))
    header = reader.fieldnames or []
    for column in SUPERVISED_COLUMNS[:2]:
        if column not in header:
            raise InputError(f"{path}: header {header} lacks the column {column!r} (need sent0,sent1[,hard_neg])")
    columns = [c for c in SUPERVISED_COLUMNS if c in header]
    rows: list[tuple[str, ...]] = []
    for row in reader:
        values = tuple((row.get(c) or "").strip() for c in columns)
        for column, value in zip(columns, values, strict=True):
            if not value:
                raise InputError(f"{path}:{reader.line_num}: empty field {column!r}")
        rows.append(values)
    return rows


class TokenizedViews(Dataset):
    """Pre-tokenised training examples: each item is a tuple of 1 (unsup) to 3 (sup) id lists."""

    def __init__(self, columns: list[list[list[int]]]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns[0])

    def __getitem__(self, i: int) -> dict:
        return {"views": [col[i] for col in self.columns]}


def tokenize_columns(
    tokenizer: PreTrainedTokenizerBase, columns: list[list[str]], max_seq_length: int
) -> tuple[TokenizedViews, int]:
    """Tokenise every column once (truncating to max_seq_length); return the dataset and the truncated count."""
    tokenised = []
    truncated = 0
    for texts in columns:
        ids = tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
        truncated += sum(len(x) > max_seq_length for x in ids)
        # Keep the final [SEP]/</s> when cutting, as the tokenizer's own truncation does.
        ids = [x if len(x) <= max_seq_length else x[: max_seq_length - 1] + x[-1:] for x in ids]
        tokenised.append(ids)
    return TokenizedViews(tokenised), truncated


class ViewCollator:
    """Pad a batch of examples into input_ids/attention_mask of shape [N, V, L]."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        n, v = len(examples), len(examples[0]["views"])
        longest = max(len(ids) for ex in examples for ids in ex["views"])
        input_ids = torch.full((n, v, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, v, longest), dtype=torch.long)
        for i, ex in enumerate(examples):
            for j, ids in enumerate(ex["views"]):
                input_ids[i, j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[i, j, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
