"""Train a sentence encoder: the same as `diffcse train`, as a script for people who read scripts.

    python scripts/train_embeddings.py --config configs/demo-minilm.yaml
    python scripts/train_embeddings.py --model PATH --train-file sentences.txt --objective simcse \
        --output-dir runs/x --max-steps 500

Every option of `diffcse train --help` works here. The steps it takes, in order:
read the config (YAML, then command-line overrides) → read and tokenise the corpus → build the
encoder, pooler, head and loss → train on the HF Trainer, evaluating STS-B dev every
--eval-steps and exporting the best model to --output-dir → write summary.json.
"""

from __future__ import annotations

import sys

from diffcse.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
