"""Few-shot sampling and episodes: class balance, reproducibility by seed, held-out splits, errors."""

from __future__ import annotations

import numpy as np
import pytest

from diffcse.finetune.data import Examples, LoadedTask, make_episode
from diffcse.finetune.sampling import holdout_split, sample_per_class, stratified_cap


def labels_of(counts: list[int]) -> np.ndarray:
    """Labels with the given count per class, interleaved so order says nothing."""
    y = np.concatenate([np.full(c, i) for i, c in enumerate(counts)])
    return np.random.default_rng(99).permutation(y)


def test_sample_per_class_is_balanced_and_seeded() -> None:
    y = labels_of([50, 30, 12])
    a = sample_per_class(y, 8, seed=3)
    assert np.bincount(y[a]).tolist() == [8, 8, 8]
    assert len(set(a.tolist())) == 24
    assert np.array_equal(a, sample_per_class(y, 8, seed=3))
    assert not np.array_equal(np.sort(a), np.sort(sample_per_class(y, 8, seed=4)))
    # The order is shuffled, not grouped by class, so batches mix classes.
    assert len(set(y[a[:8]].tolist())) > 1
    assert sorted(sample_per_class(y, None, 0).tolist()) == list(range(len(y)))


def test_sample_per_class_errors_name_the_class() -> None:
    y = labels_of([50, 30, 12])
    with pytest.raises(ValueError, match=r"shots: 13 per class is more than class 2 has \(12\)"):
        sample_per_class(y, 13, 0)
    with pytest.raises(ValueError, match="class 3 has \\(0\\)"):
        sample_per_class(y, 1, 0, nclasses=4)
    with pytest.raises(ValueError, match="shots: must be >= 1"):
        sample_per_class(y, 0, 0)


def test_holdout_split_is_stratified_disjoint_and_seeded() -> None:
    y = labels_of([400, 100])
    pool, test = holdout_split(y, 0.2, seed=7)
    assert len(np.intersect1d(pool, test)) == 0 and len(pool) + len(test) == len(y)
    assert np.bincount(y[test]).tolist() == [80, 20]
    pool2, test2 = holdout_split(y, 0.2, seed=7)
    assert np.array_equal(test, test2)
    assert not np.array_equal(test, holdout_split(y, 0.2, seed=8)[1])
    capped = stratified_cap(y, test, 50, seed=7)
    assert len(capped) == 50 and np.bincount(y[capped]).tolist() == [40, 10]
    assert set(capped.tolist()) <= set(test.tolist())
    with pytest.raises(ValueError, match="test_fraction"):
        holdout_split(y, 1.5, 0)


def fake_task(official: bool) -> LoadedTask:
    """A task with unique sentences, so train/test overlap shows up as shared strings."""
    y = labels_of([60, 40])
    pool = Examples([f"sentence {i}" for i in range(len(y))], y)
    test = Examples([f"test {i}" for i in range(30)], labels_of([15, 15])[:30]) if official else None
    return LoadedTask("FAKE", 2, pool, test)


def test_episode_for_cv_tasks_holds_out_a_test_split_per_seed() -> None:
    task = fake_task(official=False)
    ep = make_episode(task, 4, seed=1, test_fraction=0.2, max_test=10)
    assert np.bincount(ep.train.y).tolist() == [4, 4]
    assert len(ep.test) == 10 and not set(ep.train.x) & set(ep.test.x)
    assert "held-out 0.2" in ep.protocol and "capped at 10" in ep.protocol
    again = make_episode(task, 4, seed=1, test_fraction=0.2, max_test=10)
    assert again.train.x == ep.train.x and again.test.x == ep.test.x
    other = make_episode(task, 4, seed=2, test_fraction=0.2, max_test=10)
    assert other.test.x != ep.test.x
    # Labels travel with their sentences.
    index = {s: int(lab) for s, lab in zip(task.pool.x, task.pool.y, strict=True)}
    assert all(index[s] == lab for s, lab in zip(ep.test.x, ep.test.y, strict=True))


def test_episode_for_official_split_uses_the_test_file() -> None:
    task = fake_task(official=True)
    ep = make_episode(task, 5, seed=0)
    assert ep.test.x == task.test.x and ep.protocol == "official train/test split"
    assert all(s.startswith("sentence") for s in ep.train.x)
    with pytest.raises(ValueError, match="more than class 1 has \\(40\\) in FAKE training pool"):
        make_episode(task, 41, seed=0)
