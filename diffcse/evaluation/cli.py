"""`diffcse eval` (and `scripts/evaluate_sts.py`): SentEval STS/transfer evaluation of a model folder."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from diffcse.core.errors import InputError
from diffcse.core.options import add_command, opt

POOLERS = ("st", "cls", "cls_before_pooler", "avg", "avg_first_last", "avg_top2")
TASK_SETS = ("sts", "transfer", "full")


@dataclass
class EvalConfig:
    """Options of `diffcse eval`."""

    model: str | None = opt(None, "HF or sentence-transformers folder (default: the packaged all-MiniLM-L6-v2)")
    pooler: str | None = opt(None, "pooling; default: the folder's own (ST Pooling config, else [CLS]); "
                             "'st' runs the folder through SentenceTransformer", choices=POOLERS)
    task_set: str | None = opt(None, "named task set (default: sts)", choices=TASK_SETS)
    tasks: list[str] | None = opt(None, "explicit tasks, e.g. STS12 STSBenchmark MR (instead of --task-set)",
                                  metavar="TASK")
    mode: str = opt("test", "test: SimCSE's test config; fasttest: 5-fold RMSprop; dev: dev numbers (fasttest "
                    "config)", choices=("test", "fasttest", "dev"))
    senteval_data: str | None = opt(None, "folder holding downstream/ (else $SENTEVAL_DATA, "
                                    "$DIFFCSE_DATA_DIR/senteval, data/senteval)", metavar="DIR")
    output: str | None = opt(None, "write the full report here (atomically)", metavar="JSON")
    sts_dev: bool = opt(True, "score STS-B and SICK-R on their dev split as well as test")
    batch_size: int = opt(64, "encoding batch size", min=1)
    max_seq_length: int | None = opt(None, "truncate inputs (default: the model's)", min=3)
    device: str | None = opt(None, "encoder device (default: cuda if available, else cpu)")
    precision: str = opt("fp32", "encoder precision: fp32 (reference) or bf16 autocast (faster where the "
                         "hardware has bf16 units; scores move by a few hundredths)", choices=("fp32", "bf16"))
    classifier_device: str | None = opt(None, "device for the transfer classifiers (default: the encoder's)")
    reference: bool = opt(False, "fit SentEval's classifiers one at a time (slow reference path)")
    threads: int | None = opt(None, "torch CPU threads for encoding", min=1)
    classifier_threads: int = opt(1, "torch CPU threads while fitting classifiers (their ops are too small "
                                  "to gain)", min=1)
    classifier_kernel: str = opt("auto", "batched classifier training: fused numba kernel (CPU; auto's "
                                 "choice there) or torch ops", choices=("auto", "fused", "torch"))
    seed: int = opt(1111, "classifier seed (SentEval: 1111)")
    quiet: bool = opt(False, "print only the table")

    def validate(self) -> None:
        """Reject contradictory options before any model or data is loaded."""
        if self.tasks and self.task_set:
            raise InputError("--tasks and --task-set: give one of them, not both")
        if self.tasks:
            from senteval_runner.data import ALL_TASKS

            unknown = [t for t in self.tasks if t not in ALL_TASKS]
            if unknown:
                raise InputError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(ALL_TASKS)}")


def run(cfg: EvalConfig) -> int:
    """Run an evaluation; prints the tables, optionally writes the JSON report; returns 0."""
    from diffcse.core import runtime
    from diffcse.core.io import display_path, write_json_atomic
    from diffcse.evaluation.adapter import FolderEncoder
    from senteval_runner.data import resolve_data_dir
    from senteval_runner.engine import evaluate
    from senteval_runner.report import format_table

    data_dir = resolve_data_dir(cfg.senteval_data)  # fail before the (slow) model load
    device = runtime.setup(cfg.threads, cfg.device)
    enc = FolderEncoder(cfg.model, pooler=cfg.pooler, max_seq_length=cfg.max_seq_length,
                        device=device, batch_size=cfg.batch_size, precision=cfg.precision)
    clf_device = cfg.classifier_device or enc.description["device"]

    def progress(msg: str) -> None:
        """Per-task progress lines on stderr (stdout is for the table)."""
        if not cfg.quiet:
            print(msg, file=sys.stderr, flush=True)

    report = evaluate(enc, tasks=cfg.tasks, task_set=cfg.task_set, mode=cfg.mode,
                      data_dir=data_dir, batch_size=cfg.batch_size, seed=cfg.seed,
                      batched=not cfg.reference, device=clf_device, sts_dev=cfg.sts_dev,
                      classifier_threads=cfg.classifier_threads, classifier_kernel=cfg.classifier_kernel,
                      progress=progress)
    report["settings"]["encoder"] = enc.description
    report["settings"]["data_dir"] = display_path(report["settings"]["data_dir"])
    print(format_table(report))
    if cfg.output:
        path = write_json_atomic(cfg.output, report)
        if not cfg.quiet:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand to the `diffcse` command line."""
    add_command(subparsers, "eval", EvalConfig, run,
                help="SentEval: STS and transfer tasks (faithful, fast, CPU-capable)", description=__doc__)

