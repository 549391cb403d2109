"""The few-shot benchmark's report: parts run by separate processes merge into one grid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ["cce", "cce+proxyanchor", "cce+scal"]


def part(tasks: list[str], seed: int, lr: float = 1e-4) -> dict:
    """A result file as one bench process writes it, with random accuracies."""
    rng = np.random.default_rng(seed)
    runs = [
        {"task": t, "shots": k, "loss": loss, "seed": s, "accuracy_classifier": float(rng.uniform(0.4, 0.9)),
         "accuracy_proxy": None}
        for t in tasks for s in range(4) for k in (8, 32) for loss in LOSSES
    ]
    meta = {
        "model_name": "m", "pooler": "avg", "shots": [8, 32], "seeds": 4, "losses": LOSSES, "train_layers": 6,
        "epochs": 10, "min_steps": 20, "max_steps": 30, "batch_size": 16, "lr": lr, "head_lr": 0.05,
        "proxy_lr": 0.1, "max_seq_length": 64, "max_test": 400, "test_fraction": 0.2, "loss_specs": {},
        "tasks": tasks, "protocol": {t: f"protocol of {t}" for t in tasks}, "wall_seconds": 60.0,
        "cpu": "2 CPU cores", "threads": 1,
    }
    return {"meta": meta, "summary": [], "claims": {}, "runs": runs, "complete": True}


def merge(tmp_path: Path, *parts: dict) -> subprocess.CompletedProcess:
    """Run the bench's --merge on these parts (the first is --out)."""
    names = []
    for i, p in enumerate(parts):
        names.append(tmp_path / f"part{i}.json")
        names[-1].write_text(json.dumps(p))
    return bench("--out", str(names[0]), "--merge", *map(str, names[1:]))


def bench(*args: str) -> subprocess.CompletedProcess:
    """Run the benchmark's command line from the repository root."""
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_fewshot", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_merge_keeps_every_run_and_computes_paired_differences(tmp_path: Path) -> None:
    a, b = part(["TREC", "MR"], 0), part(["MRPC"], 1)
    res = merge(tmp_path, a, b)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "part0.json").read_text())
    assert len(report["runs"]) == len(a["runs"]) + len(b["runs"])
    assert report["meta"]["tasks"] == ["MR", "TREC", "MRPC"]  # SentEval's order
    assert set(report["meta"]["protocol"]) == {"TREC", "MR", "MRPC"}
    assert report["complete"] is True
    assert report["meta"]["processes"] == 2 and report["meta"]["wall_seconds"] == 120.0
    assert "summed over 2 processes" in (tmp_path / "part0.md").read_text()

    # Naively: the paired differences to CCE on the same (task, shots, seed), pooled.
    runs = a["runs"] + b["runs"]
    acc = {(r["task"], r["shots"], r["loss"], r["seed"]): r["accuracy_classifier"] for r in runs}
    d = np.array([100 * (v - acc[(t, k, "cce", s)]) for (t, k, loss, s), v in acc.items() if loss == "cce+scal"])
    claim = report["claims"]["cce+scal"]  # a loss without a paper claim is reported too
    assert claim["episodes"] == len(d) == 3 * 2 * 4
    assert claim["episode_mean"] == pytest.approx(d.mean())
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert claim["episode_ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    md = (tmp_path / "part0.md").read_text()
    assert "| 8-shot | MR | TREC | MRPC | all tasks" in md
    d8 = np.array([100 * (v - acc[(t, k, "cce", s)]) for (t, k, loss, s), v in acc.items()
                   if loss == "cce+scal" and k == 8])
    half8 = stats.t.ppf(0.975, len(d8) - 1) * d8.std(ddof=1) / np.sqrt(len(d8))
    assert f"{d8.mean():+.2f} [{d8.mean() - half8:+.2f}, {d8.mean() + half8:+.2f}] |" in md
    row = next(r for r in report["summary"] if (r["task"], r["shots"], r["loss"]) == ("MRPC", 32, "cce+proxyanchor"))
    cell = [100 * (acc[("MRPC", 32, "cce+proxyanchor", s)] - acc[("MRPC", 32, "cce", s)]) for s in range(4)]
    assert row["delta_vs_cce"] == pytest.approx(np.mean(cell))
    assert row["delta_std"] == pytest.approx(np.std(cell, ddof=1))


def test_merge_refuses_other_settings(tmp_path: Path) -> None:
    res = merge(tmp_path, part(["TREC"], 0), part(["MR"], 1, lr=2e-5))
    assert res.returncode != 0
    assert "part1.json" in res.stderr and "settings differ" in res.stderr and "lr" in res.stderr


def test_merge_refuses_a_run_that_disagrees(tmp_path: Path) -> None:
    a, b = part(["TREC"], 0), part(["TREC"], 1)
    res = merge(tmp_path, a, b)
    assert res.returncode != 0
    assert "part1.json" in res.stderr and "another accuracy" in res.stderr
    # The same run twice (a resumed copy) is fine.
    assert merge(tmp_path, a, part(["TREC"], 0)).returncode == 0
    # A grid with a seed missing is not complete.
    a["runs"] = [r for r in a["runs"] if r["seed"] != 3]
    assert merge(tmp_path, a, a).returncode == 0
    assert json.loads((tmp_path / "part0.json").read_text())["complete"] is False


def test_merge_names_a_file_that_is_not_a_result(tmp_path: Path) -> None:
    (tmp_path / "part0.json").write_text(json.dumps(part(["TREC"], 0)))
    (tmp_path / "notes.json").write_text("{not json")
    for name in ("notes.json", "missing.json"):
        res = bench("--out", str(tmp_path / "part0.json"), "--merge", str(tmp_path / name))
        assert res.returncode != 0 and name in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "other.json").write_text(json.dumps({"runs": []}))
    res = bench("--out", str(tmp_path / "part0.json"), "--merge", str(tmp_path / "other.json"))
    assert res.returncode != 0 and "not a bench_fewshot result" in res.stderr
