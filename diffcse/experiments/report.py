"""Reports: one page for an experiment grid (report.md/json, plots) and one for a single training run.

Both read only what runs wrote (metrics.jsonl, summary.json, best.json, eval.json,
train_config.yaml), so a report can be rebuilt at any time without training or evaluating.
Non-finite metrics are null in metrics.jsonl and are left out of the plots.
"""

from __future__ import annotations

import html
import json
import math
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from diffcse.core.errors import InputError
from diffcse.core.io import (
    atomic_path,
    display_path,
    iter_lines,
    read_json,
    write_json_atomic,
    write_text_atomic,
)
from diffcse.experiments import stats
from diffcse.experiments.grid import EVAL_FILE, SUMMARY_FILE, Grid

METRICS_FILE = "metrics.jsonl"
SHORT = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}
STS_AVG, TRANSFER_AVG = "STS Avg.", "transfer Avg."
# Run-report plots: file stem -> (title, y label, metrics.jsonl keys).
RUN_PLOTS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("loss", "Loss", "loss", ("loss", "loss_contrast", "loss_rtd")),
    ("similarity", "Cosine similarity of positives and negatives", "cosine", ("pos_sim", "neg_sim")),
    ("rtd", "Replaced-token detection accuracy", "accuracy", ("rtd_acc_replaced", "rtd_acc_kept")),
    ("stsb-dev", "STS-B dev Spearman", "Spearman", ("eval_stsb_spearman",)),
    # Two plots: their scales differ (alignment ~0.2, uniformity ~-2.5 for a trained BERT).
    ("alignment", "Alignment over training (lower is better)", "alignment", ("eval_alignment",)),
    ("uniformity", "Uniformity over training (lower is better)", "uniformity", ("eval_uniformity",)),
]

Block = tuple  # ("h1"|"h2"|"p"|"code", text) | ("table", headers, rows) | ("img", file, alt)


# ---------------------------------------------------------------- reading


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a cut last line (a killed writer) is skipped, any other bad line is an error."""
    lines = list(iter_lines(path, "metrics file"))
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line.text)
        except ValueError:
            if i == len(lines) - 1:
                break
            raise InputError(f"{path}:{line.lineno}: not a JSON record") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line.lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def series(records: Iterable[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, finite values only, the last record per step winning."""
    by_step: dict[float, float] = {}
    for r in records:
        value, step = r.get(key), r.get("step")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and isinstance(step, (int, float)):
            by_step[step] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


# ---------------------------------------------------------------- plots


def plot(path: Path, title: str, ylabel: str, lines: dict[str, tuple[list[float], list[float]]],
         bands: dict[str, tuple[list[float], list[float], list[float]]] | None = None) -> Path:
    """One PNG: a line per label, an optional shaded band per label; written atomically."""
    # The object API on the Agg canvas: no pyplot global state, no display, safe beside other plots.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (xs, ys) in lines.items():
        (line,) = ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        if bands and label in bands:
            bx, lo, hi = bands[label]
            ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1 or bands:
        ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


# ---------------------------------------------------------------- rendering


def _fmt(value: Any) -> str:
    """A table cell."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def render_markdown(blocks: Sequence[Block]) -> str:
    """Blocks as Markdown."""
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + block[1])
        elif kind == "p":
            out.append(block[1])
        elif kind == "code":
            out.append("```\n" + block[1].rstrip("\n") + "\n```")
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
        elif kind == "table":
            heads, rows = block[1], block[2]
            cell = lambda v: _fmt(v).replace("|", "\\|")  # noqa: E731 - a pipe would split the cell
            out.append("\n".join(["| " + " | ".join(map(cell, heads)) + " |", "|" + "---|" * len(heads),
                                  *("| " + " | ".join(map(cell, r)) + " |" for r in rows)]))
    return "\n\n".join(out) + "\n"


def render_html(blocks: Sequence[Block], title: str) -> str:
    """Blocks as one self-contained HTML page (the plots are files beside it)."""
    e = html.escape
    out = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(block[1])}</p>")
        elif kind == "code":
            out.append(f"<pre>{e(block[1])}</pre>")
        elif kind == "img":
            out.append(f"<p><img src='{e(block[1])}' alt='{e(block[2])}'></p>")
        elif kind == "table":
            rows = "".join("<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in r) + "</tr>" for r in block[2])
            out.append("<table><tr>" + "".join(f"<th>{e(_fmt(h))}</th>" for h in block[1]) + f"</tr>{rows}</table>")
    out.append("</body></html>\n")
    return "\n".join(out)


def flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as (dotted key, value) rows."""
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


# ---------------------------------------------------------------- experiment report


def task_scores(report: dict) -> dict[str, float]:
    """The papers' number per task (x100, unrounded) from an eval.json, plus the STS/transfer averages."""
    from senteval_runner.data import STS_TASKS, TRANSFER_TASKS
    from senteval_runner.engine import headline

    mode = report.get("settings", {}).get("mode", "test")
    scores: dict[str, float] = {}
    for task, res in report.get("results", {}).items():
        value = headline(task, res, mode)
        if value is not None and math.isfinite(value):
            scores[task] = float(value)
    for name, group in ((STS_AVG, STS_TASKS), (TRANSFER_AVG, TRANSFER_TASKS)):
        present = [scores[t] for t in group if t in scores]
        if len(present) > 1:  # an average of one task is that task
            scores[name] = sum(present) / len(present)
    return scores


def _pm(summary: dict, digits: int = 2) -> str:
    """'mean ± std' of a stats.mean_std result (std '–' for one seed)."""
    if summary["mean"] is None:
        return "–"
    std = "–" if summary["std"] is None else f"{summary['std']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {std}"


def build_experiment_report(grid: Grid) -> dict:
    """Everything the experiment report shows, from the run folders: per run, per variant, differences."""
    runs: dict[str, dict[str, dict]] = {}
    for variant, seed in grid.runs():
        folder = grid.run_dir(variant, seed)
        summary = read_json(folder / SUMMARY_FILE) or {}
        evaluation = read_json(folder / EVAL_FILE)
        status = summary.get("status", "not run" if not folder.exists() else "incomplete")
        entry: dict[str, Any] = {"status": status if evaluation is not None or status != "finished" else "not evaluated",
                                 "steps": summary.get("steps"),
                                 "stsb_dev_spearman_best": summary.get("stsb_dev_spearman_best"),
                                 "folder": f"{variant}/seed-{seed}"}
        if evaluation is not None and status == "finished":
            entry["scores"] = task_scores(evaluation)
            au = evaluation.get("alignment_uniformity") or {}
            entry["alignment"], entry["uniformity"] = au.get("alignment"), au.get("uniformity")
            entry["alignment_data"] = au.get("data")
        runs.setdefault(variant, {})[str(seed)] = entry
    columns = [t for t in grid.tasks if any(t in r.get("scores", {}) for v in runs.values() for r in v.values())]
    columns += [a for a in (STS_AVG, TRANSFER_AVG)
                if any(a in r.get("scores", {}) for v in runs.values() for r in v.values())]

    def values(variant: str, column: str) -> dict[int, float]:
        return {int(s): r["scores"][column] for s, r in runs[variant].items()
                if column in r.get("scores", {})}

    summary_table = {v: {c: stats.mean_std(list(values(v, c).values())) for c in columns} for v in grid.variants}
    differences = {v: {c: stats.paired_difference(values(v, c), values(grid.baseline, c)) for c in columns}
                   for v in grid.variants if v != grid.baseline}
    au_table = {}
    for v in grid.variants:
        done = [r for r in runs[v].values() if r.get("alignment") is not None]
        au_table[v] = {"alignment": stats.mean_std([r["alignment"] for r in done]),
                       "uniformity": stats.mean_std([r["uniformity"] for r in done]),
                       "data": next((r["alignment_data"] for r in done), None)}
    return {
        "grid": grid.name,
        "baseline": grid.baseline,
        "variants": list(grid.variants),
        "seeds": grid.seeds,
        "tasks": grid.tasks,
        "mode": grid.mode,
        "columns": columns,
        "score": "headline x100: Spearman of cosine (STS12-16 'all', STS-B/SICK-R test), accuracy (transfer)",
        "statistics": {
            "per_variant": "mean and sample std (ddof=1) over the seeds whose run finished and was evaluated",
            "difference": "variant - baseline paired by seed; mean, sample std and a Student-t interval "
                          f"mean ± t((1+c)/2, n-1)·sd/sqrt(n), c = {stats.CONFIDENCE}; undefined for n < 2",
            "verdict": f"'{stats.WITHIN_NOISE}' when the interval contains 0",
        },
        "runs": runs,
        "summary": summary_table,
        "differences": differences,
        "alignment_uniformity": au_table,
    }


def experiment_curves(grid: Grid) -> dict[str, list[tuple[list[float], list[float]]]]:
    """STS-B dev Spearman over steps of every run with a metrics file, per variant."""
    curves: dict[str, list[tuple[list[float], list[float]]]] = {}
    for variant, seed in grid.runs():
        path = grid.run_dir(variant, seed) / METRICS_FILE
        if path.is_file():
            steps, ys = series(read_metrics(path), "eval_stsb_spearman")
            if steps:
                curves.setdefault(variant, []).append((steps, ys))
    return curves


def plot_experiment(grid: Grid, path: Path) -> Path | None:
    """STS-B dev over steps: the mean over seeds per variant, with the min-max band across seeds."""
    lines, bands = {}, {}
    for variant, runs in experiment_curves(grid).items():
        steps = sorted({s for xs, _ in runs for s in xs})
        at = [[dict(zip(xs, ys, strict=True))[s] for xs, ys in runs if s in xs] for s in steps]
        label = f"{variant} (n={len(runs)})"
        lines[label] = (steps, [sum(v) / len(v) * 100 for v in at])
        if len(runs) > 1:
            bands[label] = (steps, [min(v) * 100 for v in at], [max(v) * 100 for v in at])
    if not lines:
        return None
    return plot(path, "STS-B dev Spearman x100 (mean over seeds, band: min-max)", "Spearman x100", lines, bands)


def experiment_blocks(data: dict, plot_file: str | None) -> list[Block]:
    """The experiment report's Markdown blocks."""
    heads = [SHORT.get(c, c) for c in data["columns"]]
    finished = sum(1 for v in data["runs"].values() for r in v.values() if "scores" in r)
    total = sum(len(v) for v in data["runs"].values())
    blocks: list[Block] = [
        ("h1", f"Experiment {data['grid']}"),
        ("p", f"Baseline `{data['baseline']}`; seeds {', '.join(map(str, data['seeds']))}; tasks "
              f"{', '.join(SHORT.get(t, t) for t in data['tasks'])} ({data['mode']} mode; {data['score']}). "
              f"{finished} of {total} runs finished and evaluated."),
        ("h2", "Scores (mean ± std over seeds)"),
        ("table", ["variant", "n", *heads],
         [[v, max((s["n"] for s in data["summary"][v].values()), default=0),
           *(_pm(data["summary"][v][c]) for c in data["columns"])] for v in data["variants"]]),
    ]
    rows = []
    for v, by_column in data["differences"].items():
        for c in data["columns"]:
            d = by_column[c]
            ci = "–" if d["ci_low"] is None else f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
            rows.append([v, SHORT.get(c, c), d["n"], "–" if d["mean"] is None else f"{d['mean']:+.2f}",
                         "–" if d["std"] is None else f"{d['std']:.2f}", ci, d["verdict"]])
    if rows:
        blocks += [("h2", f"Difference against `{data['baseline']}` (paired by seed, "
                          f"{int(stats.CONFIDENCE * 100)}% t interval)"),
                   ("table", ["variant", "task", "n", "mean diff", "std", f"{int(stats.CONFIDENCE * 100)}% CI",
                              "verdict"], rows),
                   ("p", f"A difference whose interval contains 0 is {stats.WITHIN_NOISE}: these seeds cannot "
                         "tell it from no difference. With fewer than 2 paired seeds no interval exists.")]
    au = data["alignment_uniformity"]
    where = next((a["data"] for a in au.values() if a["data"]), None)
    if where:
        blocks += [("h2", f"Alignment and uniformity ({where}; lower is better)"),
                   ("table", ["variant", "n", "alignment", "uniformity"],
                    [[v, au[v]["alignment"]["n"], _pm(au[v]["alignment"], 4), _pm(au[v]["uniformity"], 4)]
                     for v in data["variants"]])]
    if plot_file:
        blocks += [("h2", "STS-B dev over training"), ("img", plot_file, "STS-B dev Spearman over steps")]
    blocks += [("h2", "Runs"),
               ("table", ["variant", "seed", "status", "steps", "STS-B dev best", "folder"],
                [[v, s, r["status"], r["steps"], r["stsb_dev_spearman_best"], r["folder"]]
                 for v, by_seed in data["runs"].items() for s, r in by_seed.items()]),
               ("h2", "How the statistics are computed"),
               ("p", "Per variant: " + data["statistics"]["per_variant"] + ". Difference: "
                     + data["statistics"]["difference"] + ". Verdict: " + data["statistics"]["verdict"] + ".")]
    return blocks


def write_experiment_report(grid: Grid) -> dict[str, Path]:
    """Write OUTPUT_DIR/report.md, report.json and stsb_dev.png; return their paths."""
    data = build_experiment_report(grid)
    out = grid.output_dir
    written: dict[str, Path] = {}
    png = plot_experiment(grid, out / "stsb_dev.png")
    if png is not None:
        written["png"] = png
    data["plots"] = [png.name] if png is not None else []
    written["json"] = write_json_atomic(out / "report.json", data)
    written["md"] = write_text_atomic(out / "report.md",
                                      render_markdown(experiment_blocks(data, png.name if png else None)))
    return written


# ---------------------------------------------------------------- run report


def _versions(summary: dict, evaluation: dict | None) -> tuple[dict, str]:
    """The versions the run recorded, else the evaluation's, else this environment's (said so)."""
    if isinstance(summary.get("versions"), dict):
        return summary["versions"], "recorded by the training run"
    if evaluation and isinstance(evaluation.get("settings", {}).get("versions"), dict):
        return evaluation["settings"]["versions"], "recorded by the evaluation (eval.json)"
    import numpy
    import torch
    import transformers

    return ({"python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
             "transformers": transformers.__version__},
            "not recorded by the run: the versions where this report was made")


def run_blocks(run_dir: Path, records: list[dict], page_dir: Path, stem: str) -> list[Block]:
    """The run report's blocks; writes its plots beside the page."""
    summary = read_json(run_dir / SUMMARY_FILE) or {}
    best = read_json(run_dir / "best.json")
    evaluation = read_json(run_dir / EVAL_FILE)
    blocks: list[Block] = [("h1", f"Training run {display_path(run_dir.resolve())}"),
                           ("p", f"status: {summary.get('status', 'no summary.json (running, or stopped)')}; "
                                 f"steps: {summary.get('steps', max((r.get('step', 0) for r in records), default=0))}; "
                                 f"objective: {summary.get('objective', '–')}; model: {summary.get('model', '–')}")]
    plots = []
    for name, title, ylabel, keys in RUN_PLOTS:
        lines = {k: series(records, k) for k in keys}
        lines = {k: v for k, v in lines.items() if v[0]}
        if lines:
            file = f"{stem}-{name}.png"
            plot(page_dir / file, title, ylabel, lines)
            plots.append(("img", file, title))
    if plots:
        blocks += [("h2", "Curves"), *plots]
    blocks += [("h2", "Summary (summary.json)"),
               ("table", ["field", "value"], flatten(summary)) if summary else ("p", "no summary.json")]
    if best is not None:
        blocks += [("h2", "Best model (best.json)"), ("table", ["field", "value"], flatten(best))]
    if evaluation is not None:
        blocks.append(("h2", "Evaluation (eval.json)"))
        for name, row in evaluation.get("table", {}).items():
            blocks.append(("table", [name, *(SHORT.get(k, k) for k in row)], [["score", *row.values()]]))
        au = evaluation.get("alignment_uniformity")
        if au:
            blocks.append(("table", ["alignment", "uniformity", "data"],
                           [[au["alignment"], au["uniformity"], au.get("data")]]))
    config = run_dir / "train_config.yaml"
    if config.is_file():
        import yaml

        values = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        # Reports hold no other machine's absolute paths: a folder outside this one shows as its name.
        rows = [(k, display_path(v) if isinstance(v, str) and Path(v).is_absolute() else v) for k, v in values.items()]
        blocks += [("h2", "Config (train_config.yaml)"), ("table", ["field", "value"], rows)]
    versions, source = _versions(summary, evaluation)
    blocks += [("h2", "Versions"), ("p", source), ("table", ["package", "version"], list(versions.items()))]
    return blocks


def write_run_report(run_dir: str | Path, fmt: str = "md", output: str | None = None) -> Path:
    """Write one page (Markdown or HTML) for a training run, with PNG plots beside it; return the page."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run folder {run_dir} does not exist")
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise InputError(f"{run_dir}: no {METRICS_FILE}; is it a training run's --output-dir?")
    if fmt not in ("md", "html"):
        raise InputError(f"--format: {fmt!r} is not md or html")
    page = Path(output) if output else run_dir / f"report.{fmt}"
    blocks = run_blocks(run_dir, read_metrics(metrics), page.parent, page.stem)
    text = render_markdown(blocks) if fmt == "md" else render_html(blocks, f"Training run {display_path(run_dir.resolve())}")
    return write_text_atomic(page, text)
