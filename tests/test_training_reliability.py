"""Training off the happy path: same seed same run, divergence stops, killed checkpoints, strict reports."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sentences
from safetensors.torch import load_file

from diffcse.cli import main as cli_main
from diffcse.core.folder import NonFiniteWeightsError, check_finite_weights
from diffcse.training.checkpoints import MANIFEST, problem, resumable_checkpoint
from diffcse.training.config import load_config
from diffcse.training.guard import GuardedAdamW, NonFiniteGuard, TrainingDiverged
from diffcse.training.trainer import train

HERE = Path(__file__).resolve().parent


def strict_json(path: Path) -> dict:
    """Parse a file as strict JSON: NaN/Infinity literals are an error."""

    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds the non-JSON literal {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "sents.txt"
    path.write_text("\n".join(sentences(96, seed=5)) + "\n")
    return path


def argv(model: str, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", model, "--train-file", str(corpus), "--output-dir", str(out), "--batch-size", "8",
        "--max-seq-length", "16", "--pooler", "cls", "--precision", "fp32", "--no-do-eval", "--learning-rate", "1e-3",
        "--logging-steps", "1", *extra,
    ]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("objective", ["simcse", "diffcse"])
def test_same_seed_gives_bit_identical_runs(tiny_bert_dir: str, corpus: Path, tmp_path: Path, objective: str) -> None:
    """Heads, discriminator, data order, dropout and masking all follow --seed (CPU)."""
    extra = {"objective": objective}
    if objective == "diffcse":
        extra.update(generator="random", discriminator_layers=1, learning_rate=1e-3)
    runs = []
    for name in ("a", "b", "c"):
        seed = 7 if name != "c" else 8
        config = load_config(None, {
            "model": tiny_bert_dir, "train_file": str(corpus), "output_dir": str(tmp_path / name), "batch_size": 8,
            "max_steps": 5, "save_steps": 5, "do_eval": False, "precision": "fp32", "learning_rate": 1e-3,
            "max_seq_length": 16, "pooler": "cls", "seed": seed, "mlp_only_train": False if objective == "simcse" else True,
            **extra,
        })
        summary = train(config)
        runs.append((summary["train_loss"], weights(tmp_path / name)))
    (loss_a, w_a), (loss_b, w_b), (loss_c, w_c) = runs
    assert loss_a == loss_b
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    # Another seed is another run (so the test can fail).
    assert loss_a != loss_c and any(not torch.equal(w_a[k], w_c[k]) for k in w_a)


def test_diverging_run_stops_names_the_step_and_keeps_the_last_good_export(
    tiny_bert_dir: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert cli_main(argv(tiny_bert_dir, corpus, out, "--max-steps", "4", "--save-steps", "2")) == 0
    good = digest(out)
    rc = cli_main(argv(tiny_bert_dir, corpus, out, "--max-steps", "30", "--save-steps", "1", "--learning-rate", "1e30"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "diverged at step" in err and "gradient norm is nan" in err
    assert "Last complete checkpoint:" in err and "checkpoint-" in err and "(step 4) was left as it was" in err
    after = digest(out)
    for name in ("model.safetensors", "best.json", "config.json"):
        assert after[name] == good[name], name  # the last good export is untouched
    summary = strict_json(out / "summary.json")
    assert summary["status"] == "diverged" and summary["steps"] < 30
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds {name}"))


def test_skip_policy_skips_up_to_the_limit_then_stops(tiny_bert_dir: str, corpus: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(argv(tiny_bert_dir, corpus, tmp_path / "o", "--max-steps", "30", "--learning-rate", "1e30",
                       "--on-nonfinite", "skip", "--max-skipped-steps", "2"))
    assert rc == 1
    assert "after skipping 2 steps (--max-skipped-steps 2)" in capsys.readouterr().err


def test_guarded_optimizer_skips_or_stops_on_nonfinite_gradients() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    guard = NonFiniteGuard("skip", max_skipped=1)
    opt = GuardedAdamW([p], guard=guard, lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and guard.skipped == 1 and p.grad is None
    p.grad = torch.ones(3)
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3))  # a finite step goes through
    p.grad = torch.tensor([float("inf"), 0.0, 0.0])
    with pytest.raises(TrainingDiverged, match="after skipping 1 steps"):
        opt.step()
    stop = GuardedAdamW([p], guard=NonFiniteGuard("stop"), lr=0.1)
    p.grad = torch.tensor([float("nan"), 0.0, 0.0])
    with pytest.raises(TrainingDiverged, match="diverged at step"):
        stop.step()


def test_export_refuses_nonfinite_weights(tiny_bert_dir: str) -> None:
    from diffcse.core.modeling import SentenceEncoder

    enc = SentenceEncoder.from_pretrained(tiny_bert_dir, pooler="cls", head="mlp")
    check_finite_weights(enc)
    with torch.no_grad():
        enc.backbone.embeddings.word_embeddings.weight[3, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="word_embeddings"):
        check_finite_weights(enc)


def test_kill_during_checkpoint_write_then_resume_equals_uninterrupted(
    tiny_bert_dir: str, corpus: Path, tmp_path: Path
) -> None:
    # Every run in its own process with the same thread count: the suite's process may have another
    # (a module sets 1 thread at import), and a different reduction order is a different run.
    steps = ["--max-steps", "12", "--save-steps", "4", "--save-total-limit", "3", "--threads", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    uninterrupted = subprocess.run([sys.executable, "-m", "diffcse", *argv(tiny_bert_dir, corpus, full, *steps)],
                                   capture_output=True, text=True, cwd=HERE.parent)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    killed = subprocess.run(
        [sys.executable, str(HERE / "kill_worker.py"), "8", *argv(tiny_bert_dir, corpus, part, *steps)],
        capture_output=True, text=True, cwd=HERE, env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    half = part / "checkpoints" / "checkpoint-8"
    assert (half / "model.safetensors").exists() and not (half / "optimizer.pt").exists()
    assert problem(half) is not None and problem(part / "checkpoints" / "checkpoint-4") is None
    resumed = subprocess.run(
        [sys.executable, "-m", "diffcse", *argv(tiny_bert_dir, corpus, part, *steps, "--resume")],
        capture_output=True, text=True, cwd=HERE.parent,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint-8 is incomplete" in resumed.stderr and "falling back to" in resumed.stderr
    a, b = weights(full), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The resumed run reports the loss of all 12 steps, and logs each step once.
    s_full, s_part = strict_json(full / "summary.json"), strict_json(part / "summary.json")
    assert s_part["resumed_from_step"] == 4 and s_part["steps"] == 12
    assert s_part["train_loss"] == pytest.approx(s_full["train_loss"], rel=1e-9)
    logged = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged == sorted(set(logged)) == list(range(1, 13))


def test_truncated_checkpoint_files_fall_back_to_the_newest_complete_one(
    tiny_bert_dir: str, corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert cli_main(argv(tiny_bert_dir, corpus, out, "--max-steps", "9", "--save-steps", "3",
                         "--save-total-limit", "3")) == 0
    ckpts = out / "checkpoints"
    assert resumable_checkpoint(ckpts).step == 9
    weights_file = ckpts / "checkpoint-9" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    state = ckpts / "checkpoint-6" / "trainer_state.json"
    state.write_text(state.read_text()[:10])
    manifest = json.loads((ckpts / "checkpoint-6" / MANIFEST).read_text())
    manifest["files"]["trainer_state.json"] = state.stat().st_size  # consistent sizes, unreadable JSON
    (ckpts / "checkpoint-6" / MANIFEST).write_text(json.dumps(manifest))
    assert "truncated" in problem(ckpts / "checkpoint-9")
    assert "trainer_state.json is unreadable" in problem(ckpts / "checkpoint-6")
    resume = resumable_checkpoint(ckpts)
    assert resume.step == 3 and [p.name for p, _ in resume.discarded] == ["checkpoint-9", "checkpoint-6"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-3"]
    # Nothing complete at all: one clear error naming every checkpoint and why.
    (ckpts / "checkpoint-3" / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"no complete checkpoint .*checkpoint-3: no diffcse_checkpoint.json"):
        resumable_checkpoint(ckpts)


def test_fp16_without_a_gpu_is_an_error(tiny_bert_dir: str, corpus: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is valid here")
    args = argv(tiny_bert_dir, corpus, tmp_path / "o", "--max-steps", "1")
    args[args.index("fp32")] = "fp16"
    assert cli_main(args) == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_encode_refuses_nonfinite_vectors(tiny_bert_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_bert_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("word_embeddings.weight"))
    tensors[key][:] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    src = tmp_path / "in.txt"
    src.write_text("\nthe man plays guitar\n")
    out = tmp_path / "emb.npy"
    assert cli_main(["encode", "--model", str(broken), "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2: the model gives NaN or infinity" in err and "was not written" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".emb")] == []
