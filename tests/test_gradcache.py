"""Gradient caching gives the uncached step's loss and gradients (float64, tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import sentences

from diffcse.cli import main as cli_main
from diffcse.core.folder import resolve_model_path
from diffcse.core.modeling import EncoderOutput
from diffcse.training.config import load_config
from diffcse.training.data import ViewCollator, tokenize_columns
from diffcse.training.gradcache import cached_step
from diffcse.training.trainer import build_model


def make(tiny_bert_dir: str, dropout: bool, **fields: object) -> torch.nn.Module:
    from transformers import AutoTokenizer

    config = load_config(None, {"model": tiny_bert_dir, "pooler": "cls", "max_seq_length": 16, **fields})
    torch.manual_seed(0)
    model = build_model(config, resolve_model_path(tiny_bert_dir), AutoTokenizer.from_pretrained(tiny_bert_dir))
    if not dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        for m in model.modules():
            config = getattr(m, "config", None)
            if config is not None and hasattr(config, "attention_probs_dropout_prob"):
                config.attention_probs_dropout_prob = 0.0
    return model.double().train()


def batch_of(tiny_bert_dir: str, n: int, views: int = 1) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    columns = [sentences(n, seed=10 + v) for v in range(views)]
    ds, _ = tokenize_columns(tok, columns, 16)
    return ViewCollator(tok.pad_token_id)([ds[i] for i in range(n)])


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-8, rtol=1e-6, msg=name)


def uncached_chunked(model: torch.nn.Module, batch: dict, chunk: int) -> torch.Tensor:
    """The plain step with the encoder run chunk by chunk WITH gradients: the masks caching must replay."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    flat_ids, flat_mask, views = model.flatten_views(ids, mask)
    n = ids.shape[0]
    pooled = []
    for start in range(0, n, chunk):
        a, b = start * views, min(start + chunk, n) * views
        longest = int(flat_mask[a:b].sum(1).max())
        pooled.append(model.encoder(flat_ids[a:b, :longest], flat_mask[a:b, :longest], apply_head=False).pooled)
    cached = torch.cat(pooled)
    loss = model.contrastive_loss(EncoderOutput(cached, model.encoder.project(cached)), views)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize(("objective", "views"), [("simcse", 1), ("sup-simcse", 3)])
def test_cached_equals_uncached_with_dropout_on(tiny_bert_dir: str, objective: str, views: int) -> None:
    extra = {"hard_negative_weight": 0.5, "train_file": "x.csv"} if objective == "sup-simcse" else {}
    batch = batch_of(tiny_bert_dir, 10, views)
    results = []
    for cached in (True, False):
        model = make(tiny_bert_dir, dropout=True, objective=objective, head="mlp", **extra)
        torch.manual_seed(5)
        loss = cached_step(model, batch["input_ids"], batch["attention_mask"], 3) if cached else uncached_chunked(model, batch, 3)
        results.append((loss, grads(model), torch.get_rng_state()))
    (l1, g1, r1), (l0, g0, r0) = results
    torch.testing.assert_close(l1, l0, atol=1e-10, rtol=1e-10)
    assert_same(g1, g0)
    assert torch.equal(r1, r0)  # the step leaves the random stream where the uncached one does


def test_without_replaying_the_masks_the_gradients_differ(tiny_bert_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: drop the replay and the second forward draws other masks."""
    import diffcse.training.gradcache as gc

    batch = batch_of(tiny_bert_dir, 10)
    model = make(tiny_bert_dir, dropout=True, head="mlp")
    torch.manual_seed(5)
    cached_step(model, batch["input_ids"], batch["attention_mask"], 3)
    replayed = grads(model)
    model = make(tiny_bert_dir, dropout=True, head="mlp")
    monkeypatch.setattr(gc, "_set_rng_state", lambda state, device: None)
    torch.manual_seed(5)
    cached_step(model, batch["input_ids"], batch["attention_mask"], 3)
    assert any(not torch.allclose(replayed[k], v) for k, v in grads(model).items())


@pytest.mark.parametrize("head", ["batchnorm", "mlp"])
def test_cached_equals_the_plain_full_batch_step(tiny_bert_dir: str, head: str) -> None:
    """Dropout off: caching with small chunks equals the model's own one-pass forward (BN over the whole batch)."""
    batch = batch_of(tiny_bert_dir, 12)
    results = []
    for chunk in (5, None):
        model = make(tiny_bert_dir, dropout=False, head=head)
        if chunk is None:
            loss = model(**batch)["loss"]
            loss.backward()
        else:
            loss = cached_step(model, batch["input_ids"], batch["attention_mask"], chunk)
        buffers = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
        results.append((loss.detach(), grads(model), buffers))
    (l1, g1, b1), (l0, g0, b0) = results
    torch.testing.assert_close(l1, l0, atol=1e-10, rtol=1e-10)
    assert_same(g1, g0)
    assert b1.keys() == b0.keys() and all(torch.allclose(b1[k], b0[k]) for k in b0)


@pytest.mark.parametrize("count_padding", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_cached_diffcse_equals_uncached(tiny_bert_dir: str, count_padding: bool, dropout: bool) -> None:
    """DiffCSE: the RTD gradient that reaches h (and the discriminator's own) is included.

    Dropout off: small chunks against the one-pass step. Dropout on: one chunk (the same draws in the
    same order as the one-pass step), so the replay is checked with the discriminator in the loop.
    """
    batch = batch_of(tiny_bert_dir, 10)
    chunk = 10 if dropout else 4
    results = []
    for cached in (True, False):
        model = make(tiny_bert_dir, dropout=dropout, objective="diffcse", generator="random",
                     discriminator_layers=1, lambda_weight=0.5, rtd_count_padding=count_padding)
        torch.manual_seed(9)
        if cached:
            loss = cached_step(model, batch["input_ids"], batch["attention_mask"], chunk)
        else:
            loss = model(**batch)["loss"]
            loss.backward()
        results.append((loss.detach(), grads(model), model.pop_stats()))
    (l1, g1, s1), (l0, g0, s0) = results
    torch.testing.assert_close(l1, l0, atol=1e-10, rtol=1e-10)
    assert_same(g1, g0)
    assert any("discriminator" in k for k in g1)
    for key in ("loss_rtd", "rtd_acc_replaced", "rtd_acc_kept", "loss_contrast"):
        assert s1[key] == pytest.approx(s0[key], rel=1e-9), key


def test_loss_scale_scales_the_gradients(tiny_bert_dir: str) -> None:
    batch = batch_of(tiny_bert_dir, 8)
    out = []
    for scale in (1.0, 0.25):
        model = make(tiny_bert_dir, dropout=False, head="mlp")
        loss = cached_step(model, batch["input_ids"], batch["attention_mask"], 3, loss_scale=scale)
        out.append((loss, grads(model)))
    (l1, g1), (l2, g2) = out
    torch.testing.assert_close(l2, l1 * 0.25)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k] * 0.25)


def _train(model: str, corpus: Path, out: Path, *extra: str) -> int:
    return cli_main([
        "train", "--model", model, "--train-file", str(corpus), "--output-dir", str(out), "--batch-size", "8",
        "--max-seq-length", "16", "--pooler", "cls", "--precision", "fp32", "--no-do-eval",
        "--learning-rate", "1e-3", "--grad-cache-chunk", "3", "--save-steps", "3", "--logging-steps", "1", *extra,
    ])


def test_cached_training_resumes_bit_identically(tiny_bert_dir: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(64, seed=2)) + "\n")
    import shutil

    assert _train(tiny_bert_dir, corpus, tmp_path / "full", "--max-steps", "6") == 0
    # An interrupted run leaves checkpoint-3 behind (same schedule); resume it to step 6.
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-3", tmp_path / "part" / "checkpoints" / "checkpoint-3")
    assert _train(tiny_bert_dir, corpus, tmp_path / "part", "--max-steps", "6", "--resume") == 0
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["grad_cache_chunk"] == 3 and summary["steps"] == 6
