"""The masked-LM objective and SimCSE's auxiliary MLM term, against HF's own masked-LM loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import sentences
from test_diffcse import save_tiny_mlm
from transformers import AutoModelForMaskedLM, AutoTokenizer

from diffcse.cli import main as cli_main
from diffcse.core.encoder import Encoder
from diffcse.core.folder import resolve_model_path
from diffcse.training.config import load_config
from diffcse.training.data import tokenize_columns
from diffcse.training.objectives.generators import MLMGenerator
from diffcse.training.objectives.mlm import mlm_masker
from diffcse.training.trainer import build_model


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: str) -> str:
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    return save_tiny_mlm(tmp_path_factory.mktemp("mlm"), tok, "bert")


def test_mlm_objective_loss_is_hf_masked_lm_loss(mlm_dir: str) -> None:
    from diffcse.training.data import ViewCollator

    tok = AutoTokenizer.from_pretrained(mlm_dir)
    config = load_config(None, {"model": mlm_dir, "objective": "mlm", "pooler": "cls", "max_seq_length": 16,
                                "mlm_probability": 0.3})
    model = build_model(config, resolve_model_path(mlm_dir), tok).eval()
    ds, _ = tokenize_columns(tok, [sentences(8, seed=2)], 16)
    batch = ViewCollator(tok.pad_token_id)([ds[i] for i in range(8)])
    torch.manual_seed(0)
    loss = model(**batch)["loss"]
    # By hand: HF's masked-LM collator masks the same padded ids with the same random state.
    torch.manual_seed(0)
    hf = mlm_masker(tok, 0.3)([{"input_ids": ds[i]["views"][0]} for i in range(8)])
    masked = hf["labels"] != -100
    assert masked.any() and not masked[hf["attention_mask"] == 0].any() and not masked[:, 0].any()
    reference = AutoModelForMaskedLM.from_pretrained(mlm_dir).eval()
    torch.testing.assert_close(loss, reference(**hf).loss)
    assert model.encoder.backbone is model.mlm.base_model  # STS-B dev scores the very weights MLM trains


def test_mlm_training_exports_a_generator_and_an_encoder(tiny_bert_dir: str, tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(48, seed=4)) + "\n")
    out = tmp_path / "mlm"
    assert cli_main(["train", "--objective", "mlm", "--model", tiny_bert_dir, "--train-file", str(corpus),
                     "--output-dir", str(out), "--batch-size", "8", "--max-steps", "3", "--no-do-eval",
                     "--precision", "fp32", "--max-seq-length", "16", "--learning-rate", "1e-3", "--logging-steps", "1"]) == 0
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    # A plain encoder folder got a fresh head tied to its word embeddings; the export keeps it.
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    generator = MLMGenerator.load(str(out), tok)
    assert generator.model is not None
    enc = Encoder.load(str(out), device="cpu")
    assert enc.module.pooler == "cls_before_pooler" and enc.encode(["a man plays"]).shape == (1, 32)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_mlm" in r for r in log)
    start = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir)
    moved = model.get_input_embeddings().weight
    assert not torch.equal(moved, start.get_input_embeddings().weight)


def test_auxiliary_mlm_adds_weight_times_the_mlm_loss(mlm_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(mlm_dir)
    base = {"model": mlm_dir, "pooler": "cls", "max_seq_length": 16, "head": "mlp"}
    ds, _ = tokenize_columns(tok, [sentences(6, seed=7)], 16)
    from diffcse.training.data import ViewCollator

    batch = ViewCollator(tok.pad_token_id)([ds[i] for i in range(6)])
    with_mlm = build_model(load_config(None, {**base, "mlm_weight": 0.1}), mlm_dir, tok).eval()
    torch.manual_seed(1)
    total = with_mlm(**batch)["loss"]
    contrastive = with_mlm.contrastive_loss(with_mlm.encode_views(batch["input_ids"], batch["attention_mask"])[0], 2)
    torch.manual_seed(1)
    ids = batch["input_ids"][:, 0].clone()
    special = torch.tensor([tok.get_special_tokens_mask(r, already_has_special_tokens=True) for r in ids.tolist()],
                           dtype=torch.bool) | ~batch["attention_mask"][:, 0].bool()
    masked, labels = mlm_masker(tok, 0.15).torch_mask_tokens(ids, special)
    mlm_loss = with_mlm.aux_mlm.mlm(input_ids=masked, attention_mask=batch["attention_mask"][:, 0], labels=labels).loss
    torch.testing.assert_close(total, contrastive + 0.1 * mlm_loss)
    total.backward()
    head = with_mlm.aux_mlm.mlm.get_output_embeddings()
    assert head.bias.grad is not None and head.bias.grad.abs().sum() > 0  # the MLM head learns too
    assert with_mlm.encoder.backbone is with_mlm.aux_mlm.mlm.base_model


def test_mlm_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="objective mlm is all MLM"):
        load_config(None, {"objective": "mlm", "mlm_weight": 0.1})
    with pytest.raises(ValueError, match="mlm_probability"):
        load_config(None, {"mlm_probability": 1.5})
    config = load_config(None, {"objective": "mlm"})
    assert (config.learning_rate, config.head) == (5e-5, "none")
