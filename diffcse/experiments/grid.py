"""An experiment grid: named variants of one training config × seeds, trained, evaluated and resumable.

Every run lives in OUTPUT_DIR/<variant>/seed-<s>/ (the trainer's output folder: exported model,
metrics.jsonl, summary.json, checkpoints/) with `eval.json` (senteval_runner's report of the
exported model) and `experiment_run.json` (the resolved config it was started with). On a rerun a
run is skipped when summary.json says "finished" and eval.json exists; evaluated only, when
trained but not evaluated; resumed from its newest complete checkpoint when it was stopped
mid-training; else trained from scratch (its folder cleared first). A run whose config differs
from the grid's now is an error, not a silent mix of two experiments.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffcse.core.errors import InputError
from diffcse.core.io import display_path, read_json, read_yaml_file, write_json_atomic
from diffcse.core.options import check_type, fields_of, read_yaml

GRID_KEYS = ("base", "variants", "baseline", "seeds", "tasks", "mode", "output_dir")
DEFAULT_SEEDS = 3
# Set per run by the grid itself, so a grid file may not set them.
RUN_FIELDS = ("output_dir", "resume", "seed")
# Fields that change how a run is executed, not what it computes: a rerun may change them.
EXECUTION_FIELDS = ("output_dir", "resume", "threads", "dataloader_workers")
RUN_FILE = "experiment_run.json"
EVAL_FILE = "eval.json"
SUMMARY_FILE = "summary.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Grid:
    """A parsed grid file: TrainConfig values per variant, the baseline, seeds and what to evaluate."""

    path: Path
    variants: dict[str, dict[str, Any]]
    baseline: str
    seeds: list[int]
    tasks: list[str]
    mode: str = "test"
    output_dir: Path = field(default_factory=Path)

    @property
    def name(self) -> str:
        """How reports name the grid: its file name."""
        return self.path.name

    def run_dir(self, variant: str, seed: int) -> Path:
        """The output folder of one run."""
        return self.output_dir / variant / f"seed-{seed}"

    def runs(self) -> list[tuple[str, int]]:
        """Every (variant, seed), seed-major, so each seed's variants finish together and pair early."""
        return [(v, s) for s in self.seeds for v in self.variants]

    def config(self, variant: str, seed: int, resume: bool = False) -> Any:
        """The validated TrainConfig of one run (recipe defaults filled in)."""
        from diffcse.training.config import TrainConfig

        values = dict(self.variants[variant], seed=seed, output_dir=str(self.run_dir(variant, seed)), resume=resume)
        config = TrainConfig(**values)
        try:
            config.validate()
        except InputError as err:
            raise InputError(f"{self.path}: variant {variant!r}: {err}") from None
        return config


def _load_mapping(path: Path) -> dict[str, Any]:
    """The grid file's top-level mapping; YAML errors name file:line."""
    loaded = read_yaml_file(path, "grid file")
    if not isinstance(loaded, dict):
        raise InputError(f"grid file {path}: expected a mapping with base, variants, seeds, ...")
    unknown = sorted(str(k) for k in loaded if k not in GRID_KEYS)
    if unknown:
        raise InputError(f"grid file {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(GRID_KEYS)}")
    return loaded


def _train_values(values: object, where: str, path: Path) -> dict[str, Any]:
    """Check a mapping of TrainConfig fields (names, types, none of the per-run ones)."""
    from diffcse.training.config import TrainConfig

    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InputError(f"{path}: {where}: expected a mapping of TrainConfig fields, got {type(values).__name__}")
    specs = {s.name: s for s in fields_of(TrainConfig)}
    for key, value in values.items():
        if key in RUN_FIELDS:
            raise InputError(f"{path}: {where}: {key!r} is set per run by the grid (seeds:, --output-dir); remove it")
        if key not in specs:
            raise InputError(f"{path}: {where}: unknown TrainConfig field {key!r}")
        check_type(specs[key], value, f"{path}: {where}: field {key!r}")
    return dict(values)


def _base(raw: object, path: Path) -> dict[str, Any]:
    """The base values: a config file (relative to the grid file), or a mapping with an optional `config:` file."""
    from diffcse.training.config import TrainConfig

    if raw is None:
        return {}
    if isinstance(raw, str):
        raw = {"config": raw}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: base: expected a config file path or a mapping of TrainConfig fields")
    raw = dict(raw)
    values: dict[str, Any] = {}
    file = raw.pop("config", None)
    if file is not None:
        if not isinstance(file, str):
            raise InputError(f"{path}: base: config: expected a file path, got {file!r}")
        values = dict(read_yaml(path.parent / file, TrainConfig))
        clash = sorted(k for k in values if k in RUN_FIELDS)
        if clash:
            # A recipe file may carry these; the grid decides them per run.
            for key in clash:
                values.pop(key)
    values.update(_train_values(raw, "base", path))
    return values


def _seeds(raw: object, path: Path) -> list[int]:
    """A list of distinct int seeds, or a count N meaning 1..N."""
    if raw is None:
        return list(range(1, DEFAULT_SEEDS + 1))
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw < 1:
            raise InputError(f"{path}: seeds: a count must be >= 1, got {raw}")
        return list(range(1, raw + 1))
    if not isinstance(raw, list) or not raw or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        raise InputError(f"{path}: seeds: expected a count or a non-empty list of integers, got {raw!r}")
    if len(set(raw)) != len(raw):
        raise InputError(f"{path}: seeds: {raw} repeats a seed")
    return list(raw)


def load_grid(path: str | Path, seeds: int | None = None, output_dir: str | None = None) -> Grid:
    """Parse and check a grid file; `seeds` (1..N) and `output_dir` override the file's."""
    from senteval_runner.data import ALL_TASKS, STS_TASKS
    from senteval_runner.engine import MODES

    path = Path(path)
    raw = _load_mapping(path)
    base = _base(raw.get("base"), path)
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise InputError(f"{path}: variants: expected a mapping of name: {{overrides}} with at least one variant")
    variants = {}
    for name, overrides in variants_raw.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise InputError(f"{path}: variants: {name!r} is not a folder-safe name (letters, digits, . _ -)")
        variants[name] = base | _train_values(overrides, f"variants: {name}", path)
    baseline = raw.get("baseline", next(iter(variants)))
    if baseline not in variants:
        raise InputError(f"{path}: baseline: {baseline!r} is not one of the variants ({', '.join(variants)})")
    tasks = raw.get("tasks", list(STS_TASKS))
    if not isinstance(tasks, list) or not tasks or any(t not in ALL_TASKS for t in tasks):
        raise InputError(f"{path}: tasks: expected a list of SentEval tasks from {', '.join(ALL_TASKS)}, got {tasks!r}")
    mode = raw.get("mode", "test")
    if mode not in MODES:
        raise InputError(f"{path}: mode: {mode!r} is not one of {', '.join(MODES)}")
    out = output_dir if output_dir is not None else raw.get("output_dir", f"runs/{path.stem}")
    if not isinstance(out, str):
        raise InputError(f"{path}: output_dir: expected a folder path, got {out!r}")
    grid = Grid(path, variants, baseline, list(range(1, seeds + 1)) if seeds else _seeds(raw.get("seeds"), path),
                [t for t in ALL_TASKS if t in tasks], mode, Path(out))
    for variant in grid.variants:
        grid.config(variant, grid.seeds[0])  # every variant is a valid config before anything runs
    return grid


# ---------------------------------------------------------------- one run


def run_fingerprint(config: Any) -> dict[str, Any]:
    """The resolved config minus the fields that do not change what a run computes."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in EXECUTION_FIELDS}


def run_state(grid: Grid, variant: str, seed: int) -> str:
    """What a rerun does with a run: done, diverged, evaluate, resume or train."""
    from diffcse.training.checkpoints import resumable_checkpoint
    from diffcse.training.trainer import CHECKPOINTS

    folder = grid.run_dir(variant, seed)
    summary = read_json(folder / SUMMARY_FILE) or {}
    if summary.get("status") == "finished":
        return "done" if read_json(folder / EVAL_FILE) is not None else "evaluate"
    if summary.get("status") == "diverged":
        return "diverged"
    try:
        resumable_checkpoint(folder / CHECKPOINTS)
    except InputError:
        return "train"
    return "resume"


def check_same_config(grid: Grid, variant: str, seed: int) -> None:
    """Refuse to continue a run that was started with another config than the grid gives it now."""
    folder = grid.run_dir(variant, seed)
    recorded = read_json(folder / RUN_FILE)
    if recorded is None:
        return
    now = run_fingerprint(grid.config(variant, seed))
    before = recorded.get("config", {})
    # Only fields both know: a field a diffcse upgrade added (or removed) was not a choice of this run.
    changed = sorted(k for k in set(now) & set(before) if now[k] != before[k])
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise InputError(f"{display_path(folder)} was run with another config than {grid.name} gives it now "
                         f"({details}); delete that folder or use another --output-dir")


def evaluate_run(grid: Grid, variant: str, seed: int, senteval_data: str | None) -> dict:
    """Evaluate a run's exported model on the grid's tasks, plus alignment/uniformity; write eval.json."""
    from diffcse.core.metrics import stsb_alignment_uniformity
    from diffcse.evaluation.adapter import FolderEncoder, evaluate_folder

    folder = grid.run_dir(variant, seed)
    enc = FolderEncoder(str(folder))
    report = evaluate_folder(enc, tasks=grid.tasks, mode=grid.mode, data_dir=senteval_data)
    if "alignment_uniformity" not in report:
        report["alignment_uniformity"] = stsb_alignment_uniformity(
            enc, senteval_data, split="dev" if grid.mode == "dev" else "test")
    report["run"] = {"variant": variant, "seed": seed, "grid": grid.name}
    write_json_atomic(folder / EVAL_FILE, report)
    return report


def execute(grid: Grid, say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
            dry_run: bool = False) -> dict[tuple[str, int], str]:
    """Train and evaluate every run the grid still needs; return each run's final state."""
    from diffcse.training.guard import TrainingDiverged
    from diffcse.training.trainer import train

    states: dict[tuple[str, int], str] = {}
    total = len(grid.runs())
    for i, (variant, seed) in enumerate(grid.runs(), start=1):
        where = f"[{i}/{total}] {variant}/seed-{seed}"
        check_same_config(grid, variant, seed)
        state = run_state(grid, variant, seed)
        if dry_run:
            say(f"{where}: {state}")
            states[(variant, seed)] = state
            continue
        if state in ("done", "diverged"):
            say(f"{where}: skipped ({'finished and evaluated' if state == 'done' else 'diverged earlier'})")
            states[(variant, seed)] = state
            continue
        folder = grid.run_dir(variant, seed)
        config = grid.config(variant, seed)
        if state in ("train", "resume"):
            if state == "train" and folder.exists():
                shutil.rmtree(folder)  # what a killed run left without a usable checkpoint
            config = grid.config(variant, seed, resume=state == "resume")
            write_json_atomic(folder / RUN_FILE, {"variant": variant, "seed": seed, "grid": grid.name,
                                                  "config": run_fingerprint(config)})
            say(f"{where}: {'resuming from its newest complete checkpoint' if state == 'resume' else 'training'}")
            try:
                train(config)
            except TrainingDiverged as err:
                say(f"{where}: diverged ({err})")
                states[(variant, seed)] = "diverged"
                continue
            finally:
                gc.collect()
        say(f"{where}: evaluating on {', '.join(grid.tasks)}")
        evaluate_run(grid, variant, seed, config.senteval_data)
        gc.collect()
        states[(variant, seed)] = "done"
    return states
