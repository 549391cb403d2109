"""Sentence-BERT's pair objectives (softmax over (u, v, |u-v|), cosine regression) against a naive computation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import sentences

from diffcse.cli import main as cli_main
from diffcse.core.folder import resolve_model_path
from diffcse.training.config import load_config
from diffcse.training.data import ViewCollator, read_labelled_pairs, tokenize_columns
from diffcse.training.trainer import build_model


def pair_file(path: Path, target: str, n: int = 40) -> Path:
    texts = sentences(2 * n, seed=12)
    labels = ["entailment", "neutral", "contradiction"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence1", "sentence2", target])
        for i in range(n):
            w.writerow([texts[2 * i], texts[2 * i + 1], labels[i % 3] if target == "label" else (i * 7) % 6])
    return path


@pytest.mark.parametrize("objective", ["sbert-softmax", "sbert-cosine"])
def test_loss_and_gradients_equal_a_naive_computation(tiny_bert_dir: str, tmp_path: Path, objective: str) -> None:
    from transformers import AutoTokenizer

    target = "label" if objective == "sbert-softmax" else "score"
    path = pair_file(tmp_path / "pairs.csv", target)
    columns, targets, names = read_labelled_pairs(path, target)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    config = load_config(None, {"model": tiny_bert_dir, "objective": objective, "train_file": str(path),
                                "pooler": "avg", "max_seq_length": 16, "score_scale": 5.0})
    model = build_model(config, resolve_model_path(tiny_bert_dir), tok, len(names or ())).double().eval()
    ds, _ = tokenize_columns(tok, columns, 16)
    ds.labels = targets
    batch = ViewCollator(tok.pad_token_id)([ds[i] for i in range(8)])
    loss = model(**batch)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # Naive: each sentence alone through the encoder, then the formula.
    encode = lambda ids, mask: model.encoder(ids, mask).embedding  # noqa: E731
    u = torch.cat([encode(batch["input_ids"][i : i + 1, 0], batch["attention_mask"][i : i + 1, 0]) for i in range(8)])
    v = torch.cat([encode(batch["input_ids"][i : i + 1, 1], batch["attention_mask"][i : i + 1, 1]) for i in range(8)])
    if objective == "sbert-softmax":
        W = model.loss.classifier
        naive = F.cross_entropy(W(torch.cat([u, v, (u - v).abs()], -1)), batch["labels"])
        assert names == ["contradiction", "entailment", "neutral"]
    else:
        naive = ((F.cosine_similarity(u, v) - batch["labels"].double() / 5.0) ** 2).mean()
    naive.backward()
    torch.testing.assert_close(loss, naive)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, msg=name)


def test_pair_objectives_train_and_export_the_encoder(tiny_bert_dir: str, tmp_path: Path) -> None:
    path = pair_file(tmp_path / "sick.csv", "label")
    out = tmp_path / "run"
    assert cli_main(["train", "--objective", "sbert-softmax", "--model", tiny_bert_dir, "--train-file", str(path),
                     "--output-dir", str(out), "--batch-size", "8", "--max-steps", "4", "--no-do-eval",
                     "--precision", "fp32", "--pooler", "avg", "--max-seq-length", "16", "--learning-rate", "1e-3",
                     "--logging-steps", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["labels"] == ["contradiction", "entailment", "neutral"]
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("pair_accuracy" in r for r in logs)
    from safetensors.torch import load_file

    assert not any("classifier" in k for k in load_file(str(out / "model.safetensors")))  # the encoder only


def test_pair_files_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_bert_dir: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence1,sentence2,score\na,b,high\n")
    with pytest.raises(ValueError, match="score 'high' is not a number"):
        read_labelled_pairs(bad, "score")
    one = tmp_path / "one.csv"
    one.write_text("sentence1,sentence2,label\na,b,x\nc,d,x\n")
    with pytest.raises(ValueError, match="1 distinct label"):
        read_labelled_pairs(one, "label")
    assert cli_main(["train", "--objective", "sbert-cosine", "--model", tiny_bert_dir]) == 2
    assert "needs a CSV with sentence1,sentence2,score" in capsys.readouterr().err
