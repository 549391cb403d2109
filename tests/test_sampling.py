"""Duplicate-free batches and corpora read from disk through a line index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sentences

from diffcse.cli import main as cli_main
from diffcse.training.data import read_sentences
from diffcse.training.sampling import DistinctBatchSampler, LineCorpus, build_line_index


def duplicate_batches(keys: np.ndarray, order: np.ndarray, size: int) -> int:
    full = (len(order) // size) * size
    groups = np.sort(keys[order[:full]].reshape(-1, size), axis=1)
    return int((groups[:, 1:] == groups[:, :-1]).any(axis=1).sum())


def test_no_equal_texts_in_a_batch_and_no_sentence_lost() -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 300, 5000)  # about 17 copies of every text
    sampler = DistinctBatchSampler(keys, 16, seed=3)
    order = sampler.order()
    assert np.array_equal(np.sort(order), np.arange(5000))  # every sentence exactly once
    assert duplicate_batches(keys, order, 16) == 0
    assert sampler.moved > 0 and sampler.unavoidable == 0
    # Plain shuffling would have put duplicates together (so the check above can fail).
    assert duplicate_batches(keys, rng.permutation(5000), 16) > 0


def test_order_is_fixed_by_seed_and_epoch() -> None:
    keys = np.arange(200) % 50
    a, b = DistinctBatchSampler(keys, 8, seed=1), DistinctBatchSampler(keys, 8, seed=1)
    assert np.array_equal(a.order(), b.order())
    b.set_epoch(1)
    assert not np.array_equal(a.order(), b.order())
    assert list(iter(a)) == a.order().tolist() and len(a) == 200


def test_more_copies_than_batches_are_placed_and_counted() -> None:
    keys = np.zeros(40, dtype=np.int64)
    keys[:5] = np.arange(1, 6)
    sampler = DistinctBatchSampler(keys, 4, seed=0)
    order = sampler.order()
    assert np.array_equal(np.sort(order), np.arange(40))
    assert sampler.unavoidable > 0  # 35 copies of one text cannot fit in 10 batches of 4


def test_line_index_reads_what_the_line_reader_reads(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"first line\r\n\n   \nsecond  line\n\xc3\xa9t\xc3\xa9 here\nlast without newline")
    index = tmp_path / "idx"
    starts, lengths, keys = build_line_index(path, index)
    data = path.read_bytes()
    spans = [data[a : a + n] for a, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
    assert spans == [b"first line\r", b"second  line", "été here".encode(), b"last without newline"]
    assert len(set(keys.tolist())) == 4
    tok = None  # text() reads without tokenising
    corpus = LineCorpus(path, tok, 16, index)
    assert [corpus.text(i) for i in range(len(corpus))] == read_sentences(path).sentences
    # Reused while the file is unchanged, rebuilt when it changes.
    built = sorted(p.name for p in index.iterdir())
    LineCorpus(path, tok, 16, index)
    assert sorted(p.name for p in index.iterdir()) == built
    path.write_text("one\ntwo\n")
    assert len(LineCorpus(path, tok, 16, index)) == 2


def test_line_index_names_the_line_of_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: invalid UTF-8"):
        build_line_index(path, tmp_path / "idx")
    assert len(build_line_index(path, tmp_path / "idx2", "replace")[0]) == 3  # --encoding-errors replace
    assert not list((tmp_path / "idx").glob("*.json"))  # a failed build leaves no complete-looking index
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="has no sentences"):
        build_line_index(empty, tmp_path / "idx")


def _train(model: str, corpus: Path, out: Path, *extra: str) -> dict:
    assert cli_main([
        "train", "--model", model, "--train-file", str(corpus), "--output-dir", str(out), "--batch-size", "8",
        "--max-seq-length", "16", "--pooler", "cls", "--precision", "fp32", "--no-do-eval", "--max-steps", "4",
        "--learning-rate", "1e-3", "--save-steps", "2", *extra,
    ]) == 0
    return json.loads((out / "summary.json").read_text())


def test_disk_corpus_trains_like_the_in_memory_one(tiny_bert_dir: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(64, seed=8)) + "\n")
    mem = _train(tiny_bert_dir, corpus, tmp_path / "mem", "--corpus-loading", "memory")
    disk = _train(tiny_bert_dir, corpus, tmp_path / "disk", "--corpus-loading", "disk")
    assert mem["data"]["loading"] == "memory" and disk["data"]["loading"] == "disk"
    a = load_file(str(tmp_path / "mem" / "model.safetensors"))
    b = load_file(str(tmp_path / "disk" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "disk" / "corpus-index").is_dir()


def test_duplicates_in_the_corpus_are_kept_out_of_batches(tiny_bert_dir: str, tmp_path: Path) -> None:
    corpus = tmp_path / "dups.txt"
    texts = sentences(16, seed=1)
    corpus.write_text("\n".join(texts * 4) + "\n")  # every sentence four times
    summary = _train(tiny_bert_dir, corpus, tmp_path / "o")
    assert summary["duplicates_moved"] > 0
    plain = _train(tiny_bert_dir, corpus, tmp_path / "p", "--no-distinct-batches")
    assert plain["duplicates_moved"] is None
