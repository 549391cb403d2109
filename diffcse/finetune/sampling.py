"""Few-shot sampling: k examples per class by seed, held-out test splits, stratified caps."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedShuffleSplit, train_test_split


def sample_per_class(
    labels: np.ndarray, k: int | None, seed: int, nclasses: int | None = None, where: str = "training data"
) -> np.ndarray:
    """Indices of k examples of every class (all of them when k is None), shuffled, by seed."""
    labels = np.asarray(labels)
    if k is None:
        return np.random.default_rng(seed).permutation(len(labels))
    if k < 1:
        raise ValueError(f"shots: must be >= 1 (got {k})")
    classes = range(nclasses) if nclasses is not None else np.unique(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            raise ValueError(f"shots: {k} per class is more than class {c} has ({len(idx)}) in {where}")
        chosen.append(rng.choice(idx, size=k, replace=False))
    return rng.permutation(np.concatenate(chosen))


def holdout_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test) indices: a stratified held-out test split for tasks without an official one."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    pool, test = next(splitter.split(np.zeros((len(labels), 1)), labels))
    return np.sort(pool), np.sort(test)


def stratified_cap(labels: np.ndarray, indices: np.ndarray, max_n: int | None, seed: int) -> np.ndarray:
    """At most max_n of the given indices, keeping the class proportions (stratified, by seed)."""
    indices = np.asarray(indices)
    if max_n is None or len(indices) <= max_n:
        return indices
    if max_n < 1:
        raise ValueError(f"max_test: must be >= 1 (got {max_n})")
    sub = np.asarray(labels)[indices]
    # Stratification needs >= 2 examples of a class on each side; tiny classes fall back to random.
    _, counts = np.unique(sub, return_counts=True)
    stratify = sub if counts.min() >= 2 and max_n >= len(counts) else None
    kept, _ = train_test_split(indices, train_size=max_n, stratify=stratify, random_state=seed)
    return np.sort(kept)
