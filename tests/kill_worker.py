"""Test helper: run the diffcse command line, SIGKILLing the process while it writes checkpoint-N.

    python tests/kill_worker.py N train --model ... --save-steps ...

The kill comes from inside torch.save of checkpoint-N/optimizer.pt: the model weights of that
checkpoint are on disk, its optimizer, scheduler, RNG and trainer state are not; exactly what a
power cut or an OOM kill in the middle of a save leaves behind.
"""

import os
import signal
import sys

import torch

from diffcse.cli import main

target = f"checkpoint-{int(sys.argv[1])}"
_save = torch.save


def _killing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
    if target in str(f) and str(f).endswith("optimizer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    _save(obj, f, *args, **kwargs)


torch.save = _killing_save
sys.exit(main(sys.argv[2:]))
