"""Alignment and uniformity (diffcse.core.metrics) against their definitions, computed naively."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest_senteval import make_tree, toy_encode

from diffcse.core.metrics import alignment, normalize_rows, stsb_alignment_uniformity, uniformity


def naive_alignment(x: np.ndarray, y: np.ndarray, alpha: float = 2.0) -> float:
    total = 0.0
    for a, b in zip(x, y, strict=True):
        a, b = a / math.sqrt(sum(v * v for v in a)), b / math.sqrt(sum(v * v for v in b))
        total += math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b, strict=True))) ** alpha
    return total / len(x)


def naive_uniformity(x: np.ndarray, t: float = 2.0) -> float:
    unit = [row / math.sqrt(sum(v * v for v in row)) for row in x]
    total, pairs = 0.0, 0
    for i in range(len(unit)):
        for j in range(i + 1, len(unit)):
            total += math.exp(-t * sum((p - q) ** 2 for p, q in zip(unit[i], unit[j], strict=True)))
            pairs += 1
    return math.log(total / pairs)


def test_equal_a_naive_double_loop_on_random_data() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(57, 6))
    y = x + 0.3 * rng.normal(size=x.shape)
    assert alignment(x, y) == pytest.approx(naive_alignment(x, y), rel=1e-12)
    assert alignment(x, y, alpha=1.0) == pytest.approx(naive_alignment(x, y, 1.0), rel=1e-12)
    assert uniformity(x) == pytest.approx(naive_uniformity(x), rel=1e-12)
    # Blocks smaller than the data, one that leaves a single row, and other t: the same number.
    for block in (1, 7, 56, 1000):
        assert uniformity(x, block=block) == pytest.approx(naive_uniformity(x), rel=1e-12)
    assert uniformity(x, t=0.5) == pytest.approx(naive_uniformity(x, 0.5), rel=1e-12)


def test_invariant_to_scaling_the_inputs() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    scale = rng.uniform(0.01, 100, size=(20, 1))
    assert alignment(x * scale, y * 3.0) == pytest.approx(alignment(x, y), rel=1e-12)
    assert uniformity(x * scale) == pytest.approx(uniformity(x), rel=1e-12)
    assert np.allclose(np.linalg.norm(normalize_rows(x * scale), axis=1), 1.0)


def test_a_hand_made_example() -> None:
    # Unit vectors e1, e2, -e1: squared distances e1-e2: 2, e1-(-e1): 4, e2-(-e1): 2.
    x = np.array([[1.0, 0.0], [0.0, 2.0], [-5.0, 0.0]])
    assert uniformity(x) == pytest.approx(math.log((2 * math.exp(-4) + math.exp(-8)) / 3), rel=1e-12)
    # Pairs (e1, e1) at distance 0 and (e1, e2) at distance sqrt(2): mean squared distance 1.
    assert alignment(np.array([[1.0, 0.0], [3.0, 0.0]]), np.array([[2.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    # Identical positives align perfectly; a collapsed space is as non-uniform as can be (log 1 = 0).
    assert alignment(x, 7 * x) == 0.0
    assert uniformity(np.ones((5, 3))) == pytest.approx(0.0, abs=1e-12)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="row 1 is all zeros"):
        uniformity(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="NaN"):
        alignment(np.array([[np.nan, 1.0]]), np.array([[1.0, 1.0]]))
    with pytest.raises(ValueError, match="shapes"):
        alignment(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="at least two"):
        uniformity(np.ones((1, 3)))


def test_stsb_helper_uses_the_high_scored_pairs_of_the_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "senteval")
    from senteval_runner.data import read_stsb_file

    pairs = read_stsb_file(root / "downstream" / "STS" / "STSBenchmark" / "sts-test.csv")
    res = stsb_alignment_uniformity(toy_encode, root, split="test")
    pos = pairs.gold > 4
    assert res["split"] == "test" and res["data"] == "STS-B test"
    assert res["positive_pairs"] == int(pos.sum()) > 0
    a = toy_encode([s for s, p in zip(pairs.a, pos, strict=True) if p])
    b = toy_encode([s for s, p in zip(pairs.b, pos, strict=True) if p])
    assert res["alignment"] == pytest.approx(naive_alignment(a, b), rel=1e-6)
    distinct = sorted(set(pairs.a + pairs.b))
    assert res["sentences"] == len(distinct)
    assert res["uniformity"] == pytest.approx(naive_uniformity(toy_encode(distinct)), rel=1e-6)
    assert stsb_alignment_uniformity(toy_encode, root, split="dev")["split"] == "dev"


def test_eval_reports_them_when_stsb_is_evaluated(tiny_bert_dir: str, tmp_path: Path) -> None:
    import json

    from diffcse.cli import main
    from diffcse.evaluation.adapter import FolderEncoder

    root = make_tree(tmp_path / "senteval")
    out = tmp_path / "r.json"
    args = ["eval", "--model", tiny_bert_dir, "--pooler", "avg", "--senteval-data", str(root), "--quiet"]
    assert main([*args, "--tasks", "STS13", "STSBenchmark", "--output", str(out)]) == 0
    got = json.loads(out.read_text())["alignment_uniformity"]
    # The embeddings remembered from scoring STS-B are the ones a fresh encoder gives (to float32
    # noise: other sentences shared their padded batches).
    want = stsb_alignment_uniformity(FolderEncoder(tiny_bert_dir, pooler="avg"), root, split="test")
    assert got == {**want, "alignment": pytest.approx(want["alignment"], rel=1e-6),
                   "uniformity": pytest.approx(want["uniformity"], rel=1e-6)}
    assert got["data"] == "STS-B test" and got["alignment"] > 0
    assert main([*args, "--tasks", "STS13", "--output", str(out)]) == 0
    assert "alignment_uniformity" not in json.loads(out.read_text())  # no STS-B, no measurement
    assert main([*args, "--tasks", "STSBenchmark", "--no-alignment-uniformity", "--output", str(out)]) == 0
    assert "alignment_uniformity" not in json.loads(out.read_text())
    assert main([*args, "--tasks", "STSBenchmark", "--mode", "dev", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["alignment_uniformity"]["split"] == "dev"  # dev mode never reads test
