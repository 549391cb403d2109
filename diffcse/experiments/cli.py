"""`diffcse experiment GRID.yaml` (train and evaluate a grid of variants × seeds, then report) and
`diffcse report RUN_DIR` (one page for one training run)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from diffcse.core.errors import InputError
from diffcse.core.options import add_command, opt


@dataclass
class ExperimentConfig:
    """Options of `diffcse experiment`."""

    grid: str | None = opt(None, "the grid file (YAML; docs/experiments.md); also taken as the first argument",
                           metavar="GRID.yaml", positional=True)
    seeds: int | None = opt(None, "run seeds 1..N instead of the grid's seeds", min=1)
    output_dir: str | None = opt(None, "where the runs and the report go; none = the grid's output_dir, else "
                                 "runs/<grid file name>", metavar="DIR")
    dry_run: bool = opt(False, "say what each run would do (skip, evaluate, resume, train) and stop")
    report_only: bool = opt(False, "train and evaluate nothing; report the runs already there")
    threads: int | None = opt(None, "torch CPU threads", min=1)

    def validate(self) -> None:
        """A grid file is needed."""
        if not self.grid:
            raise InputError("give the grid file: diffcse experiment GRID.yaml")


@dataclass
class ReportConfig:
    """Options of `diffcse report`."""

    run_dir: str | None = opt(None, "a training run's --output-dir; also taken as the first argument", metavar="RUN_DIR",
                              positional=True)
    format: str = opt("md", "page format", choices=("md", "html"))
    output: str | None = opt(None, "the page; none = RUN_DIR/report.md or .html; plots go beside it",
                             metavar="FILE")

    def validate(self) -> None:
        """A run folder is needed."""
        if not self.run_dir:
            raise InputError("give the run folder: diffcse report RUN_DIR")


def require_matplotlib(command: str) -> None:
    """Fail before any work when the plots cannot be drawn (matplotlib is an optional dependency)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(f"diffcse {command}: the plots need matplotlib: pip install 'matplotlib>=3.8'") from None


def run_experiment(cfg: ExperimentConfig) -> int:
    """Train and evaluate what the grid still needs, then write report.md, report.json and the plot."""
    from diffcse.core.runtime import set_threads
    from diffcse.experiments.grid import execute, load_grid
    from diffcse.experiments.report import write_experiment_report

    grid = load_grid(cfg.grid, seeds=cfg.seeds, output_dir=cfg.output_dir)
    require_matplotlib("experiment")
    set_threads(cfg.threads)
    if not cfg.report_only:
        states = execute(grid, dry_run=cfg.dry_run)
        if cfg.dry_run:
            return 0
        diverged = [f"{v}/seed-{s}" for (v, s), state in states.items() if state == "diverged"]
        if diverged:
            print(f"diverged (left out of the statistics): {', '.join(diverged)}", file=sys.stderr)
    written = write_experiment_report(grid)
    print(written["md"].read_text(encoding="utf-8"))
    print(f"wrote {', '.join(str(p) for p in written.values())}", file=sys.stderr)
    return 0


def run_report(cfg: ReportConfig) -> int:
    """Write the page for one run and say where it is."""
    from diffcse.experiments.report import write_run_report

    require_matplotlib("report")
    page = write_run_report(cfg.run_dir, cfg.format, cfg.output)
    print(f"wrote {page}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `experiment` and `report` to the diffcse command line."""
    add_command(subparsers, "experiment", ExperimentConfig, run_experiment,
                help="train and evaluate a grid of config variants × seeds; report mean ± std and "
                     "paired differences with confidence intervals")
    add_command(subparsers, "report", ReportConfig, run_report,
                help="one page (Markdown or HTML, with plots) for one training run")
