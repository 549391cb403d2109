"""Unsupervised STS scoring: cosine similarity, per-subset correlations, aggregations, STS-B dev evaluator."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr

from .data import STSB_FILES, PairSplit, read_stsb_file, resolve_data_dir

EncodeFn = Callable[[list[str]], np.ndarray]


def cosine_rows(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row-wise cosine; NaN/inf inputs and zero vectors give 0, as SentEval's nan_to_num does."""
    u = np.nan_to_num(np.asarray(u, dtype=np.float64))
    v = np.nan_to_num(np.asarray(v, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
    return np.nan_to_num(sim)


def correlations(sys_scores: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman (raw, not ×100) of system scores against gold."""
    if len(gold) < 2:
        return {"pearson": float("nan"), "spearman": float("nan"), "nsamples": len(gold)}
    return {
        "pearson": float(pearsonr(sys_scores, gold)[0]),
        "spearman": float(spearmanr(sys_scores, gold)[0]),
        "nsamples": int(len(gold)),
    }


def aggregate(per_subset: dict[str, dict[str, float]], sys_by_subset: dict[str, np.ndarray],
              gold_by_subset: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """SentEval/SimCSE aggregations: 'all' (pooled correlation), 'mean', 'wmean' (by subset size)."""
    names = list(per_subset)
    weights = np.array([per_subset[n]["nsamples"] for n in names], dtype=np.float64)
    out: dict[str, dict[str, float]] = {}
    all_sys = np.concatenate([sys_by_subset[n] for n in names])
    all_gold = np.concatenate([gold_by_subset[n] for n in names])
    pooled = correlations(all_sys, all_gold)
    for metric in ("pearson", "spearman"):
        vals = np.array([per_subset[n][metric] for n in names], dtype=np.float64)
        out[metric] = {
            "all": pooled[metric],
            "mean": float(np.mean(vals)),
            "wmean": float(np.average(vals, weights=weights)),
        }
    return out


def score_pairs(split: PairSplit, emb: np.ndarray, index: dict[str, int]) -> np.ndarray:
    """Cosine of each pair, looking sentences up in a distinct-sentence embedding matrix."""
    ia = np.fromiter((index[s] for s in split.a), dtype=np.int64, count=len(split.a))
    ib = np.fromiter((index[s] for s in split.b), dtype=np.int64, count=len(split.b))
    return cosine_rows(emb[ia], emb[ib])


def distinct_sorted(sentences: Sequence[str]) -> list[str]:
    """Distinct sentences ordered by length (then text), so batches need little padding."""
    return sorted(set(sentences), key=lambda s: (len(s), s))


def check_embeddings(emb: np.ndarray, n: int, where: str) -> np.ndarray:
    """Validate an encoder's output shape so a wrong encode fn fails loudly, not with odd scores."""
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"{where}: encode returned shape {emb.shape}, expected ({n}, dim)")
    return emb


class PairEvaluator:
    """Spearman/Pearson of cosine vs gold over any set of scored pairs, encoding each distinct sentence once.

    ``sentences`` are the distinct sentences (sorted by length) and ``__call__`` calls
    ``encode(self.sentences)`` exactly once, so a caller can pre-tokenise ``sentences`` and
    recognise the list; ``score(emb)`` scores embeddings already computed for ``sentences``.
    """

    def __init__(self, pairs: PairSplit) -> None:
        self.pairs = pairs
        self.sentences: list[str] = distinct_sorted(self.pairs.a + self.pairs.b)
        self._index = {s: i for i, s in enumerate(self.sentences)}

    def score(self, emb: np.ndarray) -> dict[str, float]:
        """Raw Spearman/Pearson of cosine vs gold from the embeddings of ``sentences`` (in that order)."""
        emb = check_embeddings(emb, len(self.sentences), type(self).__name__)
        c = correlations(score_pairs(self.pairs, emb, self._index), self.pairs.gold)
        return {"spearman": c["spearman"], "pearson": c["pearson"], "n": float(c["nsamples"])}

    def __call__(self, encode: EncodeFn) -> dict[str, float]:
        """Encode the distinct sentences once and score them."""
        return self.score(encode(self.sentences))


class StsbDevEvaluator(PairEvaluator):
    """Cheap STS-B (dev by default) Spearman for the trainer's periodic checks."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, split: str = "dev") -> None:
        """Parse sts-<split>.csv from the resolved SentEval data dir."""
        if split not in STSB_FILES:
            raise ValueError(f"split must be one of {sorted(STSB_FILES)}, got {split!r}")
        root = resolve_data_dir(data_dir)
        self.split = split
        self.path = root / "downstream" / "STS" / "STSBenchmark" / STSB_FILES[split]
        super().__init__(read_stsb_file(self.path))
