"""diffcse.core.dropout: the cheaper mask has dropout's law, scaling and gradient; packed attention dropout is unbiased."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffcse.core.dropout import FastDropout, fast_dropout, use_fast_dropout
from diffcse.core.modeling import SentenceEncoder
from diffcse.core.packing import PACKING_KWARG, Packing, packed_attention


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_scaling_and_gradient(p: float) -> None:
    torch.manual_seed(0)
    n = 1_000_000
    x = torch.rand(n) + 0.5  # never 0, so kept positions are exactly the non-zero outputs
    x.requires_grad_(True)
    out = fast_dropout(x, p)
    kept = out != 0
    rate = kept.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma
    torch.testing.assert_close(out[kept], x.detach()[kept] / (1 - p))
    w = torch.randn(n)
    (out * w).sum().backward()
    torch.testing.assert_close(x.grad, w * kept / (1 - p))


def test_identity_outside_training_seeded_and_checked() -> None:
    x = torch.randn(100)
    assert fast_dropout(x, 0.3, training=False) is x and fast_dropout(x, 0.0) is x
    torch.manual_seed(7)
    a = fast_dropout(x, 0.3)
    torch.manual_seed(7)
    assert torch.equal(a, fast_dropout(x, 0.3))
    assert not torch.equal(a, fast_dropout(x, 0.3))
    with pytest.raises(ValueError, match="dropout probability"):
        fast_dropout(x, 1.0)
    module = FastDropout(0.3).eval()
    assert module(x) is x


def test_use_fast_dropout_swaps_every_dropout(tiny_bert_dir: str) -> None:
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir, pooler="avg", head="none")
    before = [m.p for m in enc.modules() if type(m) is nn.Dropout]
    assert before
    assert use_fast_dropout(enc) == len(before)
    assert not [m for m in enc.modules() if type(m) is nn.Dropout]
    assert sorted(m.p for m in enc.modules() if isinstance(m, FastDropout)) == sorted(before)


def test_packed_attention_dropout_is_unbiased() -> None:
    # E[dropout(P)] = P, so averaging many draws gives the attention output without dropout.
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    p = Packing.of(mask)
    p.fast_dropout = True
    t = int(mask.sum())
    q, k, v = (torch.randn(1, 2, t, 8, dtype=torch.float64) for _ in range(3))
    module = nn.Module()
    plain, _ = packed_attention(module, q, k, v, None, dropout=0.0, **{PACKING_KWARG: p})
    draws = torch.stack([packed_attention(module, q, k, v, None, dropout=0.3, **{PACKING_KWARG: p})[0] for _ in range(4000)])
    assert not torch.allclose(draws[0], plain)
    torch.testing.assert_close(draws.mean(0), plain, atol=0.05, rtol=0.0)
    # The same as SDPA over each sentence alone when dropout is off.
    for row, start in enumerate(p.starts.tolist()):
        n = int(mask[row].sum())
        sl = slice(start, start + n)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl])
        torch.testing.assert_close(plain[0, sl], ref[0].transpose(0, 1))
