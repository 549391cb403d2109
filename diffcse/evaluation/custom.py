"""The user's own data: STS pair files (cosine vs gold, Spearman and Pearson) and classification files
(SentEval's MR/CR protocol on the user's labels).

STS file: one pair a line, `sentence1<TAB>sentence2<TAB>score`, UTF-8; a first line whose score field
is not a number is a header. Classification file: `text<TAB>label`, labels any strings (mapped to
0..C-1 in sorted order); a first line `text<TAB>label` (or `sentence<TAB>label`) is a header. Empty
lines are skipped; any other bad row is an error naming file:line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from diffcse.core.errors import InputError
from diffcse.core.io import display_path, iter_lines, read_scored_pairs, split_fields
from senteval_runner.data import PairSplit

EncodeFn = Callable[[list[str]], np.ndarray]
_CLASSIFICATION_HEADERS = {("text", "label"), ("sentence", "label")}


def read_sts_file(path: str | os.PathLike[str]) -> PairSplit:
    """Read a user STS file (sentence1, sentence2, score; optional header) into pairs and gold scores."""
    a, b, gold = read_scored_pairs(path)
    return PairSplit(a, b, np.asarray(gold, dtype=np.float64))


@dataclass
class ClassificationData:
    """Texts with integer labels, and the label names (index = label id)."""

    texts: list[str]
    labels: np.ndarray
    names: list[str]


def read_classification_file(path: str | os.PathLike[str], min_per_label: int = 1) -> ClassificationData:
    """Read a user classification file (text, label; optional header); labels map to ints in sorted order."""
    texts: list[str] = []
    raw_labels: list[str] = []
    for n, line in enumerate(iter_lines(path, "classification file")):
        if n == 0 and tuple(p.strip().lower() for p in line.text.split("\t")) in _CLASSIFICATION_HEADERS:
            continue
        text, label = split_fields(line, path, 2, "text, label")
        texts.append(text)
        raw_labels.append(label)
    names = sorted(set(raw_labels))
    if len(names) < 2:
        raise InputError(f"{path}: {len(names)} distinct label(s); classification needs at least 2")
    counts = {n: raw_labels.count(n) for n in names}
    few = {n: c for n, c in counts.items() if c < min_per_label}
    if few:
        listed = ", ".join(f"{n!r}: {c}" for n, c in sorted(few.items()))
        raise InputError(f"{path}: the {min_per_label}-fold protocol needs at least {min_per_label} examples "
                         f"per label; too few for {listed}")
    ids = {n: i for i, n in enumerate(names)}
    return ClassificationData(texts, np.asarray([ids[n] for n in raw_labels], dtype=np.int64), names)


def score_sts_file(encode: EncodeFn, path: str | os.PathLike[str]) -> dict:
    """Cosine similarity of each pair against the gold scores: Spearman and Pearson (raw, not x100)."""
    from senteval_runner.sts import PairEvaluator

    pairs = read_sts_file(path)
    # The same cosine and correlations as every SentEval STS task.
    result = PairEvaluator(pairs)(encode)
    return {"spearman": result["spearman"], "pearson": result["pearson"], "pairs": len(pairs)}


def score_classification_file(
    encode: EncodeFn,
    path: str | os.PathLike[str],
    mode: str = "test",
    seed: int = 1111,
    batched: bool = True,
    device: str = "cpu",
    classifier_threads: int | None = 1,
    classifier_kernel: str = "auto",
) -> dict:
    """SentEval's MR/CR protocol (nested k-fold, same classifier config) on a user classification file."""
    from senteval_runner.classifier import CONFIGS
    from senteval_runner.engine import evaluate_features
    from senteval_runner.sts import check_embeddings

    data = read_classification_file(path, min_per_label=CONFIGS[mode].kfold)
    features = check_embeddings(encode(data.texts), len(data.texts), f"encode ({display_path(path)})")
    result = evaluate_features(features, data.labels, mode=mode, seed=seed, batched=batched, device=device,
                               classifier_threads=classifier_threads, classifier_kernel=classifier_kernel)
    return {"examples": len(data.texts), "labels": data.names,
            "protocol": f"nested {CONFIGS[mode].kfold}-fold, as MR/CR", **result}
