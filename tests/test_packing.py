"""Padding-free (packed) forwards equal the padded ones: encoder, poolers, gradients, discriminator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import sentences
from transformers import AutoTokenizer, RobertaConfig, RobertaModel

import diffcse.core.packing as packing_mod
from diffcse.core.modeling import SentenceEncoder
from diffcse.core.packing import ATTENTION, Packing
from diffcse.training.objectives.diffcse import ConditionalDiscriminator


def _batch(model_dir: str, n: int = 6) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(sentences(n, seed=11), padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the test batch must contain padding"
    return dict(enc)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_packing_layout_round_trips() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    p = Packing.of(mask)
    assert p is not None
    assert p.starts.tolist() == [0, 3, 4] and p.columns.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    x = torch.arange(12.0).view(3, 4, 1) + 1
    packed = p.pack(x)
    assert packed.shape == (1, 8, 1)
    back = p.unpack(packed)
    assert torch.equal(back, x * mask.unsqueeze(-1))
    # Left padding or an empty row: no packing, the caller runs padded.
    assert Packing.of(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None
    assert Packing.of(torch.tensor([[0, 0, 0], [1, 1, 1]])) is None


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random RoBERTa folder (positions start at pad_token_id + 1, the fairseq convention)."""
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=70, pad_token_id=1,
    )
    folder = tmp_path_factory.mktemp("tiny_roberta")
    RobertaModel(config).save_pretrained(folder)
    return str(folder)


def _roberta_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(5, 120, (6, 11), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate([11, 4, 7, 2, 9, 5]):
        mask[row, n:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta"])
@pytest.mark.parametrize("pooler", ["avg", "cls", "avg_first_last"])
def test_packed_encoder_equals_padded_with_gradients(
    arch: str, pooler: str, tiny_bert_dir: str, tiny_distilbert_dir: str, tiny_roberta_dir: str
) -> None:
    path = {"bert": tiny_bert_dir, "distilbert": tiny_distilbert_dir, "roberta": tiny_roberta_dir}[arch]
    batch = _roberta_batch() if arch == "roberta" else _batch(path)
    results = []
    for packed in (False, True):
        torch.manual_seed(0)
        enc = SentenceEncoder.from_pretrained(path, pooler=pooler, head="mlp", mlp_only_train=False)
        if packed:
            assert enc.enable_packing()
            assert enc.backbone.config._attn_implementation == ATTENTION
        enc.eval()  # dropout off: the two forwards must agree exactly up to rounding
        out = enc(batch["input_ids"], batch["attention_mask"])
        out.embedding.pow(3).sum().backward()
        results.append((out.embedding.detach(), _grads(enc)))
    (e0, g0), (e1, g1) = results
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-4)
    assert g0.keys() == g1.keys() and len(g0) > 10
    if arch == "roberta":
        assert any("position_embeddings" in name for name in g0)  # positions were learned through
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packing_with_offset_positions_roberta(tmp_path: Path, tiny_bert_dir: str) -> None:
    # RoBERTa numbers positions from pad_token_id + 1; packing must hand it those positions.
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=70, pad_token_id=1,
    )
    model = RobertaModel(config).eval()
    ids = torch.randint(5, 120, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, 1)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
    enc = SentenceEncoder(model, pooler="avg", head="none")
    assert enc.enable_packing()
    with torch.no_grad():
        packed = enc(ids, mask).pooled
    m = mask.unsqueeze(-1).float()
    torch.testing.assert_close(packed, (padded * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-4)


def test_packing_falls_back_when_the_check_fails(tiny_bert_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Wrong positions stand in for an architecture that numbers tokens its own way.
    monkeypatch.setattr(packing_mod, "position_offset", lambda backbone: 3)
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir, pooler="avg", head="none")
    assert not enc.enable_packing()
    assert enc.backbone.config._attn_implementation == "sdpa"


def test_packed_backbone_saves_a_plain_config(tiny_bert_dir: str, tmp_path: Path) -> None:
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir, pooler="avg", head="none")
    assert enc.enable_packing()
    enc.backbone.save_pretrained(tmp_path)
    assert ATTENTION not in (tmp_path / "config.json").read_text()
    assert "attn" not in json.loads((tmp_path / "config.json").read_text())
    # Without packing kwargs the switched model is plain SDPA: same output as a fresh load.
    batch = _batch(tiny_bert_dir)
    fresh = SentenceEncoder.from_pretrained(tiny_bert_dir, pooler="avg", head="none").eval()
    enc.eval()
    enc.packing = False
    with torch.no_grad():
        torch.testing.assert_close(enc(batch["input_ids"], batch["attention_mask"]).pooled,
                                   fresh(batch["input_ids"], batch["attention_mask"]).pooled)


def test_packed_discriminator_equals_padded_and_conditions_each_sentence(tiny_bert_dir: str) -> None:
    batch = _batch(tiny_bert_dir)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    results = []
    for packed in (False, True):
        torch.manual_seed(0)
        disc = ConditionalDiscriminator.from_pretrained(tiny_bert_dir).eval()
        seen: list[torch.Tensor] = []
        disc.transformer.embeddings.register_forward_hook(lambda m, a, o, seen=seen: seen.append(o.detach().clone()))
        if packed:
            assert disc.enable_packing()
        h = torch.randn(ids.size(0), disc.transformer.config.hidden_size, generator=torch.Generator().manual_seed(1))
        h.requires_grad_(True)
        logits = disc(ids, mask, h)
        (logits * mask.unsqueeze(-1)).pow(2).sum().backward()
        results.append((logits.detach(), h.grad.clone(), seen[-1], h.detach()))
    (l0, hg0, padded_embeddings, _), (l1, hg1, packed_embeddings, h) = results
    real = mask.bool()
    torch.testing.assert_close(l1[real], l0[real], atol=1e-5, rtol=1e-4)
    assert torch.equal(l1[~real], torch.zeros_like(l1[~real]))
    torch.testing.assert_close(hg1, hg0, atol=1e-5, rtol=1e-4)
    # In the packed row h sits at each sentence's first token, and every other token is unchanged.
    p = Packing.of(mask)
    assert packed_embeddings.shape == (1, int(mask.sum()), h.size(1))
    assert torch.equal(packed_embeddings[0, p.starts], h)
    others = torch.ones(packed_embeddings.size(1), dtype=torch.bool)
    others[p.starts] = False
    torch.testing.assert_close(packed_embeddings[0, others], p.pack(padded_embeddings)[0, others])
