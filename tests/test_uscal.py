"""USCAL: the adversarial perturbation has the configured norm, and the loss equals a naive computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import sentences

from diffcse.cli import main as cli_main
from diffcse.core.folder import resolve_model_path
from diffcse.training.config import load_config
from diffcse.training.data import ViewCollator, tokenize_columns
from diffcse.training.objectives.adversarial import perturbation, project
from diffcse.training.trainer import build_model


def model_and_batch(tiny_bert_dir: str, packing: bool, **fields: object) -> tuple:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    config = load_config(None, {"model": tiny_bert_dir, "objective": "uscal", "pooler": "cls", "max_seq_length": 16,
                                "packing": packing, **fields})
    torch.manual_seed(0)
    model = build_model(config, resolve_model_path(tiny_bert_dir), tok).double()
    for m in model.modules():  # dropout off: the two computations must agree exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.encoder.backbone.config.attention_probs_dropout_prob = 0.0
    ds, _ = tokenize_columns(tok, [sentences(6, seed=3)], 16)
    return model.train(), ViewCollator(tok.pad_token_id)([ds[i] for i in range(6)])


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("steps", [1, 3])
def test_perturbation_has_the_configured_norm(tiny_bert_dir: str, norm: str, steps: int) -> None:
    model, batch = model_and_batch(tiny_bert_dir, True, adv_epsilon=0.5, adv_norm=norm, adv_steps=steps)
    captured = {}
    original = model.adversarial_offset

    def spy(*args: object) -> torch.Tensor:
        captured["delta"] = original(*args)
        return captured["delta"]

    model.adversarial_offset = spy
    model(**batch)
    delta, mask = captured["delta"], batch["attention_mask"][:, 0]
    assert (delta[mask == 0] == 0).all()  # padding is never perturbed
    sizes = delta.flatten(1).norm(dim=1) if norm == "l2" else delta.flatten(1).abs().amax(dim=1)
    if steps == 1:
        torch.testing.assert_close(sizes, torch.full_like(sizes, 0.5))
    else:
        assert (sizes <= 0.5 + 1e-9).all() and (sizes > 0.25).all()  # inside the ball, not stuck at 0


def test_uscal_loss_and_gradients_equal_a_naive_computation(tiny_bert_dir: str) -> None:
    model, batch = model_and_batch(tiny_bert_dir, True, adv_epsilon=0.3, adv_weight=0.7)
    loss = model(**batch)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # Naive, step by step, padded (no packing) and through input ids where the model used embeddings.
    naive_model, _ = model_and_batch(tiny_bert_dir, False, adv_epsilon=0.3, adv_weight=0.7)
    enc, infonce = naive_model.encoder, naive_model.loss
    ids, mask = batch["input_ids"][:, 0], batch["attention_mask"][:, 0]
    two_ids, two_mask = torch.cat([ids, ids]), torch.cat([mask, mask])
    word = enc.backbone.get_input_embeddings()
    e = word(two_ids)
    z = enc(two_ids, two_mask, inputs_embeds=e).embedding
    simcse, _ = infonce(z[:6], z[6:])
    g = torch.autograd.grad(simcse, e, retain_graph=True)[0][:6] * mask.unsqueeze(-1)
    delta = 0.3 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    z_adv = enc(ids, mask, inputs_embeds=word(ids) + delta.detach()).embedding
    adv, _ = infonce(z[:6], z_adv)
    naive = simcse + 0.7 * adv
    naive.backward()
    torch.testing.assert_close(loss, naive)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(naive_model.named_parameters())[name].grad, msg=name, rtol=1e-6, atol=1e-9)


def test_projection_and_bad_settings() -> None:
    d = torch.randn(3, 4, 5)
    assert (project(d * 10, 1.0, "l2").flatten(1).norm(dim=1) <= 1 + 1e-6).all()
    assert project(d * 10, 1.0, "linf").abs().max() <= 1.0
    assert torch.equal(perturbation(d, torch.zeros(3, 4), 1.0, "linf"), torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="adv_epsilon"):
        load_config(None, {"objective": "uscal", "adv_epsilon": 0.0})
    with pytest.raises(ValueError, match="adv_norm"):
        load_config(None, {"objective": "uscal", "adv_norm": "l1"})


def test_uscal_trains_from_the_command_line(tiny_bert_dir: str, tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(48, seed=2)) + "\n")
    out = tmp_path / "run"
    assert cli_main(["train", "--objective", "uscal", "--model", tiny_bert_dir, "--train-file", str(corpus),
                     "--output-dir", str(out), "--batch-size", "8", "--max-steps", "3", "--no-do-eval",
                     "--precision", "fp32", "--pooler", "cls", "--max-seq-length", "16", "--adv-steps", "2",
                     "--logging-steps", "1"]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_adv" in r for r in logs)
