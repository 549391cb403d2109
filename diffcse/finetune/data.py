"""Few-shot episodes over the SentEval transfer tasks, read with senteval_runner's loaders.

Protocol (one episode per seed):
- TREC, SST2, MRPC have official splits: shots are drawn from the train split, and the test
  split is the evaluation set (SST2's dev split is unused).
- MR, CR, SUBJ, MPQA have no official split: per seed, StratifiedShuffleSplit(test_size=
  test_fraction, random_state=seed) holds out a test split; shots are drawn from the rest.
- k examples per class are drawn with numpy's default_rng(seed) (sample_per_class).
- The test set may be capped to max_test examples, stratified, with random_state=seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffcse.finetune.names import CV_TASKS, FEWSHOT_TASKS, PAIR_TASKS
from diffcse.finetune.sampling import holdout_split, sample_per_class, stratified_cap

__all__ = ["CV_TASKS", "FEWSHOT_TASKS", "PAIR_TASKS", "Episode", "Examples", "LoadedTask",
           "load_fewshot_task", "make_episode"]


@dataclass
class Examples:
    """Sentences (and second sentences for pair tasks) with integer labels."""

    x: list[str]
    y: np.ndarray
    x2: list[str] | None = None

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.x)

    def take(self, idx: np.ndarray) -> Examples:
        """The examples at the given indices, in that order."""
        return Examples(
            [self.x[i] for i in idx],
            np.asarray(self.y)[idx],
            None if self.x2 is None else [self.x2[i] for i in idx],
        )


@dataclass
class LoadedTask:
    """One task's labelled data: a train pool and an official test split, or one pool for CV tasks."""

    name: str
    nclasses: int
    pool: Examples
    test: Examples | None


@dataclass
class Episode:
    """The few-shot training set and the test set of one seed."""

    task: str
    seed: int
    shots: int | None
    nclasses: int
    train: Examples
    test: Examples
    protocol: str


def load_fewshot_task(task: str, data_dir: str | Path | None = None) -> LoadedTask:
    """Load a transfer task from the SentEval tree (``$DIFFCSE_DATA_DIR/senteval`` by default)."""
    from senteval_runner.data import ClassifSplit, load_task, resolve_data_dir

    name = _canonical_task(task)
    td = load_task(resolve_data_dir(data_dir), name)

    def conv(split: ClassifSplit) -> Examples:
        return Examples(list(split.x), np.asarray(split.y, dtype=np.int64), None if split.x2 is None else list(split.x2))

    if name in CV_TASKS:
        return LoadedTask(name, td.nclasses, conv(td.splits["all"]), None)
    return LoadedTask(name, td.nclasses, conv(td.splits["train"]), conv(td.splits["test"]))


def _canonical_task(task: str) -> str:
    """Map a task name (any case) to its SentEval name, or fail naming the choices."""
    for name in FEWSHOT_TASKS:
        if task.upper() == name:
            return name
    raise ValueError(f"task: unknown task {task!r}; choose from {', '.join(FEWSHOT_TASKS)}")


def make_episode(
    loaded: LoadedTask,
    shots: int | None,
    seed: int,
    test_fraction: float = 0.2,
    max_test: int | None = None,
) -> Episode:
    """Draw one seed's few-shot training set (k per class, None = all) and its test set."""
    if loaded.test is None:
        pool_idx, test_idx = holdout_split(loaded.pool.y, test_fraction, seed)
        pool = loaded.pool.take(pool_idx)
        test_src, test_idx = loaded.pool, test_idx
        protocol = f"held-out {test_fraction:g} stratified split (random_state={seed})"
    else:
        pool = loaded.pool
        test_src, test_idx = loaded.test, np.arange(len(loaded.test))
        protocol = "official train/test split"
    if max_test is not None and len(test_idx) > max_test:
        test_idx = stratified_cap(test_src.y, test_idx, max_test, seed)
        protocol += f", test capped at {max_test} (stratified, random_state={seed})"
    train_idx = sample_per_class(pool.y, shots, seed, loaded.nclasses, where=f"{loaded.name} training pool")
    return Episode(
        task=loaded.name, seed=seed, shots=shots, nclasses=loaded.nclasses,
        train=pool.take(train_idx), test=test_src.take(test_idx), protocol=protocol,
    )
