"""`diffcse experiment` (grids of variants × seeds: train, evaluate, skip, resume, report) and `diffcse report`."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import sentences
from conftest_senteval import make_tree

from diffcse.cli import main
from diffcse.experiments import stats
from diffcse.experiments.grid import Grid, load_grid
from diffcse.experiments.report import (
    build_experiment_report,
    experiment_blocks,
    render_markdown,
    series,
)

# Tiny and fast: 3 steps of 8 sentences, a toy SentEval tree (its STS-B dev scores the runs in ms).
TRAIN = {"train_file": None, "senteval_data": None, "max_steps": 3, "batch_size": 8, "eval_steps": 2,
         "logging_steps": 1, "save_steps": 100, "precision": "fp32"}


def write_grid(folder: Path, model: str, variants: dict, seeds: int, **train: object) -> Path:
    """A grid file over the tiny model, a small corpus and a toy SentEval tree, all inside folder."""
    root = make_tree(folder / "senteval")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(sentences(64, seed=7)) + "\n", encoding="utf-8")
    base = TRAIN | {"model": model, "train_file": str(corpus), "senteval_data": str(root)} | train
    grid = folder / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": base, "variants": variants, "baseline": next(iter(variants)),
                                    "seeds": seeds, "tasks": ["STS13", "STSBenchmark"]}), encoding="utf-8")
    return grid


@pytest.fixture(scope="module")
def finished_grid(tiny_bert_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2 variants × 2 seeds grid, trained, evaluated and reported once for the tests below."""
    folder = tmp_path_factory.mktemp("grid")
    grid = write_grid(folder, tiny_bert_dir, {"base": {}, "hot": {"temperature": 0.5}}, seeds=2)
    assert main(["experiment", str(grid), "--output-dir", str(folder / "out")]) == 0
    return grid, folder / "out"


def test_a_grid_trains_every_run_and_writes_the_report(finished_grid: tuple[Path, Path]) -> None:
    _, out = finished_grid
    for variant in ("base", "hot"):
        for seed in (1, 2):
            run = out / variant / f"seed-{seed}"
            assert json.loads((run / "summary.json").read_text())["status"] == "finished"
            assert yaml.safe_load((run / "train_config.yaml").read_text())["seed"] == seed
            evaluation = json.loads((run / "eval.json").read_text())
            assert set(evaluation["results"]) == {"STS13", "STSBenchmark"}
            assert evaluation["alignment_uniformity"]["split"] == "test"
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"] == "base" and report["seeds"] == [1, 2]
    assert report["columns"] == ["STS13", "STSBenchmark", "STS Avg."]
    # The report's numbers are the runs' numbers: mean over seeds of each eval.json's headline.
    sts13 = [100 * json.loads((out / "base" / f"seed-{s}" / "eval.json").read_text())["results"]["STS13"]
             ["all"]["spearman"]["all"] for s in (1, 2)]
    assert report["summary"]["base"]["STS13"]["mean"] == pytest.approx(sum(sts13) / 2)
    assert report["differences"]["hot"]["STS13"]["n"] == 2
    assert report["alignment_uniformity"]["hot"]["alignment"]["n"] == 2
    md = (out / "report.md").read_text()
    assert "| hot | STS13 | 2 |" in md and "![STS-B dev Spearman over steps](stsb_dev.png)" in md
    assert (out / "stsb_dev.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) not in (out / "report.json").read_text()  # no absolute paths in results


def test_a_rerun_skips_every_finished_run(finished_grid: tuple[Path, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    grid, out = finished_grid
    files = [out / v / f"seed-{s}" / name for v in ("base", "hot") for s in (1, 2)
             for name in ("summary.json", "eval.json", "model.safetensors", "metrics.jsonl")]
    before = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    assert main(["experiment", str(grid), "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped (finished and evaluated)") == 4
    assert "training" not in err and "evaluating" not in err
    assert {f: f.stat().st_mtime_ns for f in files} == before
    # A grid edited after the runs is refused, not mixed into the same report.
    changed = yaml.safe_load(grid.read_text())
    changed["variants"]["hot"] = {"temperature": 0.25}
    edited = grid.with_name("edited.yaml")
    edited.write_text(yaml.safe_dump(changed), encoding="utf-8")
    assert main(["experiment", str(edited), "--output-dir", str(out)]) == 2
    assert "temperature: 0.5 -> 0.25" in capsys.readouterr().err
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_run_report_writes_the_page_and_its_plots(finished_grid: tuple[Path, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, out = finished_grid
    run = out / "hot" / "seed-1"
    assert main(["report", str(run)]) == 0
    page = (run / "report.md").read_text()
    for section in ("## Curves", "## Summary (summary.json)", "## Best model (best.json)",
                    "## Evaluation (eval.json)", "## Config (train_config.yaml)", "## Versions"):
        assert section in page
    for plot in ("report-loss.png", "report-similarity.png", "report-stsb-dev.png"):
        assert f"]({plot})" in page and (run / plot).stat().st_size > 1000
    assert "| temperature | 0.5 |" in page
    assert main(["report", str(run), "--format", "html", "--output", str(out / "page.html")]) == 0
    assert "<img src='page-loss.png'" in (out / "page.html").read_text() and (out / "page-loss.png").exists()
    assert main(["report", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_run_report_skips_nulls_and_plots_alignment_when_logged(tmp_path: Path) -> None:
    records = [{"step": 1, "loss": 2.0, "loss_rtd": 0.7, "rtd_acc_replaced": 0.4, "rtd_acc_kept": 0.9},
               {"step": 2, "loss": None, "loss_rtd": 0.6},  # a non-finite loss is null in metrics.jsonl
               {"step": 2, "eval_stsb_spearman": 0.5, "eval_alignment": 0.2, "eval_uniformity": -2.0},
               {"step": 3, "loss": 1.5, "eval_alignment": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo',
                                            encoding="utf-8")  # the last line cut by a kill: skipped
    assert series(records, "loss") == ([1, 3], [2.0, 1.5])
    assert series(records, "eval_alignment") == ([2], [0.2])
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.md").read_text()
    for plot in ("loss", "rtd", "stsb-dev", "alignment", "uniformity"):
        assert (tmp_path / f"report-{plot}.png").exists(), plot
    assert "report-similarity.png" not in page  # nothing logged for it
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n', encoding="utf-8")
    assert main(["report", str(tmp_path)]) == 2


def test_paired_differences_equal_a_hand_computation(tmp_path: Path) -> None:
    baseline = {1: 80.0, 2: 81.0, 3: 79.5}
    wide = {1: 81.0, 2: 81.5, 3: 81.0}  # differences 1.0, 0.5, 1.5
    narrow = {1: 81.0, 2: 82.1, 3: 80.4}  # differences 1.0, 1.1, 0.9
    t_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)
    d = stats.paired_difference(wide, baseline)
    assert (d["n"], d["mean"], d["std"]) == (3, pytest.approx(1.0), pytest.approx(0.5))
    half = t_975_2 * 0.5 / math.sqrt(3)
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(1.0 - half), pytest.approx(1.0 + half))
    assert d["verdict"] == "within seed noise"
    d = stats.paired_difference(narrow, baseline)
    assert d["std"] == pytest.approx(0.1) and d["ci_low"] == pytest.approx(1.0 - t_975_2 * 0.1 / math.sqrt(3))
    assert d["verdict"] == "above baseline"
    assert stats.paired_difference({1: 70.0}, {1: 80.0})["verdict"] == stats.UNDEFINED
    assert stats.paired_difference({1: 70.0, 2: 71.0}, {2: 80.0, 3: 80.0})["n"] == 1  # paired by seed only
    assert stats.mean_std([1.0, 2.0, 4.0]) == {"n": 3, "mean": pytest.approx(7 / 3),
                                               "std": pytest.approx(math.sqrt(7 / 3))}
    assert stats.mean_std([5.0])["std"] is None

    # The same table through the report: which variant is labelled within seed noise.
    grid = Grid(tmp_path / "g.yaml", {"base": {}, "wide": {}, "narrow": {}}, "base", [1, 2, 3], ["STS13"],
                output_dir=tmp_path)
    for variant, scores in (("base", baseline), ("wide", wide), ("narrow", narrow)):
        for seed, score in scores.items():
            run = tmp_path / variant / f"seed-{seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({"status": "finished", "steps": 3}))
            (run / "eval.json").write_text(json.dumps({
                "results": {"STS13": {"all": {"spearman": {"all": score / 100}}}}, "settings": {"mode": "test"},
                "alignment_uniformity": {"alignment": 0.2, "uniformity": -2.0, "data": "STS-B test"}}))
    data = build_experiment_report(grid)
    assert data["differences"]["wide"]["STS13"]["mean"] == pytest.approx(1.0)
    md = render_markdown(experiment_blocks(data, None))
    assert f"| wide | STS13 | 3 | +1.00 | 0.50 | [{1 - half:+.2f}, {1 + half:+.2f}] | within seed noise |" in md
    assert "| narrow | STS13 | 3 | +1.00 | 0.10 |" in md and "above baseline |" in md
    assert "| base | 3 | 80.17 ± 0.76 |" in md


def test_grid_files_are_checked_before_anything_runs(tiny_bert_dir: str, tmp_path: Path) -> None:
    from diffcse.core.errors import InputError

    grid = write_grid(tmp_path, tiny_bert_dir, {"a": {}, "b": {"learning_rate": 1e-4}}, seeds=[3, 5])
    loaded = load_grid(grid)
    assert loaded.seeds == [3, 5] and loaded.baseline == "a" and loaded.output_dir == Path("runs/grid")
    assert load_grid(grid, seeds=2, output_dir="x").seeds == [1, 2]
    raw = yaml.safe_load(grid.read_text())
    for change, message in [({"variants": {"a": {"lr": 1}}}, "variants: a: unknown TrainConfig field 'lr'"),
                            ({"variants": {"a": {"seed": 1}}}, "'seed' is set per run by the grid"),
                            ({"variants": {"a": {"batch_size": "big"}}}, "field 'batch_size': expected int"),
                            ({"baseline": "c"}, "baseline: 'c' is not one of the variants"),
                            ({"tasks": ["STS99"]}, "tasks: expected a list of SentEval tasks"),
                            ({"seeds": [1, 1]}, "seeds: [1, 1] repeats a seed"),
                            ({"variants": {"a/b": {}}}, "is not a folder-safe name"),
                            ({"colour": 1}, "unknown key(s) colour")]:
        grid.write_text(yaml.safe_dump(raw | change), encoding="utf-8")
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                           .replace(")", r"\)")):
            load_grid(grid)
    (tmp_path / "recipe.yaml").write_text(f"model: {tiny_bert_dir}\nmax_steps: 7\nseed: 99\n", encoding="utf-8")
    grid.write_text(yaml.safe_dump(raw | {"base": {"config": "recipe.yaml", "batch_size": 4}}), encoding="utf-8")
    config = load_grid(grid).config("b", 3)
    assert (config.max_steps, config.batch_size, config.seed, config.learning_rate) == (7, 4, 3, 1e-4)
    examples = sorted((Path(__file__).resolve().parents[1] / "configs" / "experiments").glob("*.yaml"))
    assert examples
    for example in examples:  # the shipped examples are valid grids
        assert len(load_grid(example).runs()) >= 4, example.name


def test_a_killed_grid_completes_on_rerun(tiny_bert_dir: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # save_total_limit 2: while checkpoint N+1 is written, checkpoint N stays complete to resume from.
    grid = write_grid(tmp_path, tiny_bert_dir, {"only": {}}, seeds=2, max_steps=8, save_steps=1,
                      save_total_limit=2, do_eval=False)
    out = tmp_path / "out"
    second = out / "only" / "seed-2" / "checkpoints"
    deadline = time.monotonic() + 240
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "diffcse", "experiment", str(grid), "--output-dir", str(out)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            # Kill while the second run trains, once it has a complete checkpoint to resume from.
            while not list(second.glob("checkpoint-*/diffcse_checkpoint.json")):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the second run never wrote a checkpoint"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()  # no-op once it is dead; never leaves it running when an assertion failed
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = out / "only" / "seed-1"
    assert json.loads((first / "summary.json").read_text())["status"] == "finished"
    assert not (out / "only" / "seed-2" / "summary.json").exists()
    kept = {f: f.stat().st_mtime_ns for f in (first / "summary.json", first / "eval.json", first / "model.safetensors")}

    capsys.readouterr()
    assert main(["experiment", str(grid), "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert "[1/2] only/seed-1: skipped (finished and evaluated)" in err
    assert "[2/2] only/seed-2: resuming from its newest complete checkpoint" in err
    assert {f: f.stat().st_mtime_ns for f in kept} == kept
    summary = json.loads((out / "only" / "seed-2" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 8 and summary["resumed_from_step"] >= 1
    steps = [json.loads(line)["step"] for line in (out / "only" / "seed-2" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))  # every step logged once across the kill
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["only"]["STS13"]["n"] == 2
    assert "undefined" not in json.dumps(report["summary"])
