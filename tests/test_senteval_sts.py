"""STS scoring: cosine, per-subset correlations and the 'all'/'mean'/'wmean' aggregations against scipy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest_senteval import make_tree, real_data_dir, toy_encode
from scipy.stats import pearsonr, spearmanr

from senteval_runner import StsbDevEvaluator
from senteval_runner.data import load_sts
from senteval_runner.engine import evaluate
from senteval_runner.sts import aggregate, correlations, cosine_rows


def test_aggregations_match_scipy_by_hand() -> None:
    """'all' = one correlation over the concatenation; 'mean' plain; 'wmean' weighted by subset size."""
    rng = np.random.default_rng(3)
    sizes = {"s1": 17, "s2": 40, "s3": 9}
    sys_by, gold_by, per = {}, {}, {}
    for name, n in sizes.items():
        g = rng.uniform(0, 5, n)
        s = g + rng.normal(0, 1.5 + n / 20, n)
        sys_by[name], gold_by[name] = s, g
        per[name] = correlations(s, g)
    agg = aggregate(per, sys_by, gold_by)
    all_s = np.concatenate(list(sys_by.values()))
    all_g = np.concatenate(list(gold_by.values()))
    sp = [spearmanr(sys_by[k], gold_by[k])[0] for k in sizes]
    pe = [pearsonr(sys_by[k], gold_by[k])[0] for k in sizes]
    w = np.array(list(sizes.values()), dtype=float)
    assert agg["spearman"]["all"] == pytest.approx(spearmanr(all_s, all_g)[0], abs=1e-12)
    assert agg["pearson"]["all"] == pytest.approx(pearsonr(all_s, all_g)[0], abs=1e-12)
    assert agg["spearman"]["mean"] == pytest.approx(sum(sp) / 3, abs=1e-12)
    assert agg["pearson"]["wmean"] == pytest.approx(float((np.array(pe) * w).sum() / w.sum()), abs=1e-12)
    assert agg["spearman"]["wmean"] == pytest.approx(float((np.array(sp) * w).sum() / w.sum()), abs=1e-12)
    # the three differ on this data, so a mix-up between them would be caught
    assert len({round(agg["spearman"][k], 6) for k in ("all", "mean", "wmean")}) == 3


def test_cosine_rows_zero_vector_gives_zero_like_senteval() -> None:
    """nan_to_num semantics: a zero embedding has cosine 0 with anything, not NaN."""
    u = np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    v = np.array([[1.0, 1.0], [1.0, 2.0], [3.0, 4.0]])
    assert cosine_rows(u, v) == pytest.approx([2**-0.5, 0.0, 1.0])


def test_evaluate_sts_task_matches_independent_computation(tmp_path: Path) -> None:
    """STS13 via evaluate() equals per-subset cosine/spearman computed here from the files."""
    root = make_tree(tmp_path, n_classif=8)
    rep = evaluate(toy_encode, tasks=["STS13"], data_dir=root)
    res = rep["results"]["STS13"]
    td = load_sts(root, "STS13")
    all_s, all_g = [], []
    for name, split in td.splits.items():
        ea, eb = toy_encode(split.a).astype(np.float64), toy_encode(split.b).astype(np.float64)
        cos = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
        assert res[name]["spearman"] == pytest.approx(spearmanr(cos, split.gold)[0], abs=1e-6)
        assert res[name]["nsamples"] == 23  # 24 lines, one empty gold line
        all_s.append(cos)
        all_g.append(split.gold)
    pooled = spearmanr(np.concatenate(all_s), np.concatenate(all_g))[0]
    assert res["all"]["spearman"]["all"] == pytest.approx(pooled, abs=1e-6)
    assert rep["table"]["sts"]["STS13"] == round(100 * res["all"]["spearman"]["all"], 2)


def test_stsb_dev_evaluator_encodes_distinct_sentences_once(tmp_path: Path) -> None:
    """The trainer's evaluator: one encode call on .sentences (distinct), raw correlations."""
    root = make_tree(tmp_path, n_classif=8)
    ev = StsbDevEvaluator(root)
    calls: list[list[str]] = []

    def enc(sents: list[str]) -> np.ndarray:
        """Record the call, then encode."""
        calls.append(sents)
        return toy_encode(sents)

    out = ev(enc)
    assert len(calls) == 1 and calls[0] is ev.sentences
    assert len(set(ev.sentences)) == len(ev.sentences)
    a, b = toy_encode(ev.pairs.a), toy_encode(ev.pairs.b)
    cos = cosine_rows(a, b)
    assert out["spearman"] == pytest.approx(spearmanr(cos, ev.pairs.gold)[0], abs=1e-6)
    assert out["pearson"] == pytest.approx(pearsonr(cos, ev.pairs.gold)[0], abs=1e-6)
    assert -1.0 <= out["spearman"] <= 1.0 and out["spearman"] > 0.3  # overlap drives the toy gold
    with pytest.raises(ValueError, match="expected"):
        ev(lambda s: np.zeros((len(s) - 1, 4)))


@pytest.mark.data
def test_stsb_dev_evaluator_on_real_data() -> None:
    """The real STS-B dev: 1500 pairs; a bag-of-words encoder gets a sane positive Spearman."""
    root = real_data_dir()
    if root is None:
        pytest.skip("DIFFCSE_DATA_DIR/senteval not available")
    ev = StsbDevEvaluator(root)
    assert len(ev.pairs) == 1500 and len(ev.sentences) < 3000
    out = ev(lambda s: toy_encode(s, dim=64))
    assert 0.2 < out["spearman"] < 0.9
