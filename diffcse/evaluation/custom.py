"""The user's own data: STS pair files (cosine vs gold, Spearman and Pearson) and classification files
(SentEval's MR/CR protocol on the user's labels).

STS file: one pair a line, `sentence1<TAB>sentence2<TAB>score`, UTF-8; a first line whose score field
is not a number is a header. Classification file: `text<TAB>label`, labels any strings (mapped to
0..C-1 in sorted order); a first line `text<TAB>label` (or `sentence<TAB>label`) is a header. Empty
lines are skipped; any other bad row is an error naming file:line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from diffcse.core.errors import InputError
from diffcse.core.io import Line, display_path, iter_lines
from senteval_runner.data import PairSplit

EncodeFn = Callable[[list[str]], np.ndarray]
_CLASSIFICATION_HEADERS = {("text", "label"), ("sentence", "label")}


def _fields(line: Line, path: str | os.PathLike[str], need: int, what: str) -> list[str]:
    """The tab-separated fields of a line, each stripped; a wrong count or an empty one names file:line."""
    parts = [p.strip() for p in line.text.split("\t")]
    if len(parts) != need:
        raise InputError(f"{path}:{line.lineno}: expected {need} tab-separated fields ({what}), got {len(parts)}")
    for i, part in enumerate(parts, start=1):
        if not part:
            raise InputError(f"{path}:{line.lineno}: field {i} ({what.split(', ')[i - 1]}) is empty")
    return parts


def _score(text: str) -> float | None:
    """The score as a finite float, or None when the field is not one."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_sts_file(path: str | os.PathLike[str]) -> PairSplit:
    """Read a user STS file (sentence1, sentence2, score; optional header) into pairs and gold scores."""
    what = "sentence1, sentence2, score"
    a: list[str] = []
    b: list[str] = []
    gold: list[float] = []
    for n, line in enumerate(iter_lines(path, "STS file")):
        parts = [p.strip() for p in line.text.split("\t")]
        if n == 0 and len(parts) == 3 and _score(parts[2]) is None:
            continue  # the first non-empty line, with a non-numeric score: the header
        s1, s2, raw = _fields(line, path, 3, what)
        value = _score(raw)
        if value is None:
            raise InputError(f"{path}:{line.lineno}: score is not a finite number: {raw!r}")
        a.append(s1)
        b.append(s2)
        gold.append(value)
    if len(gold) < 2:
        raise InputError(f"{path}: {len(gold)} scored pair(s); a correlation needs at least 2")
    if len(set(gold)) < 2:
        raise InputError(f"{path}: every gold score is {gold[0]}; a correlation needs scores that vary")
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
        text, label = _fields(line, path, 2, "text, label")
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
    from senteval_runner.sts import check_embeddings, correlations, distinct_sorted, score_pairs

    pairs = read_sts_file(path)
    sentences = distinct_sorted(pairs.a + pairs.b)
    emb = check_embeddings(encode(sentences), len(sentences), f"encode ({display_path(path)})")
    # The same cosine (senteval_runner.sts.cosine_rows) as every SentEval STS task.
    sims = score_pairs(pairs, emb, {s: i for i, s in enumerate(sentences)})
    result = correlations(sims, pairs.gold)
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
