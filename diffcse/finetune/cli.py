"""`diffcse finetune`: few-shot supervised fine-tuning with CCE and DML losses on SentEval tasks."""

from __future__ import annotations

import argparse

from diffcse.core.options import add_command
from diffcse.finetune.config import FinetuneConfig


def run(cfg: FinetuneConfig) -> int:
    """Entry point of `diffcse finetune`."""
    from diffcse.core import runtime
    from diffcse.finetune.train import run_finetune, run_name

    cfg.device = runtime.setup(cfg.threads, cfg.device)
    summary = run_finetune(cfg)
    acc = summary["accuracy"]
    shots = "all" if cfg.shots is None else cfg.shots
    print(f"{summary['task']} shots={shots} loss={summary['loss']} inference={cfg.inference}: "
          f"accuracy {acc['mean']:.2f} ± {acc['std']:.2f} over {cfg.seeds} seeds")
    print(f"results: {cfg.output_dir}/{run_name(cfg)}/results.json")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `finetune` subcommand."""
    add_command(subparsers, "finetune", FinetuneConfig, run,
                help="few-shot fine-tuning with CCE / DML losses on a SentEval transfer task", description=__doc__)
