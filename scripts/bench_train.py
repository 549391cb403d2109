"""Training throughput: our unsupervised SimCSE against sentence-transformers' SimCSE recipe.

Both run on the same model, sentences, batch, max_len, steps and seed, in one process, one after
the other (twice, alternating, to average out drift on a shared machine). sentence-transformers'
recipe is MultipleNegativesRankingLoss (scale 20 = 1/τ with τ = 0.05) on (s, s) pairs through
SentenceTransformerTrainer. We also measure this CPU's matmul GFLOP/s and report each step time
against the encoder's FLOP floor (forward + backward ≈ 3× the forward FLOPs).

    python scripts/bench_train.py --steps 30 --output results/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, TrainerCallback

from diffcse.config import TrainConfig
from diffcse.data import default_corpus, read_sentences
from diffcse.encoder import default_model_path


class StepTimer(TrainerCallback):
    """Wall time of each optimiser step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """Start the clock."""
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """Stop the clock."""
        self.times.append(time.perf_counter() - self._t)


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """Sustained fp32 GEMM rate of this CPU with torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def encoder_train_flops(config: object, tokens: int, seq_len: int) -> float:
    """FLOPs of one forward+backward of a BERT-style encoder over `tokens` tokens (matmuls only)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_token_layer = 2 * (4 * h * h + 2 * h * inter)  # QKV+output projections, FFN in and out
    attention = 2 * 2 * seq_len * h  # scores and weighted sum, per token per layer
    forward = tokens * layers * (per_token_layer + attention)
    return 3.0 * forward


def run_ours(model: str, sentences: list[str], args: argparse.Namespace, workdir: Path) -> dict:
    """Time our unsupervised SimCSE loop (one 2N forward per step)."""
    from transformers import AutoTokenizer

    from diffcse.data import ViewCollator, tokenize_columns
    from diffcse.train import ContrastiveTrainer, build_model, training_arguments

    config = TrainConfig(
        model=model, output_dir=str(workdir), batch_size=args.batch_size, max_seq_length=args.max_len,
        max_steps=args.steps, learning_rate=3e-5, do_eval=False, save_steps=10**9, logging_steps=10**9,
        seed=args.seed, precision=args.precision, pooler="avg", head="mlp",
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    dataset, _ = tokenize_columns(tokenizer, [sentences], args.max_len)
    timer = StepTimer()
    trainer = ContrastiveTrainer(
        model=build_model(config, model, tokenizer), args=training_arguments(config, 0),
        train_dataset=dataset, data_collator=ViewCollator(tokenizer.pad_token_id), callbacks=[timer],
        scorer=None, config=config, tokenizer_for_export=tokenizer,
    )
    trainer.args.save_strategy = "no"
    trainer.train()
    return {"step_seconds": timer.times}


def run_st(model: str, sentences: list[str], args: argparse.Namespace, workdir: Path) -> dict:
    """Time sentence-transformers' SimCSE recipe: MNRL on (s, s) pairs via its own trainer."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    st = SentenceTransformer(model, device="cpu")
    st.max_seq_length = args.max_len
    data = Dataset.from_dict({"anchor": sentences, "positive": sentences})
    timer = StepTimer()
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(workdir), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=3e-5, warmup_steps=0, seed=args.seed, save_strategy="no", logging_steps=10**9,
        report_to=[], use_cpu=True, bf16=args.precision == "bf16", dataloader_drop_last=True,
    )
    trainer = SentenceTransformerTrainer(
        model=st, args=targs, train_dataset=data,
        loss=MultipleNegativesRankingLoss(st, scale=20.0), callbacks=[timer],
    )
    trainer.train()
    return {"step_seconds": timer.times}


def summarise(times: list[float], skip: int, batch: int) -> dict:
    """Median step time after warm-up, and sentences (pairs) per second."""
    kept = times[skip:] or times
    median = statistics.median(kept)
    return {"median_step_s": median, "sentences_per_s": batch / median, "steps_timed": len(kept)}


def main(argv: list[str] | None = None) -> int:
    """Run both trainers (alternating) and write the JSON report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--train-file", default=None, help="sentences (default: $DIFFCSE_DATA_DIR corpus)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=3, help="steps excluded from the timing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of (ours, st)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32/bf16 (autocast)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--output", default="results/bench_train.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = args.model or default_model_path()
    path = Path(args.train_file) if args.train_file else default_corpus()
    needed = args.batch_size * (args.steps + 1)
    sentences = read_sentences(path).sentences[:needed]
    gflops = matmul_gflops()
    config = AutoConfig.from_pretrained(model)
    precisions = args.precisions.split(",")
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for precision in precisions:
                args.precision = precision
                for name, fn in (("diffcse", run_ours), ("sentence_transformers", run_st)):
                    out = fn(model, sentences, args, Path(tmp) / f"{name}-{precision}-{r}")
                    times = out["step_seconds"][args.warmup_steps :]
                    runs.setdefault(f"{name}/{precision}", []).extend(times)
                    print(f"round {r} {name} {precision}: median step {statistics.median(times):.3f}s", file=sys.stderr)
    # Padded length of a batch: almost every corpus sentence fills max_len, so use max_len.
    tokens = 2 * args.batch_size * args.max_len
    flops = encoder_train_flops(config, tokens, args.max_len)
    floor_s = flops / (gflops * 1e9)
    result = {
        "settings": {**vars(args), "model": model, "train_file": str(path)},
        "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "loadavg_end": os.getloadavg()},
        "matmul_gflops": gflops,
        "encoder_train_gflop_per_step": flops / 1e9,
        "flop_floor_step_s": floor_s,
    }
    result["runs"] = {}
    for name, times in runs.items():
        s = summarise(times, 0, args.batch_size)
        s["fraction_of_fp32_flop_floor"] = floor_s / s["median_step_s"]
        result["runs"][name] = s
    speed = {k: v["sentences_per_s"] for k, v in result["runs"].items()}
    result["speedup"] = {
        f"{p} vs {p}": speed[f"diffcse/{p}"] / speed[f"sentence_transformers/{p}"] for p in precisions
    }
    if {"fp32", "bf16"} <= set(precisions):
        # Our default precision is 'auto' (bf16 autocast where the hardware has bf16 units);
        # sentence-transformers trains in fp32 unless told otherwise.
        result["speedup"]["defaults: diffcse bf16 vs st fp32"] = (
            speed["diffcse/bf16"] / speed["sentence_transformers/fp32"]
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2))
    os.replace(tmp_out, out)
    print(json.dumps({k: result[k] for k in ("matmul_gflops", "flop_floor_step_s", "runs", "speedup")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
