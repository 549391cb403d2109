"""Sentence-T5: a T5 encoder folder trains, evaluates, exports to sentence-transformers and searches like BERT."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import sentences

from diffcse.cli import main as cli_main
from diffcse.core.encoder import Encoder
from diffcse.core.modeling import SentenceEncoder


def test_t5_encoder_loads_the_encoder_stack_and_falls_back_to_padding(
    tiny_t5_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    enc = SentenceEncoder.from_pretrained(tiny_t5_dir, pooler="avg", head="none")
    assert type(enc.backbone).__name__ == "T5EncoderModel"
    with caplog.at_level(logging.WARNING):
        assert enc.enable_packing() is False  # relative positions: a packed row is not exact
    assert "packing: off for T5EncoderModel, it runs padded" in caplog.text


def test_t5_trains_exports_evaluates_and_searches(tiny_t5_dir: str, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(sentences(48, seed=6)) + "\n")
    out = tmp_path / "run"
    assert cli_main(["train", "--model", tiny_t5_dir, "--train-file", str(corpus), "--output-dir", str(out),
                     "--batch-size", "8", "--max-steps", "3", "--no-do-eval", "--precision", "fp32",
                     "--pooler", "avg", "--max-seq-length", "16", "--learning-rate", "1e-3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["packing"] == {"encoder": False}
    texts = ["a man plays guitar", "the dog runs in the park"]
    ours = Encoder.load(str(out), device="cpu").encode(texts, normalize=True)
    st = SentenceTransformer(str(out), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.allclose((ours * st).sum(1), 1.0, atol=1e-5)
    before = Encoder.load(tiny_t5_dir, pooler="avg", device="cpu").encode(texts, normalize=True)
    assert not np.allclose(before, ours)  # training moved it
    index_dir = tmp_path / "idx"
    assert cli_main(["index", "build", "--model", str(out), "--input", str(corpus), "--index-dir", str(index_dir)]) == 0
    from diffcse.search import SearchIndex

    with SearchIndex.load(index_dir, encoder="auto") as index:
        hit = index.search(sentences(48, seed=6)[5], top_k=1)[0]
    assert hit.text == sentences(48, seed=6)[5]
