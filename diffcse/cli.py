"""The `diffcse` command: train, encode, eval, index, search, serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from diffcse.config import HEADS, OBJECTIVES, PRECISIONS, TrainConfig, load_config

_BOOL_FIELDS = {
    "mlp_only_train", "do_eval", "resume", "generator_train_mode", "rtd_count_padding",
    "gather_negatives", "sync_batchnorm", "packing", "fast_dropout",
}
_HELP = {
    "model": "HF or sentence-transformers folder (default: the packaged all-MiniLM-L6-v2)",
    "train_file": "one sentence per line (simcse/diffcse) or a CSV sent0,sent1,hard_neg (sup-simcse)",
    "pooler": "auto (the folder's own), cls, cls_before_pooler, avg, avg_first_last, avg_top2",
    "head": "training head: mlp (SimCSE), batchnorm (DiffCSE), none; auto = batchnorm for diffcse, else mlp",
    "generator": "DiffCSE generator: mlm:PATH, embedding-neighbours or random",
    "resume": "continue from the last checkpoint in OUTPUT_DIR/checkpoints",
    "packing": "run forwards on real tokens only, no padding (falls back by itself where a model cannot)",
    "fast_dropout": "dropout masks from 31-bit integers (same law, ~2x cheaper on CPU); off = torch's bernoulli",
    "do_eval": "evaluate STS-B dev every --eval-steps and keep the best model",
}


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """`diffcse train`: every TrainConfig field as an option; None means 'from config/default'."""
    p = subparsers.add_parser("train", help="train a sentence encoder (SimCSE, supervised SimCSE, DiffCSE)")
    p.add_argument("--config", help="YAML file of TrainConfig fields; options given here override it")
    defaults = TrainConfig()
    for name, value in defaults.to_dict().items():
        if name == "notes":
            continue
        flag = "--" + name.replace("_", "-")
        helptext = _HELP.get(name, "") + f" (default: {value})"
        if name in _BOOL_FIELDS:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
            continue
        kind = type(value) if value is not None else str
        if name == "discriminator_layers":
            kind = int
        choices = {"objective": OBJECTIVES, "precision": PRECISIONS, "head": HEADS}.get(name)
        p.add_argument(flag, dest=name, type=kind, default=None, choices=choices, help=helptext)
    p.add_argument("--epochs", dest="num_epochs", type=float, default=None, help="alias of --num-epochs")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Entry point of `diffcse train`."""
    from diffcse.train import train

    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    config = load_config(args.config, overrides)
    summary = train(config)
    before, best = summary["stsb_dev_spearman_before"], summary["stsb_dev_spearman_best"]
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.1f}s -> {config.output_dir}")
    if before is not None:
        print(f"STS-B dev Spearman: before {100 * before:.2f}  best {100 * best:.2f}")
    return 0


def add_encode_parser(subparsers: argparse._SubParsersAction) -> None:
    """`diffcse encode`: a text file to an .npy matrix."""
    p = subparsers.add_parser("encode", help="encode a text file (one sentence a line) to .npy")
    p.add_argument("--model", default=None, help="model folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--input", required=True, help="text file, one sentence per line")
    p.add_argument("--output", required=True, help="output .npy file")
    p.add_argument("--pooler", default=None, help="override the folder's pooling (st, cls, cls_before_pooler, avg, ...)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seq-length", type=int, default=None)
    p.add_argument("--normalize", action="store_true", help="L2-normalise the vectors")
    p.add_argument("--encoding-errors", default="strict", choices=["strict", "replace"])
    p.set_defaults(func=run_encode)


def run_encode(args: argparse.Namespace) -> int:
    """Entry point of `diffcse encode`: streams the file, writes the array atomically."""
    from diffcse.data import read_sentences
    from diffcse.encoder import Encoder

    texts = read_sentences(args.input, args.encoding_errors).sentences
    encoder = Encoder.load(args.model, pooler=args.pooler, max_seq_length=args.max_seq_length)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Preallocate on disk and fill chunk by chunk, so memory stays bounded by one chunk.
    fd, tmp = tempfile.mkstemp(suffix=".npy", dir=out.parent)
    os.close(fd)
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(texts), encoder.dim))
        row = 0
        for chunk in encoder.iter_encode(texts, batch_size=args.batch_size, normalize=args.normalize, show_progress=True):
            array[row : row + len(chunk)] = chunk
            row += len(chunk)
        array.flush()
        del array
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {len(texts)} x {encoder.dim} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser."""
    parser = argparse.ArgumentParser(prog="diffcse", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_encode_parser(sub)
    for module in ("senteval_runner.cli", "diffcse.search.cli", "diffcse.finetune_cli"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user errors print one clear line and exit 2."""
    from diffcse.data import InputError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"diffcse {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
