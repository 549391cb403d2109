"""`diffcse eval --sts-file / --classification-file`: the user's own data, scored like SentEval's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import sentences
from scipy.stats import pearsonr, spearmanr

from diffcse.cli import main
from diffcse.core.encoder import Encoder
from diffcse.core.errors import InputError
from diffcse.evaluation.custom import read_classification_file, read_sts_file


def write_pairs(path: Path, n: int = 30, header: bool = True, seed: int = 0) -> tuple[list[str], list[str], list[float]]:
    """An STS TSV of n pairs whose scores vary; returns the pairs."""
    rng = np.random.default_rng(seed)
    a, b = sentences(n, seed=seed), sentences(n, seed=seed + 1)
    scores = [round(float(x), 2) for x in rng.uniform(0, 5, n)]
    lines = ["sentence1\tsentence2\tscore"] if header else []
    lines += [f"{x}\t{y}\t{s}" for x, y, s in zip(a, b, scores, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return a, b, scores


def test_sts_file_scores_equal_scipy_on_the_same_pairs(tiny_bert_dir: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Only custom files: no SentEval data is needed, so point the data root at an empty folder.
    monkeypatch.setenv("DIFFCSE_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.delenv("SENTEVAL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    a, b, gold = write_pairs(tmp_path / "mine.tsv")
    write_pairs(tmp_path / "other.tsv", n=12, header=False, seed=5)
    # Mean pooling: the tiny random model's [CLS] vectors are nearly parallel (cosines 0.99999x).
    assert main(["eval", "--model", tiny_bert_dir, "--pooler", "avg", "--sts-file", "mine.tsv",
                 "--sts-file", "other.tsv", "--output", "report.json", "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["results"] == {} and set(report["custom"]["sts"]) == {"mine.tsv", "other.tsv"}
    got = report["custom"]["sts"]["mine.tsv"]
    enc = Encoder.load(tiny_bert_dir, pooler="avg")
    u, v = enc.encode(a).astype(np.float64), enc.encode(b).astype(np.float64)
    cos = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
    assert cos.max() - cos.min() > 0.01  # ranks not decided by rounding noise
    assert got["pairs"] == len(a) == 30
    assert got["spearman"] == pytest.approx(spearmanr(cos, gold)[0], abs=1e-6)
    assert got["pearson"] == pytest.approx(pearsonr(cos, gold)[0], abs=1e-6)
    assert report["custom"]["sts"]["other.tsv"]["pairs"] == 12  # no header: the first line is a pair


@pytest.mark.parametrize(("row", "message"), [
    ("a man\tplays\t3\textra", "mine.tsv:3: expected 3 tab-separated fields"),
    ("a man\tplays guitar\tfour", "mine.tsv:3: score is not a finite number: 'four'"),
    ("a man\tplays guitar\tnan", "mine.tsv:3: score is not a finite number"),
    ("a man\t \t2.5", "mine.tsv:3: field 2 (sentence2) is empty"),
    ("a man plays guitar", "mine.tsv:3: expected 3 tab-separated fields"),
])
def test_a_malformed_row_names_its_line(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "mine.tsv"
    path.write_text(f"sentence1\tsentence2\tscore\na dog\ta cat\t1.0\n{row}\nx\ty\t4\n", encoding="utf-8")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_sts_file(path)


def test_bad_files_fail_the_command_in_one_line(tiny_bert_dir: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\t1\nc\td\tx\n", encoding="utf-8")
    assert main(["eval", "--model", tiny_bert_dir, "--sts-file", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2: score is not a finite number: 'x'" in err[0]
    assert main(["eval", "--sts-file", str(tmp_path / "missing.tsv")]) == 2
    assert "missing.tsv does not exist" in capsys.readouterr().err
    same = tmp_path / "same.tsv"
    same.write_text("a\tb\t2\nc\td\t2\n", encoding="utf-8")
    with pytest.raises(InputError, match="every gold score is 2.0"):
        read_sts_file(same)


def test_classification_file_runs_end_to_end(tiny_bert_dir: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows = ["text\tlabel"]
    for i, s in enumerate(sentences(36, seed=3)):
        label = ("spam", "ham", "eggs")[i % 3]
        rows.append(f"{label} {s}\t{label}")  # the label word is in the text: learnable
    Path("data.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = read_classification_file("data.tsv")
    assert data.names == ["eggs", "ham", "spam"] and data.labels[:3].tolist() == [2, 1, 0]
    assert main(["eval", "--model", tiny_bert_dir, "--classification-file", "data.tsv", "--mode", "fasttest",
                 "--classifier-kernel", "torch", "--output", "report.json", "--quiet"]) == 0
    res = json.loads(Path("report.json").read_text())["custom"]["classification"]["data.tsv"]
    assert res["examples"] == 36 and res["labels"] == ["eggs", "ham", "spam"]
    assert res["protocol"] == "nested 5-fold, as MR/CR"
    assert len(res["fold_acc"]) == 5 and 0 <= res["acc"] <= 100
    assert res["acc"] == pytest.approx(np.mean(res["fold_acc"]), abs=0.01)
    assert res["classifier"]["optim"] == "rmsprop"  # fasttest's config, as MR/CR get in that mode


def test_classification_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    path.write_text("good film\tpos\nbad film\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c.tsv:2: expected 2 tab-separated fields \(text, label\), got 1"):
        read_classification_file(path)
    path.write_text("good film\tpos\nbad film\tneg\n", encoding="utf-8")
    with pytest.raises(InputError, match="needs at least 10 examples per label; too few for 'neg': 1, 'pos': 1"):
        read_classification_file(path, min_per_label=10)
