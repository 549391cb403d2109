"""The papers' setting in miniature: SimCSE vs DiffCSE from an MLM-pretrained start with a smaller MLM generator.

    python -m benchmarks.bench_mini_paper [--mlm-steps 300] [--steps 100] [--batch-size 32] [--seeds 3]

The papers start from an MLM-pretrained encoder (BERT-base) and use a smaller MLM (DistilBERT) as
DiffCSE's generator. No such weights can be installed here, so they are made:
1. `diffcse train --objective mlm` adapts the packaged all-MiniLM-L6-v2 to the corpus (batch 64,
   lr 5e-5, a fresh MLM head tied to the word embeddings) until its sentence-tuning is largely
   gone, so the contrastive task is no longer saturated; its STS table is recorded;
2. a 3-layer copy of it becomes the generator (as DistilBERT is to BERT);
3. SimCSE and DiffCSE (the paper's recipe: BatchNorm head, mask 0.30, λ 0.005, the generator's
   argmax at every position, L_RTD over padding) train from that start at one equal budget,
   [CLS] pooling (before the pooler layer; the head in training only), `--seeds` seeds each,
   through `diffcse experiment`, whose report (mean ± std, paired difference with a 95%
   interval) is copied to results/experiments/diffcse-mini-paper/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from benchmarks.common import machine_probe, write_result

RUNS = Path("runs/mini-paper")
RESULTS = Path("results/experiments/diffcse-mini-paper")
STS = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mlm-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=100, help="SimCSE/DiffCSE steps per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-5, help="one learning rate for both objectives (equal budget)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--generator-layers", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs-dir", type=Path, default=RUNS)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    return p.parse_args(argv)


def sts_table(model: Path, pooler: str) -> dict[str, float]:
    """The STS suite (test) of a model folder with a pooler."""
    from diffcse.evaluation.adapter import FolderEncoder
    from senteval_runner import evaluate

    return evaluate(FolderEncoder(str(model), pooler=pooler), tasks=STS, mode="test")["table"]["sts"]


def main(argv: list[str] | None = None) -> int:
    """Adapt, cut the generator, run the grid, copy the report."""
    args = parse_args(argv)
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from diffcse.core.io import read_json
    from diffcse.core.runtime import set_threads
    from diffcse.experiments.grid import execute, load_grid
    from diffcse.experiments.report import write_experiment_report
    from diffcse.training.config import load_config
    from diffcse.training.trainer import train

    set_threads(args.threads)
    runs, results = args.runs_dir, args.results_dir
    start, generator = runs / "mlm-start", runs / f"generator-{args.generator_layers}l"
    summary = read_json(start / "summary.json")
    if not summary or summary.get("status") != "finished":
        summary = train(load_config(None, {
            "objective": "mlm", "batch_size": 64, "learning_rate": 5e-5, "max_steps": args.mlm_steps,
            "eval_steps": 100, "save_steps": 100, "output_dir": str(start), "threads": args.threads,
        }))
    tables_file = runs / "start_sts.json"
    tables = read_json(tables_file) or {}
    if not tables:
        tables = {"untouched all-MiniLM-L6-v2, mean": sts_table(Path(_packaged()), "avg"),
                  "MLM-adapted start, mean": sts_table(start, "avg"),
                  "MLM-adapted start, [CLS]": sts_table(start, "cls_before_pooler")}
        write_result(tables_file, tables)
    if not (generator / "config.json").is_file():
        cut = AutoModelForMaskedLM.from_pretrained(start, num_hidden_layers=args.generator_layers)
        cut.save_pretrained(generator)
        AutoTokenizer.from_pretrained(start).save_pretrained(generator)
    grid_file = runs / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base": {"model": str(start), "pooler": "cls_before_pooler", "batch_size": args.batch_size, "max_steps": args.steps,
                 "learning_rate": args.lr, "max_seq_length": 32, "eval_steps": 50, "save_steps": 100,
                 "precision": "auto", "threads": args.threads},
        "variants": {
            "simcse": {"objective": "simcse", "head": "mlp"},
            "diffcse": {"objective": "diffcse", "head": "batchnorm", "generator": f"mlm:{generator}",
                        "mask_ratio": 0.30, "lambda_weight": 0.005, "generator_positions": "all",
                        "rtd_count_padding": True},
        },
        "baseline": "simcse", "seeds": args.seeds, "tasks": STS, "mode": "test",
        "output_dir": str(runs / "grid"),
    }, sort_keys=False))
    grid = load_grid(grid_file)
    execute(grid)
    paths = write_experiment_report(grid)
    results.mkdir(parents=True, exist_ok=True)
    for path in paths.values():
        shutil.copy(path, results / Path(path).name)
    shutil.copy(tables_file, results / tables_file.name)
    write_result(results / "bench.json", {
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "model": "all-MiniLM-L6-v2 (packaged)", "mlm_objective": {
            "batch_size": 64, "learning_rate": 5e-5, "steps": summary.get("steps"),
            "stsb_dev_before": summary.get("stsb_dev_spearman_before"),
            "stsb_dev_after": summary.get("stsb_dev_spearman_final")}},
        "start_sts": tables,
        "machine": machine_probe(gflops=True),
    })
    return 0


def _packaged() -> str:
    from diffcse.core.folder import default_model_path

    return default_model_path()


if __name__ == "__main__":
    sys.exit(main())
