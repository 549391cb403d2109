"""`diffcse train`: every TrainConfig field is an option and a YAML key (`--config`)."""

from __future__ import annotations

import argparse

from diffcse.core.options import add_command
from diffcse.training.config import TrainConfig


def run(config: TrainConfig) -> int:
    """Entry point of `diffcse train`: train, then print where the model went and its dev score."""
    from diffcse.training.trainer import train

    summary = train(config)
    dev = summary["dev_metric"]
    before, best = summary[f"{dev}_before"], summary[f"{dev}_best"]
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.1f}s -> {config.output_dir}")
    if before is not None and best is not None:
        label = "STS-B dev" if dev == "stsb_dev_spearman" else f"{config.dev_file}"
        print(f"{label} Spearman: before {100 * before:.2f}  best {100 * best:.2f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` to the diffcse command line."""
    add_command(subparsers, "train", TrainConfig, run, config_file=True,
                help="train a sentence encoder (SimCSE, supervised SimCSE, DiffCSE)")
