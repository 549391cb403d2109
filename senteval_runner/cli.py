"""`diffcse eval` and `scripts/evaluate_sts.py`: SentEval STS/transfer evaluation from the command line."""

from __future__ import annotations

import argparse
import sys

POOLERS = ["st", "cls", "cls_before_pooler", "avg", "avg_first_last", "avg_top2"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The evaluation options, shared by `diffcse eval` and the standalone script."""
    from .data import ALL_TASKS

    p.add_argument("--model", default=None,
                   help="HF or sentence-transformers folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--pooler", default=None, choices=POOLERS,
                   help="pooling; default: the folder's own (ST Pooling config, else [CLS]); "
                        "'st' runs the folder through SentenceTransformer")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--task-set", default=None, choices=["sts", "transfer", "full"],
                       help="named task set (default: sts)")
    which.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                       help=f"explicit tasks: {' '.join(ALL_TASKS)}")
    p.add_argument("--mode", default="test", choices=["test", "fasttest", "dev"],
                   help="test: SimCSE's test config; fasttest: 5-fold RMSprop; dev: dev numbers (fasttest config)")
    p.add_argument("--senteval-data", default=None, metavar="DIR",
                   help="folder holding downstream/ (else $SENTEVAL_DATA, $DIFFCSE_DATA_DIR/senteval, data/senteval)")
    p.add_argument("--output", default=None, metavar="JSON", help="write the full report here (atomically)")
    p.add_argument("--no-sts-dev", dest="sts_dev", action="store_false",
                   help="score STS-B and SICK-R on the test split only (default: dev and test)")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch size")
    p.add_argument("--max-seq-length", type=int, default=None, help="truncate inputs (default: the model's)")
    p.add_argument("--device", default=None, help="encoder device (default: cuda if available, else cpu)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="encoder precision: fp32 (reference) or bf16 autocast (faster; scores move by a few "
                        "hundredths, see README)")
    p.add_argument("--classifier-device", default=None,
                   help="device for the transfer classifiers (default: the encoder's)")
    p.add_argument("--reference", action="store_true",
                   help="fit SentEval's classifiers one at a time (slow reference path)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for encoding")
    p.add_argument("--classifier-threads", type=int, default=1,
                   help="torch CPU threads while fitting classifiers (default 1: their ops are too small to gain)")
    p.add_argument("--classifier-kernel", default="auto", choices=["auto", "fused", "torch"],
                   help="batched classifier training: fused numba kernel (CPU; auto's choice there) or torch ops")
    p.add_argument("--seed", type=int, default=1111, help="classifier seed (SentEval: 1111)")
    p.add_argument("--quiet", action="store_true", help="print only the table")


def run(args: argparse.Namespace) -> int:
    """Run an evaluation from parsed options; prints the tables, optionally writes JSON; returns 0."""
    import torch

    from .adapters import FolderEncoder
    from .data import resolve_data_dir
    from .engine import evaluate
    from .report import format_table, write_json_atomic

    data_dir = resolve_data_dir(args.senteval_data)  # fail before the (slow) model load
    if args.threads:
        torch.set_num_threads(args.threads)
    enc = FolderEncoder(args.model, pooler=args.pooler, max_seq_length=args.max_seq_length,
                        device=args.device, batch_size=args.batch_size, precision=args.precision)
    clf_device = args.classifier_device or enc.description["device"]

    def progress(msg: str) -> None:
        """Per-task progress lines on stderr (stdout is for the table)."""
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    report = evaluate(enc, tasks=args.tasks, task_set=args.task_set, mode=args.mode,
                      data_dir=data_dir, batch_size=args.batch_size, seed=args.seed,
                      batched=not args.reference, device=clf_device, sts_dev=args.sts_dev,
                      classifier_threads=args.classifier_threads, classifier_kernel=args.classifier_kernel,
                      progress=progress)
    report["settings"]["encoder"] = enc.description
    print(format_table(report))
    if args.output:
        path = write_json_atomic(args.output, report)
        if not args.quiet:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand to the `diffcse` command line."""
    p = subparsers.add_parser("eval", help="SentEval: STS and transfer tasks (faithful, fast, CPU-capable)",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (scripts/evaluate_sts.py); errors print one line and exit 2."""
    p = argparse.ArgumentParser(prog="evaluate_sts.py", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"evaluate_sts.py: error: {err}", file=sys.stderr)
        return 2
