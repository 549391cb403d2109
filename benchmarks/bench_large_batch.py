"""Large batches on small memory: gradient caching's peak RSS and time, and a 10^7-line corpus from disk.

    python -m benchmarks.bench_large_batch [--batches 64,512,4096,16384] [--uncached 64,512,1024]
        [--chunk 64] [--threads 2] [--corpus-lines 10000000] [--output results/bench_large_batch.json]

Memory/speed: unsupervised SimCSE on the packaged all-MiniLM-L6-v2 (max_len 32, fp32), each
setting in a fresh process (its peak RSS is its own): seconds per 1,000 training sentences of the
last measured step, peak RSS, with `--grad-cache-chunk` and without it where it fits in memory.
Corpus: a synthetic 10^7-line file trained a few steps with `--corpus-loading disk`; the RAM it
costs is the peak RSS of that run minus the same run on a 1,000-line file.
Quality at equal training sentences (batch 64, 512, 2,048; two seeds) is an experiment grid, run by
the experiment runner: `diffcse experiment configs/experiments/batch-size-minilm.yaml`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_probe, record_path, write_result

OUT = Path("results/bench_large_batch.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="64,512,4096,16384", help="batch sizes run with gradient caching")
    p.add_argument("--uncached", default="64,512,1024", help="batch sizes also run without caching (must fit in RAM)")
    p.add_argument("--chunk", type=int, default=64, help="--grad-cache-chunk (sentences per chunk)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-seq-length", type=int, default=32)
    p.add_argument("--corpus-lines", type=int, default=10_000_000, help="0 skips the large-corpus run")
    p.add_argument("--output", type=Path, default=OUT)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one measurement
    p.add_argument("--one-chunk", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--one-steps", type=int, default=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure_one(batch: int, chunk: int, steps: int, threads: int, max_len: int) -> dict:
    """In this process: `steps` optimiser steps at `batch`; step times and peak RSS (child side)."""
    from benchmarks.common import timed_training
    from diffcse.core.folder import default_model_path, load_tokenizer
    from diffcse.core.io import default_corpus, iter_lines
    from diffcse.core.runtime import set_threads
    from diffcse.training.config import load_config
    from diffcse.training.data import tokenize_columns
    from diffcse.training.trainer import build_model

    set_threads(threads)
    texts = []
    for line in iter_lines(default_corpus(), "corpus"):
        texts.append(line.text)
        if len(texts) == batch * steps:
            break
    model_path = default_model_path()
    tok = load_tokenizer(model_path)
    config = load_config(None, {
        "model": model_path, "objective": "simcse", "batch_size": batch, "max_steps": steps,
        "max_seq_length": max_len, "precision": "fp32", "do_eval": False, "learning_rate": 2e-5,
        "grad_cache_chunk": chunk or None, "distinct_batches": False, "threads": threads,
        "output_dir": tempfile.mkdtemp(prefix="bench-large-"),
    })
    dataset, _ = tokenize_columns(tok, [texts], max_len)
    model = build_model(config, model_path, tok)
    timer = timed_training(config, model, tok, dataset)
    return {
        "batch": batch, "chunk": chunk or None, "steps": steps, "step_seconds": [round(t, 2) for t in timer.times],
        "seconds_per_1000_sentences": round(1000 * timer.times[-1] / batch, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_child(args: argparse.Namespace, batch: int, chunk: int) -> dict:
    """One measurement in a fresh process; a run killed for memory is recorded as such."""
    steps = 1 if batch >= 8192 else 2 if batch >= 2048 else 3
    cmd = [sys.executable, "-m", "benchmarks.bench_large_batch", "--one", str(batch), "--one-chunk", str(chunk),
           "--one-steps", str(steps), "--threads", str(args.threads), "--max-seq-length", str(args.max_seq_length)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"batch": batch, "chunk": chunk or None, "failed": proc.returncode,
                "error": proc.stderr.strip().splitlines()[-1:] or [""], "seconds": round(time.perf_counter() - t0, 1)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"batch {batch:>6} chunk {chunk or '-':>4}: {result['seconds_per_1000_sentences']:8.2f} s/1000 sentences, "
          f"peak RSS {result['peak_rss_mb']:8.1f} MB", flush=True)
    return result


def corpus_run(lines: int, threads: int) -> dict:
    """RAM cost of training on a `lines`-line file from disk: peak RSS against the same run on 1,000 lines."""
    import random

    from diffcse.core.io import default_corpus, iter_lines

    words = [w for line in iter_lines(default_corpus(), "corpus") for w in line.text.split()][:200_000]
    rng = random.Random(0)
    out: dict = {"lines": lines}
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        for name, n in (("small", 1000), ("large", lines)):
            path = Path(tmp) / f"{name}.txt"
            t0 = time.perf_counter()
            with open(path, "w", encoding="utf-8") as fh:
                for _ in range(n):
                    fh.write(" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "\n")
            written = time.perf_counter() - t0
            cmd = [sys.executable, "-c", "import resource, sys; from diffcse.cli import main; rc = main(sys.argv[1:]); "
                   "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)",
                   "train", "--train-file", str(path), "--output-dir", str(Path(tmp) / f"run-{name}"),
                   "--corpus-loading", "disk", "--max-steps", "3", "--batch-size", "64", "--no-do-eval",
                   "--precision", "fp32", "--threads", str(threads), "--save-steps", "1000"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            peak = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK"))) / 1024
            out[name] = {"lines": n, "file_mb": round(path.stat().st_size / 2**20, 1), "write_seconds": round(written, 1),
                         "run_seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak, 1)}
            print(f"corpus {n:>10} lines: peak RSS {peak:8.1f} MB, {out[name]['run_seconds']} s", flush=True)
    out["ram_growth_mb"] = round(out["large"]["peak_rss_mb"] - out["small"]["peak_rss_mb"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and write the JSON."""
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.one is not None:
        print(json.dumps(measure_one(args.one, args.one_chunk, args.one_steps, args.threads, args.max_seq_length)))
        return 0
    result: dict = {
        "settings": {**{k: (record_path(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("one")},
                     "model": "all-MiniLM-L6-v2 (packaged)", "objective": "simcse", "precision": "fp32"},
        "machine": machine_probe(gflops=True),
        "memory": [],
    }
    for batch in [int(b) for b in args.uncached.split(",") if b]:
        result["memory"].append(run_child(args, batch, 0))
        write_result(args.output, result)
    for batch in [int(b) for b in args.batches.split(",") if b]:
        result["memory"].append(run_child(args, batch, args.chunk))
        write_result(args.output, result)
    if args.corpus_lines:
        result["corpus"] = corpus_run(args.corpus_lines, args.threads)
        write_result(args.output, result)
    result["machine"]["loadavg_end"] = machine_probe()["loadavg"]
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
