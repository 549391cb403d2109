"""`diffcse mine`: hard negatives outside the skipped window and under the margin, clear errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_model, sentences

from diffcse.cli import main as cli_main
from diffcse.core.encoder import Encoder
from diffcse.search.index import SearchIndex
from diffcse.search.mine import mine


@pytest.fixture()
def pairs_and_corpus(tmp_path: Path) -> tuple[Path, Path, list[tuple[str, str]], list[str]]:
    corpus = sentences(120, seed=21)
    pairs = [(corpus[i], corpus[i + 1]) for i in range(0, 20, 2)]
    pair_file = tmp_path / "pairs.csv"
    with open(pair_file, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sent0", "sent1", "note"])
        w.writerows([(a, b, "x") for a, b in pairs])
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(corpus) + "\n")
    return pair_file, corpus_file, pairs, corpus


@pytest.mark.parametrize(("skip_top", "depth", "margin"), [(10, 50, 0.95), (0, 5, 2.0), (3, 30, 0.5)])
def test_negatives_lie_outside_the_window_and_under_the_margin(
    tiny_bert_dir: str, pairs_and_corpus: tuple, skip_top: int, depth: int, margin: float
) -> None:
    _, _, pairs, corpus = pairs_and_corpus
    enc = Encoder.load(tiny_bert_dir, device="cpu")
    index = SearchIndex.build(enc, corpus)
    rows, stats = mine(enc, index, pairs, skip_top, depth, margin)
    assert stats.pairs == len(pairs) == stats.written + stats.no_candidate and stats.written == len(rows)
    unit = {t: v for t, v in zip(corpus, enc.encode(corpus, normalize=True), strict=True)}
    for anchor, positive, negative in rows:
        a = enc.encode([anchor], normalize=True)[0]
        scores = np.array([unit[t] @ a for t in corpus])
        rank = int((scores > unit[negative] @ a + 1e-6).sum()) + 1  # brute force, 1-based
        assert skip_top < rank <= depth
        assert negative not in (anchor, positive)
        pos = enc.encode([positive], normalize=True)[0] @ a
        assert unit[negative] @ a <= margin * pos + 1e-6
    if margin == 0.5:
        assert stats.dropped_by_margin > 0  # the filter did act (so the margin check above is not vacuous)


def test_mine_command_writes_what_sup_simcse_reads(tiny_bert_dir: str, pairs_and_corpus: tuple, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from diffcse.training.data import read_triples

    pair_file, corpus_file, pairs, _ = pairs_and_corpus
    out = tmp_path / "triples.csv"
    rc = cli_main(["mine", "--model", tiny_bert_dir, "--pairs", str(pair_file), "--corpus", str(corpus_file),
                   "--output", str(out), "--skip-top", "2", "--depth", "20", "--margin", "5"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    triples = read_triples(out)
    assert len(triples) == len(pairs) and all(len(t) == 3 for t in triples)
    # The same from a saved index (its recorded model encodes the pairs).
    index_dir = tmp_path / "idx"
    assert cli_main(["index", "build", "--model", tiny_bert_dir, "--input", str(corpus_file), "--index-dir", str(index_dir)]) == 0
    out2 = tmp_path / "triples2.csv"
    assert cli_main(["mine", "--index-dir", str(index_dir), "--pairs", str(pair_file), "--output", str(out2),
                     "--skip-top", "2", "--depth", "20", "--margin", "5"]) == 0
    assert read_triples(out2) == triples


def test_bad_input_is_a_clear_error(tiny_bert_dir: str, pairs_and_corpus: tuple, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    pair_file, corpus_file, _, _ = pairs_and_corpus
    bad = tmp_path / "bad.csv"
    bad.write_text("sent0,positive\na,b\n")
    assert cli_main(["mine", "--model", tiny_bert_dir, "--pairs", str(bad), "--corpus", str(corpus_file),
                     "--output", str(tmp_path / "o.csv")]) == 2
    assert "lacks the column 'sent1'" in capsys.readouterr().err
    # An index built with another model than the one given.
    other = build_tiny_model(tmp_path / "other", seed=5)
    index_dir = tmp_path / "idx"
    assert cli_main(["index", "build", "--model", str(other), "--input", str(corpus_file), "--index-dir", str(index_dir)]) == 0
    capsys.readouterr()
    assert cli_main(["mine", "--model", tiny_bert_dir, "--index-dir", str(index_dir), "--pairs", str(pair_file),
                     "--output", str(tmp_path / "o.csv")]) == 2
    assert "was built with model" in capsys.readouterr().err
    assert cli_main(["mine", "--model", tiny_bert_dir, "--pairs", str(pair_file), "--output", str(tmp_path / "o.csv")]) == 2
    assert "exactly one of --corpus and --index-dir" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()
