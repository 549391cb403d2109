"""``evaluate()``: run STS and transfer tasks for any ``encode(list[str]) -> np.ndarray``."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .classifier import CONFIGS, kernel_description, resolve_kernel
from .data import (
    ALL_TASKS,
    STS_SUBSETS,
    STS_TASKS,
    TRANSFER_TASKS,
    ClassifSplit,
    PairSplit,
    TaskData,
    load_task,
    resolve_data_dir,
)
from .sts import aggregate, check_embeddings, correlations, cosine_rows
from .transfer import make_fitter, run_kfold, run_nested_kfold, run_split

log = logging.getLogger("senteval_runner")

EncodeFn = Callable[[list[str]], np.ndarray]
TASK_SETS = {"sts": STS_TASKS, "transfer": TRANSFER_TASKS, "full": ALL_TASKS}
MODES = ("test", "fasttest", "dev")


def resolve_tasks(tasks: Sequence[str] | None, task_set: str | None) -> list[str]:
    """Task list from explicit names or a named set (default: the STS set), in canonical order."""
    if tasks:
        unknown = [t for t in tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(ALL_TASKS)}")
        return [t for t in ALL_TASKS if t in set(tasks)]
    name = task_set or "sts"
    if name not in TASK_SETS:
        raise ValueError(f"unknown task set {name!r}; choose from {', '.join(TASK_SETS)}")
    return list(TASK_SETS[name])


class EmbeddingCache:
    """Encodes each distinct sentence once per run, in length-sorted chunks, and remembers it."""

    def __init__(self, encode: EncodeFn, batch_size: int) -> None:
        """Wrap ``encode``; chunks are ``encode.preferred_chunk_size`` long if it has one, else batch_size."""
        self.encode = encode
        self.chunk = int(getattr(encode, "preferred_chunk_size", batch_size))
        self.index: dict[str, int] = {}
        self.parts: list[np.ndarray] = []
        self._matrix: np.ndarray | None = None

    def add(self, sentences: Sequence[str]) -> tuple[int, float]:
        """Encode the sentences not seen yet; return (how many were new, seconds spent)."""
        new = sorted({s for s in sentences if s not in self.index}, key=lambda s: (len(s), s))
        t0 = time.perf_counter()
        for i in range(0, len(new), self.chunk):
            batch = new[i : i + self.chunk]
            emb = check_embeddings(self.encode(batch), len(batch), "encode")
            self.parts.append(np.asarray(emb, dtype=np.float32))
            for s in batch:
                self.index[s] = len(self.index)
        if new:
            self._matrix = None
        return len(new), time.perf_counter() - t0

    @property
    def matrix(self) -> np.ndarray:
        """All embeddings so far, row i for the i-th distinct sentence."""
        if self._matrix is None:
            self._matrix = np.concatenate(self.parts, 0) if self.parts else np.zeros((0, 0), np.float32)
        return self._matrix

    def rows(self, sentences: Sequence[str]) -> np.ndarray:
        """Embeddings of ``sentences`` (with repeats), in order."""
        idx = np.fromiter((self.index[s] for s in sentences), dtype=np.int64, count=len(sentences))
        return self.matrix[idx]


def _score_sts(td: TaskData, cache: EmbeddingCache) -> dict:
    """Per-subset (or per-split) correlations, plus SentEval's aggregations for STS12-16."""
    out: dict = {}
    sys_by: dict[str, np.ndarray] = {}
    gold_by: dict[str, np.ndarray] = {}
    for name, split in td.splits.items():
        assert isinstance(split, PairSplit)
        sims = cosine_rows(cache.rows(split.a), cache.rows(split.b))
        out[name] = correlations(sims, split.gold)
        sys_by[name], gold_by[name] = sims, split.gold
    if td.name in STS_SUBSETS:
        out["all"] = aggregate({k: out[k] for k in sys_by}, sys_by, gold_by)
    return out


def _score_transfer(td: TaskData, cache: EmbeddingCache, mode: str, fitter, seed: int, refit: bool) -> dict:
    """Run the task's SentEval protocol on cached embeddings."""
    cfg = CONFIGS[mode]
    if td.name in ("MR", "CR", "SUBJ", "MPQA"):
        s = td.splits["all"]
        assert isinstance(s, ClassifSplit)
        return run_nested_kfold(cache.rows(s.x), s.y, td.nclasses, cfg, fitter, seed)
    if td.name == "SST2":
        tr, dv, te = (td.splits[k] for k in ("train", "dev", "test"))
        return run_split(cache.rows(tr.x), tr.y, cache.rows(dv.x), dv.y, cache.rows(te.x), te.y,
                         td.nclasses, cfg, fitter, seed, refit=refit)
    tr, te = td.splits["train"], td.splits["test"]
    assert isinstance(tr, ClassifSplit) and isinstance(te, ClassifSplit)
    if td.name == "MRPC":
        def feats(s: ClassifSplit) -> np.ndarray:
            """SentEval's MRPC features: [|u - v|, u * v]."""
            a, b = cache.rows(s.x), cache.rows(s.x2 or [])
            return np.c_[np.abs(a - b), a * b]

        return run_kfold(feats(tr), tr.y, feats(te), te.y, td.nclasses, cfg, fitter, seed, f1=True)
    return run_kfold(cache.rows(tr.x), tr.y, cache.rows(te.x), te.y, td.nclasses, cfg, fitter, seed)


def headline(task: str, res: dict, mode: str) -> float | None:
    """The one number the papers' table shows for a task (×100), or None if not computed."""
    if task in STS_SUBSETS:
        return None if mode == "dev" else 100 * res["all"]["spearman"]["all"]
    if task in ("STSBenchmark", "SICKRelatedness"):
        split = "dev" if mode == "dev" else "test"
        return 100 * res[split]["spearman"] if split in res else None
    return res["devacc"] if mode == "dev" else res["acc"]


def evaluate(
    encode: EncodeFn,
    tasks: Sequence[str] | None = None,
    task_set: str | None = None,
    mode: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    seed: int = 1111,
    batched: bool = True,
    device: str = "cpu",
    sts_dev: bool = True,
    classifier_threads: int | None = 1,
    classifier_kernel: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate an encoder on SentEval tasks; returns a JSON-serialisable dict (results, table, settings, timings).

    ``mode``: 'test' (SimCSE's test config: 10-fold, Adam, batch 64, tenacity 5, epoch_size 4),
    'fasttest' (5-fold, RMSprop, batch 128, tenacity 3, epoch_size 2) or 'dev' (fasttest config,
    dev numbers only; STS12-16 have no dev split and are skipped). ``batched=False`` fits SentEval's
    classifiers one at a time (the slow reference path). STS-B and SICK-R are scored on their test
    split and, with ``sts_dev`` (default), their dev split too; in 'dev' mode only the dev split.
    ``classifier_threads``: torch CPU threads while fitting classifiers (None: leave as is). The
    default 1 is deliberate: the classifiers' ops are ~1 ms each, too small to gain from threads,
    and on a shared machine multi-threaded small ops lose up to 5x to OpenMP waiting.
    ``classifier_kernel``: how the batched path trains (see classifier.fit_batched): 'auto' uses the
    fused numba kernel on CPU (its own threads, all cores unless NUMBA_NUM_THREADS says otherwise).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    say = progress or (lambda msg: log.info(msg))
    names = resolve_tasks(tasks, task_set)
    skipped = []
    if mode == "dev":
        skipped = [t for t in names if t in STS_SUBSETS]
        names = [t for t in names if t not in STS_SUBSETS]
    root = resolve_data_dir(data_dir)
    # The dev splits cost little: most of their sentences also occur in STS12-16 (~3% more to encode).
    pair_splits = ("dev",) if mode == "dev" else (("dev", "test") if sts_dev else ("test",))
    kernel = resolve_kernel(classifier_kernel, device) if batched else None
    fitter = make_fitter(batched=batched, device=device, kernel=kernel or "auto")
    cache = EmbeddingCache(encode, batch_size)
    results: dict[str, dict] = {}
    timings: dict[str, dict[str, float]] = {}
    t_run = time.perf_counter()
    for task in names:
        t0 = time.perf_counter()
        td = load_task(root, task, pair_splits)
        t_load = time.perf_counter() - t0
        n_new, t_enc = cache.add(td.sentences())
        t1 = time.perf_counter()
        if td.kind == "sts":
            res = _score_sts(td, cache)
        else:
            with _torch_threads(classifier_threads if device == "cpu" else None):
                res = _score_transfer(td, cache, mode, fitter, seed, refit=not batched)
            res.pop("classify_s", None)
        t_score = time.perf_counter() - t1
        results[task] = res
        timings[task] = {
            "load_s": round(t_load, 3),
            "encode_s": round(t_enc, 3),
            "sentences_encoded": n_new,
            ("classify_s" if td.kind == "classif" else "score_s"): round(t_score, 3),
            "total_s": round(time.perf_counter() - t0, 3),
        }
        h = headline(task, res, mode)
        say(f"{task}: {'n/a' if h is None else f'{h:.2f}'} ({timings[task]['total_s']:.1f}s, "
            f"{n_new} new sentences encoded in {t_enc:.1f}s)")
    total = time.perf_counter() - t_run
    enc_total = sum(t["encode_s"] for t in timings.values())
    return _jsonable({
        "results": results,
        "table": build_table(results, mode),
        "settings": settings(mode, batch_size, seed, batched, device, root, names, skipped) | {
            "sts_pair_splits": list(pair_splits), "classifier_threads": classifier_threads,
            "classifier_kernel": kernel_description(kernel)},
        "timings": {
            "per_task": timings,
            "total_s": round(total, 3),
            "encode_s": round(enc_total, 3),
            "distinct_sentences": len(cache.index),
        },
    })


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count."""
    if n is None:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_table(results: dict, mode: str) -> dict[str, dict[str, float]]:
    """The papers' two tables (STS, transfer): task -> headline ×100, plus 'Avg.' over complete rows."""
    tables: dict[str, dict[str, float]] = {}
    for name, group in (("sts", STS_TASKS), ("transfer", TRANSFER_TASKS)):
        row = {}
        for t in group:
            if t in results:
                h = headline(t, results[t], mode)
                if h is not None:
                    row[t] = round(float(h), 2)
        if row:
            row["Avg."] = round(float(np.mean(list(row.values()))), 2)
            tables[name] = row
    return tables


def settings(mode: str, batch_size: int, seed: int, batched: bool, device: str, root, names, skipped) -> dict:
    """Everything needed to reproduce or compare a run."""
    import scipy
    import sklearn
    import torch

    cfg = CONFIGS[mode]
    return {
        "mode": mode,
        "tasks": list(names),
        "skipped_tasks": {t: "no dev split" for t in skipped},
        "classifier": cfg.as_dict() | {"l2_grid": [10**t for t in range(-5, -1)], "seed": seed,
                                       "fold_seed": 1111, "validation_split": 0.05},
        "classifier_path": "batched" if batched else "reference (one classifier at a time)",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "encode_batch_size": batch_size,
        "sts": "cosine; STS12-16 headline = Spearman over all subsets pooled ('all'); STS-B and SICK-R "
               "unsupervised cosine on the test split (dev split also reported)",
        "data_dir": str(root),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                     "scipy": scipy.__version__, "sklearn": sklearn.__version__},
    }


def _jsonable(obj):
    """Convert numpy scalars/arrays inside nested dicts/lists to plain Python types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def evaluate_features(
    features: np.ndarray,
    labels: np.ndarray,
    mode: str = "test",
    seed: int = 1111,
    batched: bool = True,
    device: str = "cpu",
    classifier_threads: int | None = 1,
    classifier_kernel: str = "auto",
) -> dict:
    """MR/CR's protocol (nested k-fold, the mode's classifier config) on given features and labels 0..C-1."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    y = np.asarray(labels, dtype=np.int64)
    X = np.asarray(features, dtype=np.float32)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"features of shape {X.shape} do not match {len(y)} labels")
    kernel = resolve_kernel(classifier_kernel, device) if batched else None
    fitter = make_fitter(batched=batched, device=device, kernel=kernel or "auto")
    with _torch_threads(classifier_threads if device == "cpu" else None):
        res = run_nested_kfold(X, y, int(y.max()) + 1, CONFIGS[mode], fitter, seed)
    res.pop("classify_s", None)
    res["classifier"] = CONFIGS[mode].as_dict() | {"seed": seed, "kernel": kernel_description(kernel)}
    return _jsonable(res)
