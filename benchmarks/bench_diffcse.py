"""DiffCSE against SimCSE as continued training of the packaged all-MiniLM-L6-v2, on one budget.

Runs, all with the same steps, batch, learning rate, seed, max_len, pooler and data:
  simcse               SimCSE, MLP head (training only)
  simcse-bn            SimCSE, DiffCSE's BatchNorm projection head
  diffcse-neighbours   DiffCSE, BN head, embedding-neighbours generator
  diffcse-random       DiffCSE, BN head, uniform random-token generator
  diffcse-neighbours-k2  (optional, --runs) the same with a 2-layer discriminator
  diffcse-neighbours-lambda1e-4  (optional) λ = 1e-4: on an already-tuned model InfoNCE is
                       saturated (~1e-5) and λ = 0.005 lets L_RTD dominate the update
For each, and for the untouched model: the 7 STS test sets (Spearman ×100; STS12-16 'all') on the
best-STS-B-dev checkpoint, the STS-B dev curve (PNG), and the training time per step. A separate,
interleaved timing phase (no evaluation, variants alternating to average out a busy machine) gives
the step-time ratio DiffCSE/SimCSE, including a reference-style DiffCSE (a masked-LM generator
computing logits at every position) against masked-only logits. The MLM there has random weights
(no MLM is available offline): it costs the same as a trained one, so only its timing is used.

    python -m benchmarks.bench_diffcse --steps 100 --batch-size 32 --lr 2e-5 --seed 42 \\
        --output results/bench_diffcse.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertForMaskedLM

from benchmarks.common import (
    diffcse_flop_floor,
    loadavg,
    machine_probe,
    matmul_gflops,
    record_path,
    record_settings,
    timed_training,
    write_result,
)
from diffcse.core.encoder import Encoder
from diffcse.core.folder import default_model_path
from diffcse.core.io import atomic_path, default_corpus
from diffcse.core.runtime import resolve_device, resolve_precision, set_threads
from diffcse.training.config import TrainConfig
from senteval_runner import STS_TASKS

RUNS: dict[str, dict] = {
    "simcse": {"objective": "simcse", "head": "mlp"},
    "simcse-bn": {"objective": "simcse", "head": "batchnorm"},
    "diffcse-neighbours": {"objective": "diffcse", "head": "batchnorm", "generator": "embedding-neighbours"},
    "diffcse-random": {"objective": "diffcse", "head": "batchnorm", "generator": "random"},
    "diffcse-neighbours-lambda1e-4": {
        "objective": "diffcse", "head": "batchnorm", "generator": "embedding-neighbours", "lambda_weight": 1e-4,
    },
    "diffcse-neighbours-k2": {
        "objective": "diffcse", "head": "batchnorm", "generator": "embedding-neighbours", "discriminator_layers": 2,
    },
}
# Settings that must match for runs to be compared (and for --reuse to add to a result).
BUDGET = ("model", "train_file", "steps", "batch_size", "lr", "seed", "max_len", "eval_steps", "pooler",
          "precision_resolved", "mask_ratio", "lambda_weight", "eval_max_len", "sts_tasks")
DEFAULT_RUNS = ["simcse", "simcse-bn", "diffcse-neighbours", "diffcse-random"]
TIMING = ["simcse", "diffcse-neighbours", "diffcse-neighbours-k2", "diffcse-mlm-masked-only", "diffcse-mlm-full-logits",
          "simcse-padded", "diffcse-neighbours-padded"]
RTD_KEYS = ("loss_contrast", "loss_rtd", "rtd_acc_replaced", "rtd_acc_kept", "replaced_fraction")


def eval_autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """Evaluate in the training precision: bf16 autocast where training runs in bf16, else nothing."""
    if resolve_precision(args.precision) == "bf16":
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_config(name: str, args: argparse.Namespace, model: str, train_file: str, out: Path, **extra: object) -> TrainConfig:
    """The TrainConfig of one run: the shared budget plus the run's own overrides."""
    values = dict(
        model=model, train_file=train_file, output_dir=str(out), batch_size=args.batch_size,
        learning_rate=args.lr, max_steps=args.steps, seed=args.seed, max_seq_length=args.max_len,
        eval_steps=args.eval_steps, save_steps=10**9, logging_steps=args.logging_steps, pooler=args.pooler,
        precision=args.precision, mask_ratio=args.mask_ratio, lambda_weight=args.lambda_weight,
        senteval_data=args.senteval_data, threads=args.threads,
    )
    values.update(RUNS.get(name, {}))
    values.update(extra)
    config = TrainConfig(**values)
    config.validate()
    return config


def sts_table(path: str | None, args: argparse.Namespace) -> dict:
    """The 7 STS test numbers (×100) of a model folder via senteval_runner, at a common max length."""
    from senteval_runner import evaluate

    encoder = Encoder.load(path, max_seq_length=args.eval_max_len)

    def encode(batch: list[str]):  # noqa: ANN202
        return encoder.encode(batch, batch_size=128)

    with eval_autocast(args):
        result = evaluate(encode, tasks=args.sts_tasks, mode="test", data_dir=args.senteval_data)
    return {"table": result["table"]["sts"], "seconds": result["timings"]["total_s"]}


def read_metrics(out: Path) -> list[dict]:
    """The trainer's metrics.jsonl records."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_run(name: str, args: argparse.Namespace, model: str, train_file: str) -> dict:
    """Train one run (or reuse a finished one with --reuse), then score its best checkpoint on STS."""
    from diffcse.training.trainer import train

    out = Path(args.runs_dir) / name
    summary_file = out / "summary.json"
    if args.reuse and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        print(f"[{name}] reusing {out}", file=sys.stderr, flush=True)
    else:
        if out.exists():
            for stale in ("metrics.jsonl", "summary.json", "best.json"):
                (out / stale).unlink(missing_ok=True)
        config = run_config(name, args, model, train_file, out)
        print(f"[{name}] training {args.steps} steps -> {out}", file=sys.stderr, flush=True)
        # The outer autocast only reaches the STS-B dev evaluations: the training step already
        # autocasts to the same dtype, and backward/optimizer ops are not autocast ops.
        with eval_autocast(args):
            summary = train(config)
    records = read_metrics(out)
    # train() evaluates once more after the last step; a step evaluated twice keeps one point.
    curve = sorted({r["step"]: r["eval_stsb_spearman"] for r in records if "eval_stsb_spearman" in r}.items())
    eval_seconds = sum(r.get("eval_seconds", 0.0) for r in records)
    logged = [r for r in records if "loss" in r]
    # Evaluation runs inside trainer.train(); take it out so the step time is training only.
    train_s = summary["train_seconds"] - eval_seconds
    tail = logged[-max(1, len(logged) // 5) :]  # the last fifth of training
    rtd = {k: statistics.fmean(r[k] for r in tail if k in r) for k in RTD_KEYS if any(k in r for r in tail)}
    best = json.loads((out / "best.json").read_text())
    print(f"[{name}] STS-B dev best {100 * best['stsb_dev_spearman']:.2f} at step {best['step']}; scoring STS",
          file=sys.stderr, flush=True)
    sts = sts_table(str(out), args)
    return {
        "config": RUNS[name],
        "sts_test": sts["table"],
        "stsb_dev_before": summary["stsb_dev_spearman_before"],
        "stsb_dev_best": best["stsb_dev_spearman"],
        "stsb_dev_best_step": best["step"],
        "stsb_dev_final": summary["stsb_dev_spearman_final"],
        "stsb_dev_curve": curve,
        "train_seconds_without_eval": train_s,
        "seconds_per_step": train_s / max(summary["steps"], 1),
        "last_fifth_means": rtd,
        "output_dir": f"{record_path(args.runs_dir)}/{name}",
    }


def make_random_mlm(model: str, folder: Path, layers: int) -> str:
    """A random-weight BertForMaskedLM with the encoder's width and vocabulary (a DistilBERT stand-in, timing only)."""
    base = AutoConfig.from_pretrained(model)
    config = BertConfig(
        vocab_size=base.vocab_size, hidden_size=base.hidden_size, num_hidden_layers=layers,
        num_attention_heads=base.num_attention_heads, intermediate_size=base.intermediate_size,
        max_position_embeddings=base.max_position_embeddings,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)
    return str(folder)


def timing_phase(args: argparse.Namespace, model: str, sentences_file: str, tmp: Path) -> dict:
    """Median step time of each variant, variants alternating over rounds; no evaluation, no saving."""
    from diffcse.training.data import read_sentences, tokenize_columns
    from diffcse.training.trainer import build_model

    tokenizer = AutoTokenizer.from_pretrained(model)
    needed = args.batch_size * (args.timing_steps + 1)
    sentences = read_sentences(sentences_file).sentences[:needed]
    dataset, _ = tokenize_columns(tokenizer, [sentences], args.max_len)
    mlm = make_random_mlm(model, tmp / "random-mlm", layers=max(1, AutoConfig.from_pretrained(model).num_hidden_layers // 2))
    variants: dict[str, object] = {}
    for name in TIMING:
        extra: dict = {"do_eval": False, "max_steps": args.timing_steps}
        base = name
        if name.endswith("-padded"):
            # The same step without packing (every forward padded), to show what packing buys.
            base, extra["packing"] = name.removesuffix("-padded"), False
        if name.startswith("diffcse-mlm"):
            base, extra["generator"] = "diffcse-neighbours", f"mlm:{mlm}"
        if name == "diffcse-mlm-full-logits":
            # The reference's computation: the MLM's logits and argmax at every position.
            extra["generator_positions"] = "all"
        config = run_config(base, args, model, sentences_file, tmp / name, **extra)
        variants[name] = (config, build_model(config, model, tokenizer))
    times: dict[str, list[float]] = {name: [] for name in TIMING}
    cpu: dict[str, list[float]] = {name: [] for name in TIMING}
    device = resolve_device(None)  # where train() runs the quality runs
    for r in range(args.timing_rounds):
        for name, (config, built) in variants.items():
            timer = timed_training(config, built, tokenizer, dataset, device)
            kept = timer.times[args.timing_warmup :]
            times[name].extend(kept)
            cpu[name].extend(timer.cpu[args.timing_warmup :])
            print(f"timing round {r} {name}: median {statistics.median(kept):.3f}s/step", file=sys.stderr, flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu.items()}
    return {
        "median_step_s": medians,
        "ratio_to_simcse": {name: m / medians["simcse"] for name, m in medians.items()},
        "median_step_cpu_s": cpu_medians,
        "cpu_ratio_to_simcse": {name: m / cpu_medians["simcse"] for name, m in cpu_medians.items()},
        "steps_timed_per_variant": {name: len(t) for name, t in times.items()},
        "mlm_generator": f"random-weight BertForMaskedLM, {AutoConfig.from_pretrained(mlm).num_hidden_layers} layers, "
                         "encoder width and vocabulary (timing only)",
        "flop_floor": diffcse_flop_floor(AutoConfig.from_pretrained(model), AutoConfig.from_pretrained(mlm),
                                         [len(x) for x in dataset.columns[0]], args.batch_size, args.mask_ratio),
        "precision": resolve_precision(args.precision),
        "threads": torch.get_num_threads(),
        "matmul_gflops": round(matmul_gflops(), 1),
    }


def plot_curves(runs: dict, baseline: float | None, path: Path) -> None:
    """STS-B dev Spearman against step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run in runs.items():
        steps, values = zip(*run["stsb_dev_curve"], strict=True)
        ax.plot(steps, [100 * v for v in values], marker="o", markersize=3, label=name)
    if baseline is not None:
        ax.axhline(100 * baseline, color="grey", linestyle="--", linewidth=1, label="untouched")
    ax.set_xlabel("training step")
    ax.set_ylabel("STS-B dev Spearman ×100")
    ax.set_title("all-MiniLM-L6-v2, continued training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the experiment and write the JSON and the plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="start model (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--train-file", default=None, help="sentences (default: $DIFFCSE_DATA_DIR corpus)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--pooler", default="auto", help="auto = MiniLM's own mean pooling; the same for every run")
    p.add_argument("--precision", default="auto")
    p.add_argument("--mask-ratio", type=float, default=0.30)
    p.add_argument("--lambda-weight", type=float, default=0.005)
    p.add_argument("--eval-max-len", type=int, default=128, help="max_seq_length for the STS test encodings")
    p.add_argument("--sts-tasks", nargs="+", default=list(STS_TASKS), help="a subset only for smoke runs")
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    p.add_argument("--timing-steps", type=int, default=5)
    p.add_argument("--timing-warmup", type=int, default=1)
    p.add_argument("--timing-rounds", type=int, default=2)
    p.add_argument("--no-timing", dest="timing", action="store_false")
    p.add_argument("--timing-only", action="store_true",
                   help="keep the runs of an existing --output and only re-measure step times (earlier ones kept in timing_history)")
    p.add_argument("--reuse", action="store_true",
                   help="add to an existing --output made on the same budget: skip runs it has, reuse trained run dirs")
    p.add_argument("--senteval-data", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a machine shared with other jobs 1 is faster than 2 (OpenMP "
                        "threads spin-wait for descheduled siblings)")
    p.add_argument("--runs-dir", default="runs/bench_diffcse")
    p.add_argument("--output", default="results/bench_diffcse.json")
    p.add_argument("--plot", default="results/bench_diffcse_stsb_dev.png")
    args = p.parse_args(argv)
    set_threads(args.threads)
    model = args.model or default_model_path()
    train_file = args.train_file or str(default_corpus())
    output = Path(args.output)
    started = time.time()
    # Settings as results record them: models and files by name, never this machine's absolute paths.
    settings = record_settings(
        {**vars(args), "model": model, "train_file": train_file, "precision_resolved": resolve_precision(args.precision)},
        models=("model",), paths=("train_file", "senteval_data", "runs_dir", "output", "plot"),
    )
    result: dict = {"settings": settings, "machine": {}, "runs": {}}
    if args.timing_only:
        if not output.exists():
            raise SystemExit(f"--timing-only: {output} does not exist; run the experiment first")
        result = json.loads(output.read_text())
        if "timing" in result:
            old = result.pop("timing") | {"settings": {k: result["settings"].get(k) for k in ("threads", "batch_size", "max_len")}}
            result.setdefault("timing_history", []).append(old)
        with tempfile.TemporaryDirectory() as tmp:
            result["timing"] = timing_phase(args, model, train_file, Path(tmp))
        result["timing"]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        result["timing"]["loadavg_end"] = loadavg()
        write_result(output, result)
        print(json.dumps(result["timing"]["ratio_to_simcse"], indent=1), file=sys.stderr)
        return 0
    if args.reuse and output.exists():
        # Add runs to an earlier result, but only ones trained on the very same budget.
        result = json.loads(output.read_text())
        for key in BUDGET:
            if result["settings"].get(key) != settings[key]:
                raise SystemExit(f"--reuse: {output} was made with {key}={result['settings'].get(key)!r}, not {settings[key]!r}")
        result["settings"]["runs"] = list(dict.fromkeys([*result["settings"]["runs"], *args.runs]))
        result.setdefault("wall_seconds_earlier", []).append(result.pop("wall_seconds", None))
    result["machine"] = machine_probe()
    if "untouched" not in result:
        print("[untouched] scoring STS", file=sys.stderr, flush=True)
        result["untouched"] = {"sts_test": sts_table(model, args)["table"]}
        write_result(output, result)
    for name in args.runs:
        if name in result["runs"] and args.reuse:
            continue
        result["runs"][name] = train_run(name, args, model, train_file)
        result["untouched"].setdefault("stsb_dev", result["runs"][name]["stsb_dev_before"])
        write_result(output, result)
    plot_curves(result["runs"], result["untouched"].get("stsb_dev"), Path(args.plot))
    if args.timing:
        with tempfile.TemporaryDirectory() as tmp:
            result["timing"] = timing_phase(args, model, train_file, Path(tmp))
    result["machine"]["loadavg_end"] = loadavg()
    result["wall_seconds"] = time.time() - started
    write_result(output, result)
    print(json.dumps({n: {"sts": r["sts_test"], "dev_best": r["stsb_dev_best"]} for n, r in result["runs"].items()},
                     indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
