"""Alignment and uniformity of an embedding space (Wang & Isola 2020), as the SimCSE paper reports them.

    alignment(x, y, alpha) = mean over positive pairs of ||f(x) - f(y)||^alpha
    uniformity(x, t)       = log mean over distinct pairs a != b of exp(-t ||f(a) - f(b)||^2)

with f the L2-normalised embedding. Lower is better for both. SimCSE takes the STS-B pairs whose
gold score is above 4 (of 5) as positives and every STS-B sentence as the data distribution;
`stsb_alignment_uniformity` does that on one split (test by default) and says which. Everything
is float64, and uniformity is computed in row blocks, so 3k sentences cost a few MiB.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from scipy.special import logsumexp

# SimCSE: "STS-B pairs with a score higher than 4" (gold on the 0..5 scale).
POSITIVE_THRESHOLD = 4.0


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float64; a zero or non-finite row is an error (it has no direction)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of embeddings, got shape {x.shape}")
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0, 0])
        raise ValueError(f"embedding row {row} holds NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"embedding row {int(np.argmax(norms[:, 0] == 0))} is all zeros and cannot be normalised")
    return x / norms


def alignment(x: np.ndarray, y: np.ndarray, alpha: float = 2.0) -> float:
    """Mean ||f(x_i) - f(y_i)||^alpha over the positive pairs (x_i, y_i) of L2-normalised rows."""
    x, y = normalize_rows(x), normalize_rows(y)
    if x.shape != y.shape:
        raise ValueError(f"alignment needs paired rows: shapes {x.shape} and {y.shape} differ")
    if len(x) == 0:
        raise ValueError("alignment needs at least one positive pair")
    return float(np.mean(np.linalg.norm(x - y, axis=1) ** alpha))


def uniformity(x: np.ndarray, t: float = 2.0, block: int = 512) -> float:
    """log of the mean of exp(-t ||f(a) - f(b)||^2) over all distinct pairs a < b of L2-normalised rows."""
    x = normalize_rows(x)
    n = len(x)
    if n < 2:
        raise ValueError("uniformity needs at least two embeddings")
    parts = []
    for start in range(0, n, block):
        rows = x[start : start + block]
        sq = np.maximum(2.0 - 2.0 * (rows @ x[start:].T), 0.0)  # ||a-b||^2 of unit vectors
        # Only the pairs with j > i, so each unordered pair counts once (as torch.pdist does).
        later = np.arange(n - start)[None, :] > np.arange(len(rows))[:, None]
        parts.append(logsumexp(-t * sq[later]))
    # Sum of exps via logsumexp (stable for any t), then minus the log of the pair count.
    return float(logsumexp(parts) - np.log(n * (n - 1) / 2))


def stsb_alignment_uniformity(
    encode: Callable[[list[str]], np.ndarray],
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "test",
    threshold: float = POSITIVE_THRESHOLD,
) -> dict:
    """Alignment (gold > threshold pairs) and uniformity (all distinct sentences) on one STS-B split."""
    from senteval_runner.data import STSB_FILES, read_stsb_file, resolve_data_dir
    from senteval_runner.sts import check_embeddings, distinct_sorted

    if split not in STSB_FILES:
        raise ValueError(f"STS-B split must be one of {', '.join(STSB_FILES)}, got {split!r}")
    path = resolve_data_dir(data_dir) / "downstream" / "STS" / "STSBenchmark" / STSB_FILES[split]
    pairs = read_stsb_file(path)
    sentences = distinct_sorted(pairs.a + pairs.b)
    emb = check_embeddings(encode(sentences), len(sentences), "alignment/uniformity")
    index = {s: i for i, s in enumerate(sentences)}
    positive = np.flatnonzero(pairs.gold > threshold)
    if len(positive) == 0:
        raise ValueError(f"STS-B {split}: no pair has a gold score above {threshold}")
    rows_a = emb[[index[pairs.a[i]] for i in positive]]
    rows_b = emb[[index[pairs.b[i]] for i in positive]]
    return {
        "alignment": alignment(rows_a, rows_b),
        "uniformity": uniformity(emb),
        "data": f"STS-B {split}",
        "split": split,
        "positive_pairs": int(len(positive)),
        "positive_threshold": threshold,
        "sentences": len(sentences),
        "alpha": 2,
        "t": 2,
    }
