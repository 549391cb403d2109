"""The `diffcse` command: each feature package registers its own subcommands here.

    train            diffcse.training.cli
    eval             diffcse.evaluation.cli
    encode, index, search, serve   diffcse.search.cli
    finetune         diffcse.finetune.cli
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import import_module

COMMAND_MODULES = ("diffcse.training.cli", "diffcse.evaluation.cli", "diffcse.search.cli", "diffcse.finetune.cli",
                   "diffcse.experiments.cli")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error said in one line (the option and what is wrong), like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print `prog: error: message` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = "diffcse") -> argparse.ArgumentParser:
    """The full command-line parser."""
    parser = Parser(prog=prog, description="Train, evaluate and search SimCSE/DiffCSE sentence embeddings.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None, prog: str = "diffcse") -> int:
    """Run the command line: user errors print one line naming the file/option and exit 2; divergence exits 1."""
    # Models come from local folders only: nothing may reach for the Hugging Face Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from diffcse.core.errors import InputError, RunFailed

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    name = getattr(args, "command_name", f"{prog} {args.command}")
    try:
        return int(args.func(args) or 0)
    except RunFailed as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1
    except (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())
