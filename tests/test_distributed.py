"""Two real processes (torchrun, gloo, CPU) compute the same loss and gradients as one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sentences
from ddp_worker import build, fix_corruption, snapshot

from diffcse.training.data import ViewCollator, tokenize_columns

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_torchrun(args: list[str], cwd: Path, timeout: int = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([*TORCHRUN, "--master_port", free_port(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(("views", "head", "chunk"), [(2, "batchnorm", 0), (3, "mlp", 0), (2, "batchnorm", 3)])
def test_two_process_step_equals_single_process(
    tiny_bert_dir: str, tmp_path: Path, views: int, head: str, chunk: int
) -> None:
    """chunk > 0: each rank takes gradient-cached steps (gathered negatives, global BN, hand-averaged grads)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    # Equal lengths, so per-rank padding equals the single process's and only the maths differs.
    columns = [sentences(8, seed=s, words=7) for s in range(views)]
    ds, _ = tokenize_columns(tok, columns, 16)
    batch = ViewCollator(tok.pad_token_id)([ds[i] for i in range(8)])
    torch.save(batch, tmp_path / "batch.pt")
    run_torchrun([str(Path(__file__).parent / "ddp_worker.py"), tiny_bert_dir, head, str(tmp_path / "batch.pt"),
                  str(tmp_path / "ddp.pt"), "simcse", str(chunk)], tmp_path)
    ddp = torch.load(tmp_path / "ddp.pt")

    single = build(tiny_bert_dir, head)
    loss = single(**batch)["loss"]
    loss.backward()
    ref = snapshot(single, loss)
    assert ddp["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-9)
    assert ddp["grads"].keys() == ref["grads"].keys()
    for name, grad in ref["grads"].items():
        assert (ddp["grads"][name] - grad).norm() <= 1e-7 * grad.norm() + 1e-9, name
    if head == "batchnorm":
        assert ref["buffers"], "the BN head has running statistics"
        for name, buf in ref["buffers"].items():
            assert torch.allclose(ddp["buffers"][name], buf, rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("chunk", [0, 2])
def test_two_process_diffcse_step_equals_single_process(tiny_bert_dir: str, tmp_path: Path, chunk: int) -> None:
    """DiffCSE (BN head, packed encoder and discriminator, L_RTD over the global token count); chunk > 0: cached."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    # Unequal lengths: the ranks hold different numbers of tokens, so a per-rank RTD mean would be wrong.
    texts = sentences(8, seed=4)
    ds, _ = tokenize_columns(tok, [texts], 16)
    batch = ViewCollator(tok.pad_token_id)([ds[i] for i in range(8)])
    counts = batch["attention_mask"].sum(-1).squeeze(1)
    assert counts[:4].sum() != counts[4:].sum()

    single = build(tiny_bert_dir, "batchnorm", "diffcse")
    n, _, length = batch["input_ids"].shape
    flat_ids = batch["input_ids"].expand(n, 2, length).reshape(2 * n, length)
    flat_mask = batch["attention_mask"].expand(n, 2, length).reshape(2 * n, length)
    torch.manual_seed(3)
    corrupted, replaced = single.corrupt(flat_ids, flat_mask)
    assert replaced.any()
    torch.save({**batch, "corrupted": corrupted, "replaced": replaced}, tmp_path / "batch.pt")
    run_torchrun([str(Path(__file__).parent / "ddp_worker.py"), tiny_bert_dir, "batchnorm", str(tmp_path / "batch.pt"),
                  str(tmp_path / "ddp.pt"), "diffcse", str(chunk)], tmp_path)
    ddp = torch.load(tmp_path / "ddp.pt")

    fix_corruption(single, corrupted, replaced)
    loss = single(**batch)["loss"]
    loss.backward()
    ref = snapshot(single, loss)
    assert ddp["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-9)
    assert ddp["grads"].keys() == ref["grads"].keys()
    assert any(name.startswith("discriminator.") for name in ref["grads"])
    for name, grad in ref["grads"].items():
        assert (ddp["grads"][name] - grad).norm() <= 1e-7 * grad.norm() + 1e-9, name
    for name, buf in ref["buffers"].items():
        assert torch.allclose(ddp["buffers"][name], buf, rtol=1e-9, atol=1e-12), name


def test_without_gathering_the_loss_differs(tiny_bert_dir: str) -> None:
    """Guard for the test above: half-batch losses are not the full-batch loss by accident."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    ds, _ = tokenize_columns(tok, [sentences(8)], 16)
    batch = ViewCollator(tok.pad_token_id)([ds[i] for i in range(8)])
    model = build(tiny_bert_dir, "mlp")
    full = model(**batch)["loss"].item()
    halves = [model(**{k: v[i * 4 : (i + 1) * 4] for k, v in batch.items()})["loss"].item() for i in range(2)]
    assert abs(full - sum(halves) / 2) > 1e-3


@pytest.mark.parametrize("cache", [[], ["--grad-cache-chunk", "2"]], ids=["plain", "grad-cache"])
def test_torchrun_training_then_single_process_resume(tiny_bert_dir: str, tmp_path: Path, cache: list[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(80)) + "\n")
    out = tmp_path / "run"
    common = ["--model", tiny_bert_dir, "--train-file", str(corpus), "--output-dir", str(out), "--batch-size", "4",
              "--max-seq-length", "16", "--no-do-eval", "--precision", "fp32", "--head", "batchnorm", "--save-steps", "2",
              "--logging-steps", "1", *cache]
    run_torchrun(["-m", "diffcse", "train", *common, "--max-steps", "2"], tmp_path)
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_logs = [r for r in logged if "loss" in r]
    assert step_logs and all(r["effective_batch_size"] == 8 for r in step_logs)
    assert all(r["negatives"] == 7 for r in step_logs)  # 2 ranks x 4 sentences, minus the positive
    # Resume the 2-process checkpoint in one process.
    proc = subprocess.run([sys.executable, "-m", "diffcse", "train", *common, "--max-steps", "4", "--resume"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert (out / "modules.json").exists()
    shutil.rmtree(out / "checkpoints")
