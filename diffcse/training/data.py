"""Training inputs: read sentence files and triple CSVs with errors that name the line."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from diffcse.core.errors import InputError
from diffcse.core.io import iter_lines, read_csv_columns

log = logging.getLogger(__name__)

SUPERVISED_COLUMNS = ("sent0", "sent1", "hard_neg")


@dataclass
class SentenceFile:
    """The sentences of a one-per-line file, their line numbers, and what was skipped."""

    sentences: list[str]
    empty_lines: int
    replaced_lines: int
    linenos: list[int]


def read_sentences(path: str | Path, encoding_errors: str = "strict", what: str = "training file") -> SentenceFile:
    """Read one sentence per line; skip and count empty lines; invalid UTF-8 names the line."""
    sentences: list[str] = []
    linenos: list[int] = []
    empty = replaced = 0
    for line in iter_lines(path, what, encoding_errors, keep_empty=True):
        replaced += line.replaced
        if not line.text:
            empty += 1
            continue
        sentences.append(line.text)
        linenos.append(line.lineno)
    if empty:
        log.info("%s: skipped %d empty lines", path, empty)
    if replaced:
        log.warning("%s: replaced invalid UTF-8 on %d lines", path, replaced)
    return SentenceFile(sentences, empty, replaced, linenos)


def read_triples(path: str | Path, encoding_errors: str = "strict") -> list[tuple[str, ...]]:
    """Read a supervised CSV with a header naming sent0, sent1 and (optionally) hard_neg."""
    return read_csv_columns(path, SUPERVISED_COLUMNS[:2], SUPERVISED_COLUMNS[2:], "training file", encoding_errors)[1]


class TokenizedViews(Dataset):
    """Pre-tokenised training examples: each item is a tuple of 1 (unsup) to 3 (sup) id lists."""

    def __init__(self, columns: list[list[list[int]]], labels: list[int] | list[float] | None = None) -> None:
        self.columns = columns
        self.labels = labels  # per-example targets of the pair objectives (class ids or scores)

    def __len__(self) -> int:
        return len(self.columns[0])

    def __getitem__(self, i: int) -> dict:
        item = {"views": [col[i] for col in self.columns]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


def read_labelled_pairs(path: str | Path, target: str, encoding_errors: str = "strict") -> tuple[list[list[str]], list, list[str] | None]:
    """A pair CSV (sentence1,sentence2,label|score): the two text columns, the targets, and label names.

    `target` 'label': any strings, mapped to class ids in sorted order (names returned); 'score': numbers.
    """
    _, rows = read_csv_columns(path, ("sentence1", "sentence2", target), (), "training file", encoding_errors)
    columns = [[r[0] for r in rows], [r[1] for r in rows]]
    if target == "score":
        scores = []
        for n, row in enumerate(rows, start=2):
            try:
                scores.append(float(row[2]))
            except ValueError:
                raise InputError(f"{path}: row {n}: score {row[2]!r} is not a number") from None
        return columns, scores, None
    names = sorted({r[2] for r in rows})
    if len(names) < 2:
        raise InputError(f"{path}: column 'label' holds {len(names)} distinct label(s); classification needs 2 or more")
    ids = {name: i for i, name in enumerate(names)}
    return columns, [ids[r[2]] for r in rows], names


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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "label" in examples[0]:
            batch["labels"] = torch.tensor([ex["label"] for ex in examples])
        return batch
