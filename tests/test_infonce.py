"""InfoNCE against naive per-row loops (unsupervised and with hard negatives)."""

from __future__ import annotations

import math

import pytest
import torch

from diffcse.training.objectives.infonce import InfoNCE


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()))


def naive_infonce(z1, z2, z3=None, tau=0.05, weight=0.0) -> float:
    """−log softmax of the positive, one row at a time, written out term by term."""
    n = len(z1)
    total = 0.0
    for i in range(n):
        logits = [cosine(z1[i], z2[j]) / tau for j in range(n)]
        if z3 is not None:
            logits += [cosine(z1[i], z3[j]) / tau + (weight if j == i else 0.0) for j in range(n)]
        denom = sum(math.exp(x) for x in logits)
        total += -math.log(math.exp(logits[i]) / denom)
    return total / n


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_unsupervised_matches_naive_loop(tau: float) -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    loss, stats = InfoNCE(tau)(z1, z2)
    assert loss.item() == pytest.approx(naive_infonce(z1, z2, tau=tau), rel=1e-5)
    assert stats["pos_sim"] == pytest.approx(sum(cosine(z1[i], z2[i]) for i in range(6)) / 6, rel=1e-5)


@pytest.mark.parametrize("weight", [0.0, 1.5])
def test_hard_negatives_match_naive_loop(weight: float) -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2, z3 = (torch.randn(5, 8, generator=g) for _ in range(3))
    loss, stats = InfoNCE(0.05, hard_negative_weight=weight)(z1, z2, z3)
    assert loss.item() == pytest.approx(naive_infonce(z1, z2, z3, 0.05, weight), rel=1e-5)
    assert "hard_neg_sim" in stats


def test_identical_views_give_low_loss_and_gradients_flow() -> None:
    z = torch.randn(4, 16, requires_grad=True)
    loss, _ = InfoNCE(0.05)(z, z.detach().clone())
    loss.backward()
    assert loss.item() < 0.5
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        InfoNCE(0.0)
