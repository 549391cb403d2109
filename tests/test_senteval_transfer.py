"""Transfer protocol: fold splits, SentEval's classifier semantics, batched == reference, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_senteval import make_tree, toy_encode
from sklearn.model_selection import StratifiedKFold

from diffcse.core.io import write_json_atomic
from senteval_runner.classifier import (
    CONFIGS,
    ClassifierConfig,
    FitSpec,
    fit_batched,
    fit_reference,
    initial_weight,
    resolve_kernel,
    split_indices,
)
from senteval_runner.engine import evaluate
from senteval_runner.report import format_table
from senteval_runner.transfer import REGS, kfold_specs, make_fitter, nested_specs, run_nested_kfold

torch.set_num_threads(1)


def toy_problem(n: int = 300, d: int = 12, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy linear classification problem (not separable, so early stopping matters)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X @ rng.normal(size=(d, c)) + 2.0 * rng.normal(size=(n, c))).argmax(1)
    return X, y


def test_nested_folds_are_sentevals_stratified_kfold() -> None:
    """Rows of every inner-CV classifier equal SentEval's X_train[inner_idx] with random_state=1111."""
    _, y = toy_problem(230, c=2)
    rows = np.arange(len(y))  # X = row ids, so indexing shows which rows a classifier sees
    k = 4
    outer, specs = nested_specs(y, k)
    expected = []
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=1111)
    inner = StratifiedKFold(n_splits=k, shuffle=True, random_state=1111)
    for tr, te in skf.split(rows[:, None], y):
        Xtr, ytr = rows[tr], y[tr]
        expected.append((tr, te))
        for _reg in REGS:
            for itr, ite in inner.split(Xtr[:, None], ytr):
                spec = specs.pop(0)
                assert np.array_equal(spec.train_idx, Xtr[itr])
                assert np.array_equal(spec.val_idx, Xtr[ite])
                assert spec.l2 == _reg
    assert not specs
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(outer, expected, strict=True))


def test_kfold_specs_use_the_given_seed() -> None:
    """TREC/MRPC folds: StratifiedKFold(k, shuffle=True, random_state=seed), L2 outer loop."""
    _, y = toy_problem(100, c=3)
    for seed in (1111, 7):
        specs = kfold_specs(y, 5, seed)
        folds = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(np.zeros((100, 1)), y))
        assert len(specs) == 5 * len(REGS)
        for j, s in enumerate(specs):
            assert np.array_equal(s.train_idx, folds[j % 5][0]) and s.l2 == REGS[j // 5]


def test_validation_split_is_sentevals_global_rng_permutation() -> None:
    """5% split: np.random.seed(1111); permutation(n); first int(0.05*n) rows validate."""
    idx = np.arange(1000, 1337)
    tr, va, rs = split_indices(idx, 0.05, 1111)
    np.random.seed(1111)
    perm = np.random.permutation(len(idx))
    k = int(0.05 * len(idx))
    assert np.array_equal(va, idx[perm[:k]]) and np.array_equal(tr, idx[perm[k:]])
    # and the RNG continues with the epoch permutations, as SentEval's global RNG does
    assert np.array_equal(rs.permutation(len(tr)), np.random.permutation(len(tr)))


def test_initial_weights_are_nn_linear_after_manual_seed() -> None:
    """Every classifier starts from nn.Linear(D, C) created right after torch.manual_seed(seed)."""
    torch.manual_seed(1111)
    lin = torch.nn.Linear(7, 3)
    w = initial_weight(7, 3, 1111)
    assert torch.equal(w[:-1], lin.weight.detach().t()) and torch.equal(w[-1], lin.bias.detach())


def test_max_epoch_counts_passes_and_allows_the_last_one() -> None:
    """`while nepoch <= max_epoch`: max_epoch=8, epoch_size=4 trains 3 epochs (12 passes) at most."""
    X, y = toy_problem(200)
    cfg = ClassifierConfig("adam", 64, tenacity=1000, epoch_size=4, max_epoch=8, kfold=5)
    spec = FitSpec(np.arange(150), 1e-4, val_idx=np.arange(150, 200))
    r = fit_reference(X, y, spec, 3, cfg)
    b = fit_batched(X, y, [spec], 3, cfg)[0]
    assert r.epochs == b.epochs == 12
    assert r.steps == 12 * 3  # ceil(150 / 64) batches per pass


def test_early_stopping_counter_never_resets() -> None:
    """tenacity=0 stops at the first epoch without strict improvement; the best epoch's weights are kept."""
    X, y = toy_problem(200)
    cfg = ClassifierConfig("adam", 64, tenacity=0, epoch_size=1, max_epoch=200, kfold=5)
    spec = FitSpec(np.arange(150), 1e-4, val_idx=np.arange(150, 200))
    r = fit_reference(X, y, spec, 3, cfg)
    # the kept weights reproduce the best validation accuracy
    pred = (torch.as_tensor(X[150:]) @ r.weight[:-1] + r.weight[-1]).argmax(1).numpy()
    assert int((pred == y[150:]).sum()) == r.val_correct
    assert r.epochs < 200


@pytest.mark.parametrize("kernel", ["fused", "torch"])
@pytest.mark.parametrize("mode", ["test", "fasttest"])
def test_batched_equals_reference(mode: str, kernel: str) -> None:
    """Same validation accuracy, same stopping epoch, weights equal to float tolerance, for every model.

    Groups differ in size (so some skip the last mini-batch of a pass), one group has fewer
    members than the others (padding), one model uses the 5% validation split, and the last
    mini-batch of a pass is not a multiple of the fused kernel's 4-row blocks.
    """
    X, y = toy_problem(260, d=10, c=3, seed=1)
    folds = list(StratifiedKFold(3, shuffle=True, random_state=1111).split(X, y))
    specs = [FitSpec(tr, reg, val_idx=te) for tr, te in folds for reg in REGS]
    specs = specs[:-1]  # last group has 3 members instead of 4
    specs.append(FitSpec(np.arange(250), 1e-3, validation_split=0.05))
    cfg = CONFIGS[mode]
    ref = [fit_reference(X, y, s, 3, cfg) for s in specs]
    assert any(len(s.train_idx) % cfg.batch_size % 4 for s in specs)
    bat = fit_batched(X, y, specs, 3, cfg, kernel=kernel)
    for r, b in zip(ref, bat, strict=True):
        assert (r.val_correct, r.n_val, r.epochs, r.steps) == (b.val_correct, b.n_val, b.epochs, b.steps)
        assert torch.allclose(r.weight, b.weight, atol=1e-5)
    assert len({r.epochs for r in ref}) > 1  # models really stopped at different times


def test_fused_kernel_equals_torch_kernel_on_a_sentence_sized_problem() -> None:
    """Both batched kernels at the real shape (384-d, 6 classes like TREC, 64-row batches) agree."""
    X, y = toy_problem(700, d=384, c=6, seed=3)
    folds = list(StratifiedKFold(3, shuffle=True, random_state=1111).split(X, y))
    specs = [FitSpec(tr, reg, val_idx=te) for tr, te in folds for reg in REGS]
    cfg = ClassifierConfig("adam", 64, tenacity=2, epoch_size=2, max_epoch=12, kfold=3)
    a = fit_batched(X, y, specs, 6, cfg, kernel="fused")
    b = fit_batched(X, y, specs, 6, cfg, kernel="torch")
    for fa, fb in zip(a, b, strict=True):
        assert (fa.val_correct, fa.epochs, fa.steps) == (fb.val_correct, fb.epochs, fb.steps)
        assert torch.allclose(fa.weight, fb.weight, atol=1e-4)


def test_classifier_kernel_choice_is_checked() -> None:
    """'auto' is the fused kernel on CPU; an unknown kernel or 'fused' on a GPU is a clear error."""
    assert resolve_kernel("auto", "cpu") == "fused"
    assert resolve_kernel("torch", "cpu") == "torch"
    assert resolve_kernel("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="'numba'"):
        resolve_kernel("numba")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_kernel("fused", "cuda")
    X, y = toy_problem(40)
    spec = FitSpec(np.arange(30), 1e-4, val_idx=np.arange(30, 40))
    with pytest.raises(ValueError, match="not one of"):
        fit_batched(X, y, [spec], 3, CONFIGS["test"], kernel="x")
    for kernel in ("fused", "torch"):  # neither may quietly train RMSprop instead
        with pytest.raises(ValueError, match="unsupported optimizer 'sgd'"):
            fit_batched(X, y, [spec], 3, ClassifierConfig("sgd"), kernel=kernel)


def test_nested_protocol_batched_equals_reference_on_accuracy() -> None:
    """The whole nested-CV protocol gives the same dev/test accuracy and L2 choices on both paths."""
    X, y = toy_problem(150, d=8, c=2, seed=2)
    cfg = ClassifierConfig("rmsprop", 128, 3, 2, 200, kfold=3)
    a = run_nested_kfold(X, y, 2, cfg, make_fitter(batched=True))
    b = run_nested_kfold(X, y, 2, cfg, make_fitter(batched=False))
    for key in ("devacc", "acc", "fold_devacc", "fold_acc", "l2_chosen"):
        assert a[key] == b[key], key


def strip_timings(rep: dict) -> dict:
    """Drop wall-clock fields so two runs can be compared."""
    rep = json.loads(json.dumps(rep))
    rep.pop("timings")
    for res in rep["results"].values():
        res.pop("classify_s", None)
    return rep


def test_evaluate_full_is_deterministic_and_json(tmp_path: Path) -> None:
    """All 14 tasks on a tiny tree: two runs give identical numbers; the report round-trips as JSON."""
    root = make_tree(tmp_path / "tree", n_classif=40)
    one = evaluate(toy_encode, task_set="full", mode="fasttest", data_dir=root)
    two = evaluate(toy_encode, task_set="full", mode="fasttest", data_dir=root)
    assert strip_timings(one) == strip_timings(two)
    assert set(one["table"]["sts"]) == {"STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark",
                                        "SICKRelatedness", "Avg."}
    assert set(one["table"]["transfer"]) == {"MR", "CR", "SUBJ", "MPQA", "SST2", "TREC", "MRPC", "Avg."}
    res = one["results"]
    assert 0 <= res["MRPC"]["f1"] <= 100 and res["MR"]["ndev"] == 40
    assert res["MR"]["acc"] > 60  # the toy sentences carry their label word (chance: 50)
    out = write_json_atomic(tmp_path / "out" / "r.json", one)
    assert json.loads(out.read_text())["table"] == one["table"]
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]
    assert "| MR | CR |" in format_table(one)
    t = one["timings"]["per_task"]
    assert t["STS12"]["sentences_encoded"] > 0 and "classify_s" in t["MR"]


def test_dev_mode_skips_sts12_16_and_reports_dev(tmp_path: Path) -> None:
    """'dev' mode: STS-B/SICK-R dev Spearman, transfer dev accuracy; STS12-16 listed as skipped."""
    root = make_tree(tmp_path, n_classif=30)
    rep = evaluate(toy_encode, tasks=["STS12", "STSBenchmark", "CR"], mode="dev", data_dir=root)
    assert "STS12" not in rep["results"] and rep["settings"]["skipped_tasks"] == {"STS12": "no dev split"}
    assert list(rep["results"]["STSBenchmark"]) == ["dev"]
    assert rep["table"]["transfer"]["CR"] == rep["results"]["CR"]["devacc"]


def test_reference_path_matches_batched_end_to_end(tmp_path: Path) -> None:
    """SST2 (with SentEval's refit), TREC and MRPC through evaluate(): both paths, same numbers."""
    root = make_tree(tmp_path, n_classif=40)
    kw = {"tasks": ["SST2", "TREC", "MRPC"], "mode": "fasttest", "data_dir": root}
    a = evaluate(toy_encode, batched=True, **kw)["results"]
    b = evaluate(toy_encode, batched=False, **kw)["results"]
    for task in kw["tasks"]:
        for key in ("acc", "devacc", "l2_chosen", "f1"):
            assert a[task].get(key) == b[task].get(key), (task, key)
    assert b["SST2"]["fit"]["classifiers"] == a["SST2"]["fit"]["classifiers"] + 1  # the refit
