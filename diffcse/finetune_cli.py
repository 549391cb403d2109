"""`diffcse finetune`: few-shot supervised fine-tuning with CCE and DML losses on SentEval tasks."""

from __future__ import annotations

import argparse

# Only the light names module: building the parser must not import torch.
from diffcse.finetune.names import ALIASES, FEWSHOT_TASKS, LOSS_TERMS

_LOSS_HELP = (
    f"'+'-joined terms from {', '.join(LOSS_TERMS)}, or {', '.join(ALIASES)} "
    "(= 0.4 cce + 0.6 softtriple with the TripleEntropy paper's SoftTriple settings); e.g. cce+proxyanchor"
)


def _shots(value: str) -> int | None:
    """Parse --shots: a positive integer or 'all'."""
    if value.lower() == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shots must be a positive integer or 'all', got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"--shots must be >= 1, got {k}")
    return k


def _value(text: str) -> int | float | bool | str:
    """Parse a loss argument value: int, float, true/false, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _weights(items: list[str]) -> dict[str, float]:
    """Parse repeated --loss-weight TERM=W."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, val = item.partition("=")
        try:
            weight = float(val)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--loss-weight: expected TERM=NUMBER (e.g. cce=0.4), got {item!r}")
        out[name.strip().lower()] = weight
    return out


def _params(items: list[str]) -> dict[str, dict[str, object]]:
    """Parse repeated --loss-param TERM.ARG=VALUE."""
    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, val = item.partition("=")
        term, dot, arg = key.partition(".")
        if not sep or not dot or not arg:
            raise ValueError(f"--loss-param: expected TERM.ARG=VALUE (e.g. softtriple.la=8), got {item!r}")
        out.setdefault(term.strip().lower(), {})[arg.strip()] = _value(val.strip())
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `finetune` subcommand."""
    p = subparsers.add_parser(
        "finetune",
        help="few-shot fine-tuning with CCE / DML losses on a SentEval transfer task",
        description=__doc__,
    )
    p.add_argument("--model", default=None, help="HF or sentence-transformers folder (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--task", required=True, type=str.upper, choices=FEWSHOT_TASKS)
    p.add_argument("--shots", type=_shots, default=16, help="examples per class, or 'all' (default: 16)")
    p.add_argument("--loss", default="cce", help=_LOSS_HELP)
    p.add_argument("--loss-weight", action="append", default=[], metavar="TERM=W", help="weight of a term (default 1; repeatable)")
    p.add_argument("--loss-param", action="append", default=[], metavar="TERM.ARG=V",
                   help="pytorch-metric-learning argument of a term, e.g. softtriple.la=8 (repeatable)")
    p.add_argument("--inference", default="classifier", choices=["classifier", "proxy"],
                   help="predict with the classification head, or the nearest proxy of the (first) proxy loss")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (episodes) to average over")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/fs", help="results go to OUTPUT_DIR/<task>-<shots>shot-<loss>-<inference>/")
    p.add_argument("--pooler", default=None, help="avg or cls_before_pooler (default: the folder's own, else avg)")
    p.add_argument("--lr", type=float, default=2e-5, help="encoder learning rate")
    p.add_argument("--head-lr", type=float, default=1e-2, help="classification head learning rate")
    p.add_argument("--proxy-lr", type=float, default=1e-1, help="learning rate of the DML losses' proxies/centers")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--train-layers", type=int, default=None,
                   help="fine-tune only the top N transformer layers; the frozen rest is run once and cached (default: all)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share for MR/CR/SUBJ/MPQA")
    p.add_argument("--max-test", type=int, default=None, help="cap the test set (stratified, per seed)")
    p.add_argument("--senteval-data", default=None, help="folder holding downstream/ (default: $DIFFCSE_DATA_DIR/senteval)")
    p.add_argument("--export", action="store_true", help="export each seed's fine-tuned encoder to <run>/seed<N>/model")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of `diffcse finetune`."""
    import torch

    from diffcse.finetune.train import FinetuneConfig, run_finetune, run_name

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(
        model=args.model, task=args.task, shots=args.shots, loss=args.loss,
        loss_weights=_weights(args.loss_weight), loss_params=_params(args.loss_param),
        inference=args.inference, seeds=args.seeds, first_seed=args.first_seed, pooler=args.pooler,
        lr=args.lr, head_lr=args.head_lr, proxy_lr=args.proxy_lr, weight_decay=args.weight_decay,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        max_seq_length=args.max_seq_length, train_layers=args.train_layers,
        test_fraction=args.test_fraction, max_test=args.max_test, data_dir=args.senteval_data,
        output_dir=args.output_dir, export=args.export, device=args.device,
    )
    cfg.validate()  # fail on bad options before loading any model or data
    summary = run_finetune(cfg)
    acc = summary["accuracy"]
    shots = "all" if cfg.shots is None else cfg.shots
    print(f"{summary['task']} shots={shots} loss={summary['loss']} inference={cfg.inference}: "
          f"accuracy {acc['mean']:.2f} ± {acc['std']:.2f} over {cfg.seeds} seeds")
    print(f"results: {cfg.output_dir}/{run_name(cfg)}/results.json")
    return 0
