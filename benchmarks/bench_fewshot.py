"""Few-shot fine-tuning benchmark: CCE against CCE + DML losses on SentEval transfer tasks.

For every task, seed and shot size the same episode (training sample and test set) and the same
head initialisation are used for every loss, so "Δ vs CCE" is a paired difference. Budget choices
(all flags; defaults sized for ~35 minutes on 2 busy CPU cores):
- the packaged all-MiniLM-L6-v2 (mean pooling), max_seq_length 64;
- only the top transformer layer is fine-tuned (--train-layers 1); the 5 frozen layers run once
  per sentence and are cached, which is what makes 250 fine-tuning runs affordable;
- 10 epochs of batch 16 (pairs for MRPC) over the k-shot set, clamped to 20..30 optimiser steps;
  head lr 5e-2 (the head starts from scratch and must converge in that many steps);
- test sets capped at 400 examples (stratified, per seed); CV tasks hold out a stratified 20%.

Writes results/bench_fewshot.json after every run (atomically; --resume skips finished runs)
and results/bench_fewshot.md (the table) at the end.

    python -m benchmarks.bench_fewshot --out results/bench_fewshot.json
    python -m benchmarks.bench_fewshot --out results/bench_fewshot.json --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from diffcse.core.runtime import quiet_openmp

# Idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads cost a lot.
quiet_openmp()

import numpy as np  # noqa: E402

from benchmarks.common import machine_probe, record_model, write_result  # noqa: E402
from diffcse.core.io import write_text_atomic  # noqa: E402
from senteval_runner import TRANSFER_TASKS  # noqa: E402

# What the papers report (RoBERTa-large, few-shot SentEval transfer tasks), in accuracy points.
CLAIMS = {
    "cce+proxyanchor": {
        "paper": "Sosnowski et al. 2022, Revisiting Distance Metric Learning for Few-Shot Natural Language Classification (arXiv:2211.15202)",
        "claim": "CCE+ProxyAnchor beats CCE by 3.27 pts on average, up to 10.38",
        "avg": 3.27, "max": 10.38,
    },
    "cce+softtriple": {
        "paper": "Sosnowski et al. 2022, Distance Metric Learning Loss Functions in Few-Shot Scenarios of Supervised Language Models Fine-Tuning (arXiv:2211.15195)",
        "claim": "SoftTriple beats CCE by 2.89 pts on average (0.04 to 13.48)",
        "avg": 2.89, "min": 0.04, "max": 13.48,
    },
    "tripleentropy": {
        "paper": "Sosnowski et al. 2021, Applying SoftTriple Loss for Supervised Language Model Fine Tuning (arXiv:2112.08462)",
        "claim": "TripleEntropy (0.4 CCE + 0.6 SoftTriple) beats CCE by 0.02 to 2.29 pts, more on smaller training sets",
        "min": 0.02, "max": 2.29,
    },
    "cce+supcon": {
        "paper": "studied in arXiv:2211.15202 and 2112.08462",
        "claim": "no headline number",
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--tasks", nargs="+", default=["MR", "CR", "SUBJ", "TREC", "MRPC"])
    p.add_argument("--shots", nargs="+", type=int, default=[8, 32])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0,
                   help="run seeds first..seeds-1 only (to split a task's seeds between processes; see --merge)")
    p.add_argument("--losses", nargs="+", default=["cce", "cce+proxyanchor", "cce+softtriple", "tripleentropy", "cce+supcon"],
                   help="loss specs, e.g. cce+scal cce+clld cce+moscl cce+ensemble jcc (docs/finetune.md)")
    p.add_argument("--loss-param", action="append", default=[], metavar="TERM.ARG=V",
                   help="argument of a term for every loss in the grid that has the term, e.g. scal.epsilon=0.5, "
                        "moscl.method=linear (repeatable)")
    p.add_argument("--train-layers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10, help="epochs over the k-shot set, clamped to --min/--max-steps")
    p.add_argument("--min-steps", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=5e-2)
    p.add_argument("--proxy-lr", type=float, default=1e-1)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--max-test", type=int, default=400)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a contended 2-core box)")
    p.add_argument("--senteval-data", default=None)
    p.add_argument("--out", default="results/bench_fewshot.json")
    p.add_argument("--resume", action="store_true", help="keep finished runs from --out and do the rest")
    p.add_argument("--report-only", action="store_true", help="recompute the summary and table from --out's runs")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="add the runs of these result files (same settings, e.g. tasks run by another process) "
                        "to --out, then rewrite its summary and table")
    return p.parse_args(argv)


# Meta keys that must agree for two result files to be one grid.
GRID_SETTINGS = (
    "model_name", "pooler", "shots", "seeds", "losses", "train_layers", "epochs", "min_steps", "max_steps",
    "batch_size", "lr", "head_lr", "proxy_lr", "max_seq_length", "max_test", "test_fraction", "loss_specs",
)


def read_report(path: Path) -> dict:
    """A result file of this benchmark; a clear error naming the file when it is missing or not one."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--merge: cannot read {path}: {err}") from None
    if not isinstance(report, dict) or not {"meta", "runs"} <= report.keys():
        raise SystemExit(f"--merge: {path} is not a bench_fewshot result (no 'meta' and 'runs')")
    return report


def run_key(run: dict) -> tuple:
    """What identifies one fine-tuning run in a grid."""
    return run["task"], run["shots"], run["loss"], run["seed"]


def merge_reports(base: dict, parts: list[tuple[str, dict]]) -> dict:
    """One report from results of the same grid that separate processes wrote (e.g. different tasks).

    Settings must agree; a run present twice must have the same accuracy. Wall time is summed over
    the parts (they may have run side by side), and their number is recorded.
    """
    meta = dict(base["meta"])
    runs = {run_key(r): r for r in base["runs"]}
    for name, part in parts:
        other = part["meta"]
        differ = [k for k in GRID_SETTINGS if meta.get(k) != other.get(k)]
        if differ:
            raise SystemExit(f"--merge {name}: settings differ from the other results in {', '.join(differ)}")
        for r in part["runs"]:
            old = runs.setdefault(run_key(r), r)
            if old["accuracy_classifier"] != r["accuracy_classifier"]:
                raise SystemExit(f"--merge {name}: run {run_key(r)} is already there with another accuracy")
        meta["tasks"] = list(dict.fromkeys([*meta["tasks"], *other["tasks"]]))
        meta["protocol"] = {**meta["protocol"], **other["protocol"]}
        meta["wall_seconds"] = meta.get("wall_seconds", 0.0) + other.get("wall_seconds", 0.0)
        meta["processes"] = meta.get("processes", 1) + other.get("processes", 1)
    # SentEval's order of the transfer tasks, as the papers' tables list them.
    canon = {t: i for i, t in enumerate(TRANSFER_TASKS)}
    meta["tasks"] = sorted(meta["tasks"], key=lambda t: canon.get(t, len(canon)))
    order = {t: i for i, t in enumerate(meta["tasks"])}
    merged = sorted(runs.values(), key=lambda r: (order.get(r["task"], len(order)), r["seed"], r["shots"]))
    rows = summarize(merged, meta["losses"])
    # Complete when every run of the grid is there, whichever process (or --first-seed split) ran it.
    grid = {(t, k, loss, s) for t in meta["tasks"] for k in meta["shots"] for loss in meta["losses"]
            for s in range(meta["seeds"])}
    complete = grid <= set(runs)
    return {"meta": meta, "summary": rows, "claims": verdicts(rows, merged), "runs": merged, "complete": complete}


def summarize(runs: list[dict], losses: list[str]) -> list[dict]:
    """Per (task, shots, loss): mean ± std over seeds, and the paired difference to CCE."""
    rows = []
    keys = sorted({(r["task"], r["shots"]) for r in runs}, key=lambda k: (k[0], k[1]))
    for task, shots in keys:
        cell = [r for r in runs if r["task"] == task and r["shots"] == shots]
        base = {r["seed"]: r["accuracy_classifier"] for r in cell if r["loss"] == "cce"}
        for loss in losses:
            rs = sorted((r for r in cell if r["loss"] == loss), key=lambda r: r["seed"])
            if not rs:
                continue
            acc = 100 * np.array([r["accuracy_classifier"] for r in rs])
            row = {
                "task": task, "shots": shots, "loss": loss, "n_seeds": len(rs),
                "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            }
            paired = [100 * (r["accuracy_classifier"] - base[r["seed"]]) for r in rs if r["seed"] in base]
            if loss != "cce" and paired:
                d = np.array(paired)
                row["delta_vs_cce"] = float(d.mean())
                row["delta_std"] = float(d.std(ddof=1)) if len(d) > 1 else 0.0
            prox = [r["accuracy_proxy"] for r in rs if r["accuracy_proxy"] is not None]
            if prox:
                p = 100 * np.array(prox)
                row["proxy_mean"] = float(p.mean())
                row["proxy_std"] = float(p.std(ddof=1)) if len(p) > 1 else 0.0
            rows.append(row)
    return rows


def paired_deltas(runs: list[dict], loss: str) -> np.ndarray:
    """Accuracy differences (points) to CCE on the same (task, shots, seed) episode, for every episode."""
    base = {(r["task"], r["shots"], r["seed"]): r["accuracy_classifier"] for r in runs if r["loss"] == "cce"}
    return np.array([
        100 * (r["accuracy_classifier"] - base[(r["task"], r["shots"], r["seed"])])
        for r in runs if r["loss"] == loss and (r["task"], r["shots"], r["seed"]) in base
    ])


def verdicts(rows: list[dict], runs: list[dict]) -> dict:
    """Average / min / max Δ vs CCE per loss over all (task, shots) cells, beside the claims.

    Also pools every paired episode: mean Δ, its standard error and a two-sided one-sample
    t-test p-value (uncorrected for the four comparisons).
    """
    from scipy import stats

    out = {}
    others = [loss for loss in dict.fromkeys(r["loss"] for r in rows) if loss != "cce"]
    for loss in [*CLAIMS, *(loss for loss in others if loss not in CLAIMS)]:
        claim = CLAIMS.get(loss, {"paper": "", "claim": "—"})
        ds = [r["delta_vs_cce"] for r in rows if r["loss"] == loss and "delta_vs_cce" in r]
        if not ds:
            continue
        by_shots: dict[int, list[float]] = {}
        for r in rows:
            if r["loss"] == loss and "delta_vs_cce" in r:
                by_shots.setdefault(r["shots"], []).append(r["delta_vs_cce"])
        out[loss] = {
            **claim,
            "ours_avg": float(np.mean(ds)), "ours_min": float(np.min(ds)), "ours_max": float(np.max(ds)),
            "ours_avg_by_shots": {str(k): float(np.mean(v)) for k, v in sorted(by_shots.items())},
            "cells_better": int(sum(d > 0 for d in ds)), "cells": len(ds),
        }
        d = paired_deltas(runs, loss)
        if len(d) > 1:
            out[loss].update({
                "episodes": len(d), "episode_mean": float(d.mean()),
                "episode_se": float(d.std(ddof=1) / np.sqrt(len(d))),
                "episode_ci95": list(t_interval(d)),
                "episode_p": float(stats.ttest_1samp(d, 0.0).pvalue),
                "episodes_better": int((d > 0).sum()), "episodes_worse": int((d < 0).sum()),
            })
    return out


def t_interval(d: np.ndarray) -> tuple[float, float]:
    """Two-sided 95% Student-t interval of the mean of paired differences (the experiment runner's statistics)."""
    from diffcse.experiments.stats import paired_difference

    res = paired_difference(dict(enumerate(d.tolist())), dict.fromkeys(range(len(d)), 0.0))
    return res["ci_low"], res["ci_high"]


def pivot(report: dict, shots: int) -> list[str]:
    """Δ vs CCE per loss (rows) and task (columns) at one shot size, and pooled over the tasks' episodes."""
    rows = [r for r in report["summary"] if r["shots"] == shots]
    tasks = [t for t in report["meta"]["tasks"] if any(r["task"] == t for r in rows)]
    runs = [r for r in report["runs"] if r["shots"] == shots]
    cell = {(r["task"], r["loss"]): r for r in rows}
    lines = [f"| {shots}-shot | " + " | ".join(tasks) + " | all tasks: Δ [95% interval] |",
             "|---|" + "---|" * (len(tasks) + 1)]
    base = [cell[(t, "cce")] for t in tasks if (t, "cce") in cell]
    lines.append("| CCE (accuracy) | " + " | ".join(f"{r['mean']:.1f}" for r in base) + " | |")
    for loss in report["meta"]["losses"]:
        if loss == "cce":
            continue
        out = []
        for t in tasks:
            r = cell.get((t, loss))
            if r is None or "delta_vs_cce" not in r:
                out.append("")
                continue
            text = f"{r['delta_vs_cce']:+.1f}"
            seeds = paired_deltas([x for x in runs if x["task"] == t], loss)
            if len(seeds) > 1:
                lo, hi = t_interval(seeds)
                text = f"**{text}**" if lo > 0 or hi < 0 else text
            out.append(text)
        d = paired_deltas(runs, loss)
        pooled = "{:+.2f} [{:+.2f}, {:+.2f}]".format(d.mean(), *t_interval(d)) if len(d) > 1 else ""
        lines.append(f"| {loss} | " + " | ".join(out) + f" | {pooled} |")
    return lines


def markdown(report: dict) -> str:
    """The results table (and the claims table) as markdown."""
    m = report["meta"]
    # Older reports (fixed step count) carry no epochs/min_steps.
    schedule = (f"{m['epochs']} epochs clamped to {m['min_steps']}..{m['max_steps']} steps" if "epochs" in m
                else f"{m['max_steps']} steps")
    lines = [
        "# Few-shot fine-tuning: CCE vs CCE + DML losses",
        "",
        f"Model: {m['model_name']}, top {m['train_layers']} layer(s) fine-tuned, {schedule} × batch {m['batch_size']}, lr {m['lr']:g} / head {m['head_lr']:g} / proxies {m['proxy_lr']:g}, max_len "
        f"{m['max_seq_length']}, test ≤ {m['max_test']} per seed, {m['seeds']} seeds; "
        f"wall {m.get('wall_seconds', 0) / 60:.1f} min on {m['cpu']}"
        + (f" (summed over {m['processes']} processes that ran side by side, one thread each)."
           if m.get("processes", 1) > 1 else "."),
        "",
        "Δ accuracy (points) vs CCE by task, the paired mean over seeds; **bold**: its 95% t interval over "
        "seeds excludes 0. Last column: every episode of that shot size pooled, with its 95% t interval.",
        "",
    ]
    for shots in m["shots"]:
        lines += [*pivot(report, shots), ""]
    lines += [
        "Accuracy (%) through the classifier head, mean ± std over seeds (ddof=1); Δ = paired mean difference "
        "to CCE on the same episodes (± its std). Proxy = nearest-proxy inference with the same model.",
        "",
        "| task | shots | loss | accuracy | Δ vs CCE | proxy inference |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        delta = f"{r['delta_vs_cce']:+.2f} ± {r['delta_std']:.2f}" if "delta_vs_cce" in r else "—"
        proxy = f"{r['proxy_mean']:.2f} ± {r['proxy_std']:.2f}" if "proxy_mean" in r else "—"
        lines.append(f"| {r['task']} | {r['shots']} | {r['loss']} | {r['mean']:.2f} ± {r['std']:.2f} | {delta} | {proxy} |")
    lines += [
        "",
        "Claims: Δ averaged over the (task, shots) cells, by shot size, and pooled over all paired episodes "
        "(mean ± standard error [95% t interval], one-sample t-test p, uncorrected; episodes better/worse than CCE).",
        "",
        "| loss | paper's claim | ours: avg Δ (min..max) | by shots | cells better | episodes: Δ ± SE, p, better/worse |",
        "|---|---|---|---|---|---|",
    ]
    for loss, v in report["claims"].items():
        shots = ", ".join(f"{k}: {d:+.2f}" for k, d in v["ours_avg_by_shots"].items())
        pooled = (f"{v['episode_mean']:+.2f} ± {v['episode_se']:.2f} "
                  f"[{v['episode_ci95'][0]:+.2f}, {v['episode_ci95'][1]:+.2f}], p={v['episode_p']:.3f}, "
                  f"{v['episodes_better']}/{v['episodes_worse']}") if "episode_mean" in v else "—"
        lines.append(
            f"| {loss} | {v['claim']} | {v['ours_avg']:+.2f} ({v['ours_min']:+.2f}..{v['ours_max']:+.2f}) | {shots} | "
            f"{v['cells_better']}/{v['cells']} | {pooled} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the grid, saving after every run."""
    args = parse_args(argv)
    out = Path(args.out)
    if args.merge:
        parts = [(name, read_report(Path(name))) for name in args.merge]
        base = read_report(out) if out.exists() else parts.pop(0)[1]
        report = merge_reports(base, parts)
        write_result(out, report)
        write_markdown(out, report)
        return 0
    from diffcse.core.runtime import set_threads
    from diffcse.finetune import FinetuneConfig, Finetuner, load_fewshot_task, make_episode
    from diffcse.finetune.config import parse_params
    from diffcse.finetune.losses import parse_loss_spec

    grid_params = parse_params(args.loss_param)

    def params_for(loss: str) -> dict:
        """The --loss-param arguments of the terms this loss has."""
        terms = parse_loss_spec(loss).terms
        return {t: dict(a) for t, a in grid_params.items() if t in terms}

    unused = sorted(set(grid_params) - {t for loss in args.losses for t in parse_loss_spec(loss).terms})
    if unused:
        raise SystemExit(f"--loss-param: no loss in --losses has the term(s) {', '.join(unused)}")

    set_threads(args.threads)
    if args.report_only:
        report = json.loads(out.read_text())
        rows = summarize(report["runs"], report["meta"]["losses"])
        report.update({"summary": rows, "claims": verdicts(rows, report["runs"])})
        write_result(out, report)
        write_markdown(out, report)
        return 0
    runs: list[dict] = []
    prior_meta: dict = {}
    if args.resume and out.exists():
        prior = json.loads(out.read_text())
        runs, prior_meta = prior.get("runs", []), prior.get("meta", {})
    done = {(r["task"], r["shots"], r["loss"], r["seed"]) for r in runs}
    tuner = Finetuner(args.model, None, args.max_seq_length, args.train_layers, "cpu")
    meta = {
        "model": record_model(tuner.model_path), "model_name": record_model(tuner.model_path),
        "pooler": tuner.pooler,
        # A resumed file keeps the tasks (and their protocols) that earlier invocations ran.
        "tasks": list(dict.fromkeys([*prior_meta.get("tasks", []), *args.tasks])), "shots": args.shots, "seeds": args.seeds, "losses": args.losses,
        "train_layers": args.train_layers, "epochs": args.epochs, "min_steps": args.min_steps,
        "max_steps": args.max_steps, "batch_size": args.batch_size,
        "lr": args.lr, "head_lr": args.head_lr, "proxy_lr": args.proxy_lr, "max_seq_length": args.max_seq_length,
        "max_test": args.max_test, "test_fraction": args.test_fraction, "threads": args.threads,
        "cpu": f"{os.cpu_count()} CPU cores ({platform.machine()}), shared", "machine": machine_probe(),
        "loss_specs": {loss: asdict(parse_loss_spec(loss, params=params_for(loss))) for loss in args.losses},
        "protocol": dict(prior_meta.get("protocol", {})), "processes": prior_meta.get("processes", 1),
    }
    t_start = time.perf_counter()
    report: dict = {}

    def save(final: bool = False) -> None:
        meta["wall_seconds"] = time.perf_counter() - t_start + prior_wall
        rows = summarize(runs, args.losses)
        report.update({"meta": meta, "summary": rows, "claims": verdicts(rows, runs), "runs": runs, "complete": final})
        write_result(out, report)

    prior_wall = prior_meta.get("wall_seconds", 0.0)
    for task in args.tasks:
        loaded = load_fewshot_task(task, args.senteval_data)
        for seed in range(args.first_seed, args.seeds):
            for shots in args.shots:
                episode = make_episode(loaded, shots, seed, args.test_fraction, args.max_test)
                meta["protocol"][loaded.name] = episode.protocol.replace(f"random_state={seed}", "random_state=seed")
                for loss in args.losses:
                    if (loaded.name, shots, loss, seed) in done:
                        continue
                    # Equal epochs where affordable: 10 epochs, at least 20 and at most 30 steps.
                    per_epoch = -(-len(episode.train) // args.batch_size)
                    steps = min(max(args.epochs * per_epoch, args.min_steps), args.max_steps)
                    cfg = FinetuneConfig(
                        loss=loss, shots=shots, max_steps=steps, batch_size=args.batch_size,
                        lr=args.lr, head_lr=args.head_lr, proxy_lr=args.proxy_lr,
                        max_seq_length=args.max_seq_length, train_layers=args.train_layers,
                        loss_params=params_for(loss),
                    )
                    t0 = time.perf_counter()
                    res = tuner.run(episode, cfg)
                    runs.append({
                        "task": loaded.name, "shots": shots, "loss": loss, "seed": seed,
                        "accuracy_classifier": res.accuracy_classifier, "accuracy_proxy": res.accuracy_proxy,
                        "n_train": res.n_train, "n_test": res.n_test, "steps": res.steps,
                        "train_seconds": round(res.train_seconds, 2), "seconds": round(time.perf_counter() - t0, 2),
                        "loss_first": res.loss_first, "loss_last": res.loss_last,
                        "learned_weights_last": res.learned_weights[-1] if res.learned_weights else None,
                    })
                    proxy = "" if res.accuracy_proxy is None else f" proxy {100 * res.accuracy_proxy:.1f}"
                    print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {loaded.name} k={shots} seed={seed} "
                          f"{loss}: {100 * res.accuracy_classifier:.1f}{proxy}", flush=True)
                    save()
        tuner.clear_cache()  # the next task shares no sentences
    save(final=True)
    write_markdown(out, report)
    return 0


def write_markdown(out: Path, report: dict) -> None:
    """Write the table next to the JSON (atomically) and print it."""
    text = markdown(report)
    write_text_atomic(out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
