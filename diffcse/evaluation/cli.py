"""`diffcse eval` (and `scripts/evaluate_sts.py`): SentEval STS/transfer evaluation of a model folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from diffcse.core.errors import InputError
from diffcse.core.io import check_input_file, display_path
from diffcse.core.options import add_command, opt
from diffcse.core.runtime import BACKENDS
from diffcse.evaluation.mteb import MTEB_TASKS, OWN_TASKS

POOLERS = ("st", "cls", "cls_before_pooler", "avg", "avg_first_last", "avg_top2")
TASK_SETS = ("sts", "transfer", "full")
# The SentEval tasks --mteb-dir writes (under MTEB's names or our own).
MTEB_SHARED = (*MTEB_TASKS, *OWN_TASKS)


@dataclass
class EvalConfig:
    """Options of `diffcse eval`."""

    model: str | None = opt(None, "HF or sentence-transformers folder (default: the packaged all-MiniLM-L6-v2)")
    pooler: str | None = opt(None, "pooling; default: the folder's own (ST Pooling config, else [CLS]); "
                             "'st' runs the folder through SentenceTransformer", choices=POOLERS)
    task_set: str | None = opt(None, "named task set (default: sts)", choices=TASK_SETS)
    tasks: list[str] | None = opt(None, "explicit tasks, e.g. STS12 STSBenchmark MR (instead of --task-set)",
                                  metavar="TASK")
    mode: str = opt("test", "test: SimCSE's test config; fasttest: 5-fold RMSprop; dev: dev numbers (fasttest "
                    "config)", choices=("test", "fasttest", "dev"))
    senteval_data: str | None = opt(None, "folder holding downstream/ (else $SENTEVAL_DATA, "
                                    "$DIFFCSE_DATA_DIR/senteval, data/senteval)", metavar="DIR")
    output: str | None = opt(None, "write the full report here (atomically)", metavar="JSON")
    sts_dev: bool = opt(True, "score STS-B and SICK-R on their dev split as well as test")
    batch_size: int = opt(64, "encoding batch size", min=1)
    max_seq_length: int | None = opt(None, "truncate inputs (default: the model's)", min=3)
    device: str | None = opt(None, "encoder device (default: cuda if available, else cpu)")
    precision: str = opt("fp32", "encoder precision: fp32 (reference) or bf16 autocast (faster where the "
                         "hardware has bf16 units; scores move by a few hundredths)", choices=("fp32", "bf16"))
    backend: str = opt("torch", "the encoder's transformer runtime: torch, or onnx (ONNX Runtime with BERT "
                       "fusions; CPU, fp32; STS scores equal torch's within 0.01, docs/benchmarks.md)",
                       choices=BACKENDS)
    classifier_device: str | None = opt(None, "device for the transfer classifiers (default: the encoder's)")
    reference: bool = opt(False, "fit SentEval's classifiers one at a time (slow reference path)")
    threads: int | None = opt(None, "torch CPU threads for encoding", min=1)
    classifier_threads: int = opt(1, "torch CPU threads while fitting classifiers (their ops are too small "
                                  "to gain)", min=1)
    classifier_kernel: str = opt("auto", "batched classifier training: fused numba kernel (CPU; auto's "
                                 "choice there) or torch ops", choices=("auto", "fused", "torch"))
    seed: int = opt(1111, "classifier seed (SentEval: 1111)")
    alignment_uniformity: bool = opt(True, "when STS-B is evaluated: alignment and uniformity (Wang & Isola) "
                                     "on STS-B test (dev in dev mode), as SimCSE reports them")
    sts_file: list[str] | None = opt(None, "your own STS pairs: TSV sentence1, sentence2, score (header "
                                     "optional); Spearman/Pearson of cosine; repeatable. With no --tasks or "
                                     "--task-set only your files are evaluated", metavar="TSV")
    classification_file: list[str] | None = opt(None, "your own classification data: TSV text, label (any "
                                                "strings); SentEval's MR/CR protocol; repeatable", metavar="TSV")
    mteb_dir: str | None = opt(None, "also write the STS scores in MTEB's results layout here "
                               "(DIR/<model>/<revision>/<Task>.json; docs/experiments.md says which match MTEB)",
                               metavar="DIR")
    mteb_model_name: str | None = opt(None, "the model's name in --mteb-dir, as organization/model (default: "
                                      "local/<folder name>)", metavar="ORG/NAME")
    quiet: bool = opt(False, "print only the table")

    def validate(self) -> None:
        """Reject contradictory options before any model or data is loaded."""
        if self.tasks and self.task_set:
            raise InputError("--tasks and --task-set: give one of them, not both")
        if self.tasks:
            from senteval_runner.data import ALL_TASKS

            unknown = [t for t in self.tasks if t not in ALL_TASKS]
            if unknown:
                raise InputError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(ALL_TASKS)}")
        for option, files in (("--sts-file", self.sts_file), ("--classification-file", self.classification_file)):
            names = [display_path(f) for f in files or []]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise InputError(f"{option}: {', '.join(twice)} given twice (results are keyed by file name)")
            for f in files or []:
                check_input_file(f, f"{option}")
        if self.mteb_model_name is not None and "/" not in self.mteb_model_name.strip("/"):
            raise InputError(f"--mteb-model-name: {self.mteb_model_name!r} is not organization/model (MTEB needs both)")
        if self.mteb_dir is not None and not any(t in MTEB_SHARED for t in self.senteval_tasks()):
            raise InputError("--mteb-dir: none of the tasks evaluated is one MTEB shares with SentEval "
                             f"({', '.join(MTEB_SHARED)})")

    def senteval_tasks(self) -> list[str]:
        """The SentEval tasks to run: none when only custom files are given without --tasks/--task-set."""
        from senteval_runner.engine import resolve_tasks

        if not self.tasks and not self.task_set and (self.sts_file or self.classification_file):
            return []
        return resolve_tasks(self.tasks, self.task_set)


def run(cfg: EvalConfig) -> int:
    """Run an evaluation; prints the tables, optionally writes the JSON report; returns 0."""
    from diffcse.core import runtime
    from diffcse.core.io import write_json_atomic
    from diffcse.evaluation.adapter import FolderEncoder, evaluate_folder
    from diffcse.evaluation.custom import read_classification_file, read_sts_file
    from senteval_runner.classifier import CONFIGS
    from senteval_runner.data import resolve_data_dir
    from senteval_runner.report import format_table

    names = cfg.senteval_tasks()
    # Bad data fails before the (slow) model load.
    data_dir = resolve_data_dir(cfg.senteval_data) if names else None
    for path in cfg.sts_file or []:
        read_sts_file(path)
    for path in cfg.classification_file or []:
        read_classification_file(path, min_per_label=CONFIGS[cfg.mode].kfold)
    device = runtime.setup(cfg.threads, cfg.device)
    enc = FolderEncoder(cfg.model, pooler=cfg.pooler, max_seq_length=cfg.max_seq_length,
                        device=device, batch_size=cfg.batch_size, precision=cfg.precision,
                        backend=cfg.backend)
    clf_device = cfg.classifier_device or enc.description["device"]

    def progress(msg: str) -> None:
        """Per-task progress lines on stderr (stdout is for the table)."""
        if not cfg.quiet:
            print(msg, file=sys.stderr, flush=True)

    classifier = {"seed": cfg.seed, "batched": not cfg.reference, "device": clf_device,
                  "classifier_threads": cfg.classifier_threads, "classifier_kernel": cfg.classifier_kernel}
    if names:
        report = evaluate_folder(enc, tasks=names, mode=cfg.mode, data_dir=data_dir,
                                 alignment_uniformity=cfg.alignment_uniformity, progress=progress,
                                 batch_size=cfg.batch_size, sts_dev=cfg.sts_dev, **classifier)
    else:
        report = {"results": {}, "table": {}, "settings": {"mode": cfg.mode, "tasks": [], "encoder": enc.description}}
    if cfg.sts_file or cfg.classification_file:
        report["custom"] = evaluate_custom(enc, cfg, classifier, progress)
    if cfg.mteb_dir is not None:
        from diffcse.evaluation.mteb import describe_model, write_mteb_results

        written = write_mteb_results(report, cfg.mteb_dir, describe_model(enc, cfg.mteb_model_name))
        if written:
            report["mteb"] = {"files": [p.name for p in written], "folder": "/".join(written[0].parts[-3:-1])}
            progress(f"wrote {len(written)} MTEB result files to {written[0].parent}")
        else:  # e.g. --mode dev on STS12-16, which have no dev split
            progress("--mteb-dir: no STS score of this run to write")
    for text in (format_table(report), format_extras(report)):
        if text:
            print(text)
    if cfg.output:
        path = write_json_atomic(cfg.output, report)
        if not cfg.quiet:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def evaluate_custom(enc: object, cfg: EvalConfig, classifier: dict, progress: Callable[[str], None]) -> dict:
    """Scores of the user's --sts-file and --classification-file data, keyed by file name."""
    from diffcse.evaluation.custom import score_classification_file, score_sts_file

    out: dict[str, dict] = {}
    for path in cfg.sts_file or []:
        out.setdefault("sts", {})[display_path(path)] = res = score_sts_file(enc, path)
        progress(f"{display_path(path)}: Spearman {100 * res['spearman']:.2f} ({res['pairs']} pairs)")
    for path in cfg.classification_file or []:
        res = score_classification_file(enc, path, mode=cfg.mode, **classifier)
        out.setdefault("classification", {})[display_path(path)] = res
        progress(f"{display_path(path)}: accuracy {res['acc']:.2f} ({res['examples']} examples)")
    return out


def format_extras(report: dict) -> str:
    """Alignment/uniformity and the custom files' scores, as lines under the SentEval tables."""
    lines = []
    au = report.get("alignment_uniformity")
    if au:
        lines.append(f"alignment {au['alignment']:.4g}  uniformity {au['uniformity']:.4g}  ({au['data']}: "
                     f"{au['positive_pairs']} pairs with gold > {au['positive_threshold']:g}, "
                     f"{au['sentences']} sentences; lower is better)")
    custom = report.get("custom", {})
    for name, res in custom.get("sts", {}).items():
        lines.append(f"{name}: Spearman {100 * res['spearman']:.2f}  Pearson {100 * res['pearson']:.2f}  "
                     f"({res['pairs']} pairs)")
    mode = report.get("settings", {}).get("mode", "test")
    for name, res in custom.get("classification", {}).items():
        score = res["devacc"] if mode == "dev" else res["acc"]
        lines.append(f"{name}: {'dev ' if mode == 'dev' else ''}accuracy {score:.2f}  ({res['examples']} examples, "
                     f"{len(res['labels'])} labels, {res['protocol']})")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand to the `diffcse` command line."""
    add_command(subparsers, "eval", EvalConfig, run,
                help="SentEval: STS and transfer tasks (faithful, fast, CPU-capable)", description=__doc__)

