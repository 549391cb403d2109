"""`diffcse train --objective diffcse` end to end on a tiny BERT: logs, checkpoints, --resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import sentences
from safetensors.torch import load_file
from transformers import AutoTokenizer

from diffcse.cli import main as cli_main
from diffcse.core.encoder import read_folder_pooling
from diffcse.training.config import load_config
from diffcse.training.trainer import build_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_diffcse_train_resume_and_export(tiny_bert_dir: str, tmp_path: Path) -> None:
    corpus = tmp_path / "sents.txt"
    corpus.write_text("\n".join(sentences(80)) + "\n")
    out = tmp_path / "run"
    common = [
        "train", "--objective", "diffcse", "--model", tiny_bert_dir, "--train-file", str(corpus),
        "--output-dir", str(out), "--batch-size", "8", "--max-seq-length", "16", "--head", "batchnorm",
        "--pooler", "cls", "--generator", "embedding-neighbours", "--neighbours-k", "3",
        "--lambda-weight", "0.5", "--learning-rate", "1e-3", "--save-steps", "3", "--logging-steps", "1",
        "--no-do-eval", "--precision", "fp32", "--discriminator-layers", "1",
    ]
    assert cli_main([*common, "--max-steps", "3"]) == 0
    ckpt = out / "checkpoints" / "checkpoint-3" / "model.safetensors"
    saved = load_file(str(ckpt))
    config = load_config(out / "train_config.yaml")
    fresh = build_model(config, tiny_bert_dir, AutoTokenizer.from_pretrained(tiny_bert_dir))
    # The checkpoint holds every persistent tensor of the module (discriminator and heads included),
    # so the Trainer's non-strict load on --resume restores all of it.
    assert set(saved) == set(fresh.state_dict())
    assert any(k.startswith("discriminator.transformer.") for k in saved)
    assert "discriminator.head.weight" in saved and "encoder.head.net.1.running_mean" in saved
    assert not any(k.startswith("generator") for k in saved)
    trained = saved["discriminator.head.weight"]
    assert not torch.equal(trained, fresh.state_dict()["discriminator.head.weight"])

    assert cli_main([*common, "--max-steps", "5", "--resume"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5]  # resumed at step 4, not from scratch
    for key in ("loss_contrast", "loss_rtd", "rtd_acc_replaced", "rtd_acc_kept", "replaced_fraction"):
        assert all(key in r for r in logged), key
    assert 0 < logged[-1]["replaced_fraction"] < 1

    # The exported model is the encoder alone, with CLS pooling.
    exported = load_file(str(out / "model.safetensors"))
    assert set(exported) == set(load_file(str(Path(tiny_bert_dir) / "model.safetensors")))
    assert read_folder_pooling(str(out)).pooler == "cls_before_pooler"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("diffcse-*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.objective == "diffcse" and config.head == "batchnorm"
