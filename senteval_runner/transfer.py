"""SentEval's three transfer protocols (nested k-fold, k-fold on train, fixed dev split) on top of a fitter.

A *fitter* takes (X, y, specs, nclasses, cfg, seed) and returns one FitResult per FitSpec; the
batched trainer and the per-model reference are interchangeable, so the protocol code is shared
and only the fitting differs.

Rounding mirrors SentEval exactly, because ties in the L2 choice depend on it:
``round(100 * np.mean(...), 2)`` is numpy's rounding of a float64, while
``round(100 * clf.score(...), 2)`` is Python's rounding of a float.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import numpy as np
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold

from .classifier import ClassifierConfig, FitResult, FitSpec, fit_batched, fit_reference, predict

# SentEval's PyTorch L2 grid: 10**-5 .. 10**-2 (same Python expression, same floats).
REGS: list[float] = [10**t for t in range(-5, -1)]
# InnerKFoldClassifier hard-codes random_state=1111 for both fold splitters.
NESTED_FOLD_SEED = 1111

Fitter = Callable[..., list[FitResult]]


def make_fitter(batched: bool = True, device: str = "cpu", kernel: str = "auto") -> Fitter:
    """Return the batched trainer (with ``kernel``, see fit_batched) or the one-at-a-time reference."""
    if batched:
        return partial(fit_batched, device=device, kernel=kernel)

    def fit_each(X: np.ndarray, y: np.ndarray, specs: list[FitSpec], nclasses: int, cfg: ClassifierConfig,
                 seed: int = 1111) -> list[FitResult]:
        """Fit the specs one at a time with the reference classifier."""
        return [fit_reference(X, y, s, nclasses, cfg, seed, device) for s in specs]

    return fit_each


def _np_round(x: float) -> float:
    """SentEval's ``round(np.float64, 2)`` (numpy rounding)."""
    return float(round(np.float64(x), 2))


def _py_round(x: float) -> float:
    """SentEval's ``round(float, 2)`` (Python rounding)."""
    return round(float(x), 2)


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """sklearn's StratifiedKFold(k, shuffle=True, random_state=seed) folds over labels y."""
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros((len(y), 1)), y))


def score_on(X: np.ndarray, y: np.ndarray, res: FitResult) -> tuple[float, np.ndarray]:
    """Accuracy (1.0 * correct / n) and predictions of a fitted classifier on (X, y)."""
    pred = predict(X, res.weight)
    return 1.0 * int((pred == y).sum()) / len(y), pred


def _fit_stats(results: list[FitResult]) -> dict[str, float]:
    """Counts that tell how much work the classifiers did (for reports)."""
    return {
        "classifiers": len(results),
        "passes_mean": float(np.mean([r.epochs for r in results])) if results else 0.0,
        "steps_total": int(sum(r.steps for r in results)),
    }


def nested_specs(y: np.ndarray, k: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[FitSpec]]:
    """Outer folds and the inner-CV classifiers (outer fold, then L2, then inner fold), as row indices of y."""
    outer = stratified_folds(y, k, NESTED_FOLD_SEED)
    specs: list[FitSpec] = []
    for tr, _te in outer:
        inner = stratified_folds(y[tr], k, NESTED_FOLD_SEED)
        for reg in REGS:
            for itr, ite in inner:
                # inner folds index the outer training rows, not the whole data
                specs.append(FitSpec(tr[itr], reg, val_idx=tr[ite]))
    return outer, specs


def kfold_specs(y: np.ndarray, k: int, seed: int) -> list[FitSpec]:
    """The CV classifiers of the k-fold protocol (L2, then fold), as row indices of y."""
    folds = stratified_folds(y, k, seed)
    return [FitSpec(tr, reg, val_idx=te) for reg in REGS for tr, te in folds]


def run_nested_kfold(X: np.ndarray, y: np.ndarray, nclasses: int, cfg: ClassifierConfig, fitter: Fitter,
                     seed: int = 1111) -> dict:
    """MR/CR/SUBJ/MPQA: outer k folds; inner k-fold picks L2; refit with 5% split; mean outer accuracy."""
    t0 = time.perf_counter()
    k = cfg.kfold
    outer, specs = nested_specs(y, k)
    res = fitter(X, y, specs, nclasses, cfg, seed)
    devresults, chosen = [], []
    per = len(REGS) * k
    for o in range(len(outer)):
        block = res[o * per : (o + 1) * per]
        scores = [_np_round(100 * np.mean([r.val_accuracy for r in block[j * k : (j + 1) * k]])) for j in range(len(REGS))]
        chosen.append(REGS[int(np.argmax(scores))])
        devresults.append(float(np.max(scores)))
    refit_specs = [FitSpec(tr, chosen[o], validation_split=0.05) for o, (tr, _te) in enumerate(outer)]
    refits = fitter(X, y, refit_specs, nclasses, cfg, seed)
    testresults = []
    for (_tr, te), r in zip(outer, refits, strict=True):
        acc, _ = score_on(X[te], y[te], r)
        testresults.append(_py_round(100 * acc))
    return {
        "devacc": _np_round(np.mean(devresults)),
        "acc": _np_round(np.mean(testresults)),
        "ndev": int(len(y)),
        "ntest": int(len(y)),
        "fold_devacc": devresults,
        "fold_acc": testresults,
        "l2_chosen": chosen,
        "fit": _fit_stats(res + refits),
        "classify_s": time.perf_counter() - t0,
    }


def run_kfold(Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray, nclasses: int,
              cfg: ClassifierConfig, fitter: Fitter, seed: int = 1111, f1: bool = False) -> dict:
    """TREC/MRPC: k-fold CV on train picks L2; refit on all train with a 5% split; score test once."""
    t0 = time.perf_counter()
    k = cfg.kfold
    res = fitter(Xtr, ytr, kfold_specs(ytr, k, seed), nclasses, cfg, seed)
    scores = [_np_round(100 * np.mean([r.val_accuracy for r in res[j * k : (j + 1) * k]])) for j in range(len(REGS))]
    optreg = REGS[int(np.argmax(scores))]
    refit = fitter(Xtr, ytr, [FitSpec(np.arange(len(ytr)), optreg, validation_split=0.05)], nclasses, cfg, seed)[0]
    acc, pred = score_on(Xte, yte, refit)
    out = {
        "devacc": float(np.max(scores)),
        "acc": _py_round(100 * acc),
        "ndev": int(len(ytr)),
        "ntest": int(len(yte)),
        "l2_scores": dict(zip([str(r) for r in REGS], scores, strict=True)),
        "l2_chosen": optreg,
        "fit": _fit_stats(res + [refit]),
    }
    if f1:
        out["f1"] = _py_round(100 * f1_score(yte, pred))
    out["classify_s"] = time.perf_counter() - t0
    return out


def run_split(Xtr: np.ndarray, ytr: np.ndarray, Xdev: np.ndarray, ydev: np.ndarray, Xte: np.ndarray,
              yte: np.ndarray, nclasses: int, cfg: ClassifierConfig, fitter: Fitter, seed: int = 1111,
              refit: bool = False) -> dict:
    """SST2: one classifier per L2 on train, early-stopped and selected on dev; test once.

    SentEval refits the chosen L2 with the same seed and data, which reproduces the scan's
    model exactly; by default the scan's model is reused. ``refit=True`` (the reference path)
    trains it again, as SentEval does, and checks that it is the same model.
    """
    t0 = time.perf_counter()
    X = np.concatenate([Xtr, Xdev], 0)
    y = np.concatenate([ytr, ydev], 0)
    tr = np.arange(len(ytr))
    dv = np.arange(len(ytr), len(y))
    res = fitter(X, y, [FitSpec(tr, reg, val_idx=dv) for reg in REGS], nclasses, cfg, seed)
    scores = [_py_round(100 * r.val_accuracy) for r in res]
    j = int(np.argmax(scores))
    final = res[j]
    if refit:
        final = fitter(X, y, [FitSpec(tr, REGS[j], val_idx=dv)], nclasses, cfg, seed)[0]
        if final.val_correct != res[j].val_correct or not np.array_equal(final.weight.numpy(), res[j].weight.numpy()):
            raise RuntimeError("SST2 refit differs from the scan's model: the fit is not deterministic")
        res = res + [final]
    acc, _ = score_on(Xte, yte, final)
    return {
        "devacc": float(np.max(scores)),
        "acc": _py_round(100 * acc),
        "ndev": int(len(ydev)),
        "ntest": int(len(yte)),
        "l2_scores": dict(zip([str(r) for r in REGS], scores, strict=True)),
        "l2_chosen": REGS[j],
        "fit": _fit_stats(res),
        "classify_s": time.perf_counter() - t0,
    }
