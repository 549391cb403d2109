#!/usr/bin/env python
"""Evaluate a sentence encoder on SentEval STS (and transfer) tasks; the same options as `diffcse eval`."""

import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads slow
# multi-threaded inference several-fold; on an idle one this costs nothing measurable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from diffcse.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]], prog="evaluate_sts.py"))
