"""Parsing the SentEval tree exactly as SentEval does: edge cases on small files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest_senteval import make_tree, real_data_dir

from senteval_runner import data as D


def write(path: Path, content: bytes) -> Path:
    """Write bytes, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------- STS12-16


def test_sts_empty_gold_lines_drop_pairs_and_tokens_are_rejoined(tmp_path: Path) -> None:
    """Pairs with an empty gold line vanish; the rest stay aligned; whitespace runs collapse."""
    write(tmp_path / "STS.input.x.txt", b"a  b\tc d\none\ttwo\nthree \t four  five\n")
    write(tmp_path / "STS.gs.x.txt", b"4.5\n\n1\n")
    s = D.read_sts_subset(tmp_path, "x")
    assert s.a == ["a b", "three"]
    assert s.b == ["c d", "four five"]
    assert s.gold.tolist() == [4.5, 1.0]


def test_sts_crlf_reads_like_lf(tmp_path: Path) -> None:
    """CRLF files give the same pairs and scores as LF files."""
    lf, crlf = tmp_path / "lf", tmp_path / "crlf"
    write(lf / "STS.input.x.txt", b"a b\tc\nd\te f\n")
    write(lf / "STS.gs.x.txt", b"1.5\n3\n")
    write(crlf / "STS.input.x.txt", b"a b\tc\r\nd\te f\r\n")
    write(crlf / "STS.gs.x.txt", b"1.5\r\n3\r\n")
    x, y = D.read_sts_subset(lf, "x"), D.read_sts_subset(crlf, "x")
    assert (x.a, x.b, x.gold.tolist()) == (y.a, y.b, y.gold.tolist())
    assert x.b == ["c", "e f"]


def test_sts_whitespace_gold_line_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    """Only '' means unscored (as in SentEval); a blank-but-not-empty gold line is bad data."""
    write(tmp_path / "STS.input.x.txt", b"a\tb\nc\td\n")
    write(tmp_path / "STS.gs.x.txt", b"1\n \n")
    with pytest.raises(D.SentEvalDataError, match=r"STS\.gs\.x\.txt:2: gold score"):
        D.read_sts_subset(tmp_path, "x")


def test_sts_line_count_mismatch_and_raw_four_columns_are_errors(tmp_path: Path) -> None:
    """Misaligned files and raw (4-column) STS16 inputs fail loudly with the file named."""
    write(tmp_path / "STS.input.x.txt", b"a\tb\nc\td\n")
    write(tmp_path / "STS.gs.x.txt", b"1\n")
    with pytest.raises(D.SentEvalDataError, match="STS.input.x.txt: 2 lines"):
        D.read_sts_subset(tmp_path, "x")
    write(tmp_path / "STS.input.y.txt", b"a\tb\tsrc1\tsrc2\n")
    write(tmp_path / "STS.gs.y.txt", b"1\n")
    with pytest.raises(D.SentEvalDataError, match=r"STS.input.y.txt:1: expected 2"):
        D.read_sts_subset(tmp_path, "y")


def test_sts_bad_utf8_names_the_line(tmp_path: Path) -> None:
    """STS files are UTF-8 in SentEval; an invalid byte is reported with its line number."""
    write(tmp_path / "STS.input.x.txt", b"a\tb\nc\xff\td\n")
    write(tmp_path / "STS.gs.x.txt", b"1\n2\n")
    with pytest.raises(D.SentEvalDataError, match=r"STS.input.x.txt:2: not valid utf-8"):
        D.read_sts_subset(tmp_path, "x")


def test_sts_utf8_text_is_kept(tmp_path: Path) -> None:
    """Non-ASCII UTF-8 sentences decode as text, not bytes."""
    write(tmp_path / "STS.input.x.txt", "café\tnaïve résumé\n".encode())
    write(tmp_path / "STS.gs.x.txt", b"2\n")
    assert D.read_sts_subset(tmp_path, "x").b == ["naïve résumé"]


# ---------------------------------------------------------------- STS-B and SICK


def test_stsb_nine_column_rows_use_columns_5_to_7(tmp_path: Path) -> None:
    """Extra source columns (9-column rows of the original test file) are ignored; quotes are text."""
    p = write(tmp_path / "sts-test.csv",
              b'g\tf\t2012\t0001\t3.800\tA "quoted" man .\tA man .\n'
              b"g\tf\t2012\t0002\t0.5\tx y\tz\tsrc-a\tsrc-b\n")
    s = D.read_stsb_file(p)
    assert s.a == ['A "quoted" man .', "x y"]
    assert s.b == ["A man .", "z"]
    assert s.gold.tolist() == [3.8, 0.5]


def test_stsb_short_row_and_bad_score_are_errors(tmp_path: Path) -> None:
    """A row with too few fields or a non-numeric score names file, line and field."""
    p = write(tmp_path / "sts-dev.csv", b"g\tf\t2012\t1\t1.0\ta\tb\ng\tf\t2012\t2\t1.0\ta\n")
    with pytest.raises(D.SentEvalDataError, match=r"sts-dev.csv:2: expected at least 7"):
        D.read_stsb_file(p)
    p = write(tmp_path / "sts-train.csv", b"g\tf\t2012\t1\thigh\ta\tb\n")
    with pytest.raises(D.SentEvalDataError, match=r"sts-train.csv:1: score \(column 5\)"):
        D.read_stsb_file(p)


def test_sick_crlf_header_skipped(tmp_path: Path) -> None:
    """SICK_test_annotated.txt ships with CRLF; the header line is skipped; scores parse."""
    p = write(tmp_path / "SICK_test_annotated.txt",
              b"pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\r\n"
              b"1\tA dog runs\tA  dog is running\t4.5\tENTAILMENT\r\n"
              b"2\tx\ty\t1.0\tNEUTRAL\r\n")
    s = D.read_sick_file(p)
    assert s.a == ["A dog runs", "x"] and s.b == ["A dog is running", "y"]
    assert s.gold.tolist() == [4.5, 1.0]


# ---------------------------------------------------------------- transfer tasks


def test_binary_tasks_read_latin1_and_sort_like_senteval(tmp_path: Path) -> None:
    """MR is Latin-1; examples are stably sorted by (token count, label) as SentEval sorts them."""
    write(tmp_path / "downstream" / "MR" / "rt-polarity.pos", b"caf\xe9 is nice\nok\ngood film here\n")
    write(tmp_path / "downstream" / "MR" / "rt-polarity.neg", b"bad\nvery bad film\nno\n")
    td = D.load_binary(tmp_path, "MR")
    s = td.splits["all"]
    # SentEval: samples = pos + neg as token lists, labels 1/0, sorted by (len, label).
    pos = [b"caf\xe9 is nice", b"ok", b"good film here"]
    neg = [b"bad", b"very bad film", b"no"]
    samples = [x.decode("latin-1").split() for x in pos + neg]
    labels = [1] * 3 + [0] * 3
    expected = sorted(zip(samples, labels, strict=True), key=lambda z: (len(z[0]), z[1]))
    assert s.x == [" ".join(x) for x, _ in expected]
    assert s.y.tolist() == [y for _, y in expected]
    assert "café is nice" in s.x


def test_latin1_splitlines_splits_on_nel_like_senteval(tmp_path: Path) -> None:
    """SentEval's read().splitlines() also breaks at byte 0x85 (NEL in Latin-1); we keep that."""
    write(tmp_path / "downstream" / "CR" / "custrev.pos", b"one\x85two\nthree\n")
    write(tmp_path / "downstream" / "CR" / "custrev.neg", b"four\n")
    td = D.load_binary(tmp_path, "CR")
    assert sorted(td.splits["all"].x) == ["four", "one", "three", "two"]


def test_trec_latin1_labels_and_fine_label_dropped(tmp_path: Path) -> None:
    """TREC: coarse label before ':', the fine label word removed, Latin-1 bytes decoded."""
    ds = tmp_path / "downstream" / "TREC"
    write(ds / "train_5500.label", b"NUM:date When was caf\xe9 founded ?\nHUM:ind Who wrote it ?\r\n")
    write(ds / "TREC_10.label", b"LOC:city Where is it ?\n")
    td = D.load_trec(tmp_path)
    tr = td.splits["train"]
    assert set(tr.x) == {"When was café founded ?", "Who wrote it ?"}
    assert dict(zip(tr.x, tr.y.tolist(), strict=True))["Who wrote it ?"] == D.TREC_LABELS["HUM"]
    assert td.splits["test"].y.tolist() == [D.TREC_LABELS["LOC"]]
    write(ds / "TREC_10.label", b"XYZ:city Where ?\n")
    with pytest.raises(D.SentEvalDataError, match=r"TREC_10.label:1: unknown coarse label"):
        D.load_trec(tmp_path)


def test_mrpc_bom_header_and_pair_sort(tmp_path: Path) -> None:
    """MRPC: BOM'd header dropped; pairs sorted by (len A, len B, label)."""
    ds = tmp_path / "downstream" / "MRPC"
    body = ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            "1\t1\t2\ta b c\td e\n0\t3\t4\tx\ty z w\n1\t5\t6\tx\ty\n")
    write(ds / "msr_paraphrase_train.txt", body.encode())
    write(ds / "msr_paraphrase_test.txt", body.encode())
    s = D.load_mrpc(tmp_path).splits["train"]
    assert s.x == ["x", "x", "a b c"] and s.x2 == ["y", "y z w", "d e"]
    assert s.y.tolist() == [1, 0, 1]


def test_sst_bad_label_is_an_error(tmp_path: Path) -> None:
    """A non-integer SST label names file, line and column."""
    p = write(tmp_path / "sentiment-dev", b"a fine film\t1\nawful\tneg\n")
    with pytest.raises(D.SentEvalDataError, match=r"sentiment-dev:2: label"):
        D.read_sst_file(p)


# ---------------------------------------------------------------- data dir resolution


def test_resolve_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """explicit arg > $SENTEVAL_DATA > $DIFFCSE_DATA_DIR/senteval; downstream/ itself is accepted."""
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    for p in (a, b, c / "senteval"):
        (p / "downstream").mkdir(parents=True)
    monkeypatch.setenv("SENTEVAL_DATA", str(b))
    monkeypatch.setenv("DIFFCSE_DATA_DIR", str(c))
    assert D.resolve_data_dir(str(a)) == a
    assert D.resolve_data_dir(str(a / "downstream")) == a
    assert D.resolve_data_dir(None) == b
    monkeypatch.delenv("SENTEVAL_DATA")
    assert D.resolve_data_dir(None) == c / "senteval"


def test_missing_data_names_path_and_download_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing tree or file is an error that names the path and `bash data/download_senteval.sh`."""
    monkeypatch.setenv("SENTEVAL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(D.SentEvalDataMissing, match=r"nowhere.*download_senteval\.sh"):
        D.resolve_data_dir(None)
    root = make_tree(tmp_path / "tree", n_classif=8)
    (root / "downstream" / "MR" / "rt-polarity.neg").unlink()
    with pytest.raises(D.SentEvalDataMissing, match=r"rt-polarity\.neg.*download_senteval\.sh"):
        D.load_task(root, "MR")


# ---------------------------------------------------------------- the real data (skips without it)

EXPECTED_COUNTS = {
    "STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
    "MR": 10662, "CR": 3775, "SUBJ": 10000, "MPQA": 10606,
}


@pytest.mark.data
def test_real_tree_counts_match_the_literature() -> None:
    """Every task parses and has the published number of examples."""
    root = real_data_dir()
    if root is None:
        pytest.skip("DIFFCSE_DATA_DIR/senteval not available")
    for task, n in EXPECTED_COUNTS.items():
        td = D.load_task(root, task)
        assert sum(len(s) for s in td.splits.values()) == n, task
    assert len(D.load_task(root, "STSBenchmark", ("dev", "test")).splits["test"]) == 1379
    assert len(D.load_task(root, "SICKRelatedness", ("test",)).splits["test"]) == 4927
    sst = D.load_task(root, "SST2")
    assert [len(sst.splits[k]) for k in ("train", "dev", "test")] == [67349, 872, 1821]
    trec = D.load_task(root, "TREC")
    assert (len(trec.splits["train"]), len(trec.splits["test"])) == (5452, 500)
    mrpc = D.load_task(root, "MRPC")
    assert (len(mrpc.splits["train"]), len(mrpc.splits["test"])) == (4076, 1725)
    assert int(mrpc.splits["train"].y.sum()) == 2753
    assert np.isin(trec.splits["train"].y, np.arange(6)).all()
