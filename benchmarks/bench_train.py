"""Training throughput: our unsupervised SimCSE against sentence-transformers' SimCSE recipe.

Both run on the same model, sentences, batch, max_len, steps and seed, in one process, one after
the other (twice, alternating, to average out drift on a shared machine). sentence-transformers'
recipe is MultipleNegativesRankingLoss (scale 20 = 1/τ with τ = 0.05) on (s, s) pairs through
SentenceTransformerTrainer. Ours runs twice: as shipped (packing on: the batch's real tokens in one
row, no FLOPs spent on padding; dropout masks from diffcse.core.dropout) and with both off (padded,
torch's dropout, like sentence-transformers), so the report separates what those buy from the rest. We also measure this CPU's matmul GFLOP/s
and report each step time against the encoder's FLOP floor (forward + backward ≈ 3× the forward
FLOPs), both over the padded batch and over its real tokens only.

    python -m benchmarks.bench_train --steps 30 --output results/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from transformers import AutoConfig

from benchmarks.common import (
    encoder_train_flops,
    loadavg,
    machine_probe,
    matmul_gflops,
    record_settings,
    step_timer,
    timed_training,
    write_result,
)
from diffcse.core.folder import default_model_path
from diffcse.core.io import default_corpus
from diffcse.core.runtime import set_threads
from diffcse.training.config import TrainConfig
from diffcse.training.data import read_sentences


def run_ours(
    model: str, sentences: list[str], args: argparse.Namespace, workdir: Path, packing: bool = True,
    fast_dropout: bool = True,
) -> dict:
    """Time our unsupervised SimCSE loop (one 2N forward per step)."""
    from transformers import AutoTokenizer

    from diffcse.training.data import tokenize_columns
    from diffcse.training.trainer import build_model

    config = TrainConfig(
        model=model, output_dir=str(workdir), batch_size=args.batch_size, max_seq_length=args.max_len,
        max_steps=args.steps, learning_rate=3e-5, do_eval=False, save_steps=10**9, logging_steps=10**9,
        seed=args.seed, precision=args.precision, pooler="avg", head="mlp", packing=packing,
        fast_dropout=fast_dropout, threads=args.threads,
    )
    config.validate()
    tokenizer = AutoTokenizer.from_pretrained(model)
    dataset, _ = tokenize_columns(tokenizer, [sentences], args.max_len)
    # On the CPU, like sentence-transformers' run below (use_cpu=True).
    timer = timed_training(config, build_model(config, model, tokenizer), tokenizer, dataset, device="cpu")
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
    timer = step_timer()
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


def batch_tokens(model: str, sentences: list[str], batch: int, max_len: int, steps: int) -> tuple[float, float]:
    """Mean real and padded tokens per step (both views) over the batches the runs see."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    real = padded = 0
    for i in range(steps):
        lengths = [len(x) for x in tok(sentences[i * batch : (i + 1) * batch], truncation=True, max_length=max_len)["input_ids"]]
        real += 2 * sum(lengths)
        padded += 2 * len(lengths) * max(lengths)
    return real / steps, padded / steps


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
    set_threads(args.threads)
    model = args.model or default_model_path()
    path = Path(args.train_file) if args.train_file else default_corpus()
    needed = args.batch_size * (args.steps + 1)
    sentences = read_sentences(path).sentences[:needed]
    machine = machine_probe()
    gflops = matmul_gflops()
    config = AutoConfig.from_pretrained(model)
    precisions = args.precisions.split(",")
    runs: dict[str, list[float]] = {}
    per_round: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for precision in precisions:
                args.precision = precision
                variants = (
                    ("diffcse", run_ours),
                    ("diffcse_padded", lambda *a: run_ours(*a, packing=False, fast_dropout=False)),
                    ("sentence_transformers", run_st),
                )
                for name, fn in variants:
                    out = fn(model, sentences, args, Path(tmp) / f"{name}-{precision}-{r}")
                    times = out["step_seconds"][args.warmup_steps :]
                    runs.setdefault(f"{name}/{precision}", []).extend(times)
                    per_round.setdefault(f"{name}/{precision}", []).append(statistics.median(times))
                    print(f"round {r} {name} {precision}: median step {statistics.median(times):.3f}s", file=sys.stderr)
    real_tokens, padded_tokens = batch_tokens(model, sentences, args.batch_size, args.max_len, args.steps)
    flops = encoder_train_flops(config, padded_tokens, args.max_len)
    floor_s = flops / (gflops * 1e9)
    real_floor_s = encoder_train_flops(config, real_tokens, args.max_len) / (gflops * 1e9)
    result = {
        "settings": record_settings({**vars(args), "model": model, "train_file": path},
                                    models=("model",), paths=("train_file", "output")),
        "machine": machine | {"loadavg_end": loadavg()},
        "matmul_gflops": gflops,
        "tokens_per_step": {"real": real_tokens, "padded": padded_tokens, "real_fraction": real_tokens / padded_tokens},
        "encoder_train_gflop_per_step": flops / 1e9,
        "flop_floor_step_s": floor_s,
        "flop_floor_real_tokens_step_s": real_floor_s,
    }
    result["runs"] = {}
    for name, times in runs.items():
        s = summarise(times, 0, args.batch_size)
        s["fraction_of_fp32_flop_floor"] = floor_s / s["median_step_s"]
        s["fraction_of_fp32_real_token_floor"] = real_floor_s / s["median_step_s"]
        result["runs"][name] = s
    speed = {k: v["sentences_per_s"] for k, v in result["runs"].items()}
    result["speedup"] = {}
    for p in precisions:
        result["speedup"][f"{p} vs {p}"] = speed[f"diffcse/{p}"] / speed[f"sentence_transformers/{p}"]
        result["speedup"][f"{p} vs {p}, packing and fast dropout off"] = speed[f"diffcse_padded/{p}"] / speed[f"sentence_transformers/{p}"]
    # The machine's speed drifts between runs; each round's own ratio shows how much.
    result["speedup_per_round"] = {
        f"{p} vs {p}": [st / ours for ours, st in zip(per_round[f"diffcse/{p}"], per_round[f"sentence_transformers/{p}"], strict=True)]
        for p in precisions
    }
    if {"fp32", "bf16"} <= set(precisions):
        # Our default precision is 'auto' (bf16 autocast where the hardware has bf16 units);
        # sentence-transformers trains in fp32 unless told otherwise.
        result["speedup"]["defaults: diffcse bf16 vs st fp32"] = (
            speed["diffcse/bf16"] / speed["sentence_transformers/fp32"]
        )
    write_result(args.output, result)
    print(json.dumps({k: result[k] for k in ("matmul_gflops", "flop_floor_step_s", "tokens_per_step", "runs", "speedup", "speedup_per_round")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
