"""SearchIndex with a real (tiny, random) encoder: build/search/add by text, model checks, streaming, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import build_tiny_model, sentences  # noqa: E402

from diffcse.cli import main  # noqa: E402
from diffcse.core.encoder import Encoder  # noqa: E402
from diffcse.search import (  # noqa: E402
    EmptyQueryError,
    IndexMismatchError,
    SearchIndex,
    SearchIndexError,
    read_manifest,
)

# One faiss thread: tiny k-means jobs (PQ training) run 5-10x slower when 2 OpenMP threads spin on
# 2 shared, busy cores; nothing here needs faiss parallelism to be tested.
faiss.omp_set_num_threads(1)
TEXTS = sentences(300, seed=3)
QUERIES = ["a man plays guitar", "the dog runs in the park", "she reads a good book"]


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: str) -> Encoder:
    """The tiny BERT with mean pooling (its [CLS] vectors are all near-parallel when random)."""
    return Encoder.load(tiny_bert_dir, pooler="avg")


@pytest.fixture(scope="module")
def corpus_vectors(encoder: Encoder) -> np.ndarray:
    """Normalised vectors of TEXTS, for brute-force checks."""
    return encoder.encode(TEXTS, normalize=True)


class RecordingEncoder(Encoder):
    """A real Encoder that records how many texts each encode call receives (to check streaming)."""

    calls: list[int]

    def encode(self, texts, batch_size=64, normalize=None, show_progress=False):  # noqa: ANN001, ANN201
        """Encode, remembering the batch length."""
        texts = list(texts)
        self.calls.append(len(texts))
        return super().encode(texts, batch_size=batch_size, normalize=normalize, show_progress=show_progress)


def test_flat_text_search_matches_brute_force(encoder: Encoder, corpus_vectors: np.ndarray) -> None:
    idx = SearchIndex.build(encoder, TEXTS, kind="flat", metadata=[{"i": i} for i in range(len(TEXTS))])
    q = encoder.encode(QUERIES, normalize=True)
    sims = q @ corpus_vectors.T
    results = idx.search(QUERIES, top_k=5)
    for i, hits in enumerate(results):
        np.testing.assert_allclose([h.score for h in hits], np.sort(sims[i])[::-1][:5], atol=1e-5)
        for h in hits:
            assert h.text == TEXTS[h.id] and h.metadata == {"i": h.id}
            assert h.score == pytest.approx(float(sims[i, h.id]), abs=1e-5)
    one = idx.search(QUERIES[0], top_k=5)
    assert [h.id for h in one] == [h.id for h in results[0]]
    # An indexed sentence finds itself first, with cosine 1.
    assert idx.search(TEXTS[17], top_k=1)[0].score == pytest.approx(1.0, abs=1e-5)
    ranked = np.sort(sims[1])[::-1]
    cut = float(ranked[2] + ranked[3]) / 2  # midway, so float noise cannot move a hit across it
    assert ranked[2] - ranked[3] > 1e-5
    hits = idx.search(QUERIES, top_k=5, threshold=cut)[1]
    assert [h.id for h in hits] == [h.id for h in results[1][:3]]


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_text_build_each_kind(encoder: Encoder, corpus_vectors: np.ndarray, kind: str, tmp_path: Path) -> None:
    params = {"m": 8} if kind == "ivfpq" else None
    idx = SearchIndex.build(encoder, TEXTS, kind=kind, params=params, chunk_size=128)
    assert len(idx) == len(TEXTS)
    q = encoder.encode(QUERIES, normalize=True)
    exact = np.argsort(-(q @ corpus_vectors.T), axis=1)[:, :5]
    got = idx.search(QUERIES, top_k=5, nprobe=10_000, ef_search=512)
    recall = np.mean([len({h.id for h in row} & set(exact[i])) / 5 for i, row in enumerate(got)])
    assert recall >= (0.6 if kind == "ivfpq" else 1.0)
    idx.save(tmp_path / kind)
    loaded = SearchIndex.load(tmp_path / kind, encoder=encoder)
    assert loaded.search(QUERIES, top_k=5) == idx.search(QUERIES, top_k=5)


def test_streaming_build_is_chunked(tiny_bert_dir: str, corpus_vectors: np.ndarray) -> None:
    enc = RecordingEncoder.load(tiny_bert_dir, pooler="avg")
    enc.calls = []
    pulled = []

    def stream():  # a one-pass generator, as from a huge file
        for i, t in enumerate(TEXTS):
            pulled.append(i)
            yield t

    idx = SearchIndex.build(enc, stream(), kind="ivf", params={"train_size": 100}, chunk_size=64)
    assert len(idx) == len(TEXTS)
    # Training buffers the first train_size texts; after that every encode sees at most one chunk.
    assert max(enc.calls) <= 100 and max(enc.calls[1:]) <= 64, enc.calls
    assert sum(enc.calls) == len(TEXTS)
    hits = idx.search_vectors(corpus_vectors[250], top_k=1, nprobe=10_000)[0]
    assert (hits[0].id, hits[0].text) == (250, TEXTS[250])


def test_ivf_sequence_build_trains_on_random_sample(tiny_bert_dir: str) -> None:
    enc = RecordingEncoder.load(tiny_bert_dir, pooler="avg")
    enc.calls = []
    SearchIndex.build(enc, TEXTS, kind="ivf", params={"train_size": 50}, chunk_size=100)
    assert enc.calls == [50, 100, 100, 100]


def test_wrong_model_and_dimension_are_refused(
    encoder: Encoder, tiny_bert_dir: str, tiny_distilbert_dir: str, tmp_path: Path
) -> None:
    idx = SearchIndex.build(encoder, TEXTS[:50], kind="flat")
    path = idx.save(tmp_path / "idx")
    other = Encoder.load(tiny_distilbert_dir, pooler="avg")
    with pytest.raises(IndexMismatchError, match=r"built with model .*tiny_bert.* but the encoder given is .*tiny_distilbert"):
        SearchIndex.load(path, encoder=other)
    with pytest.raises(IndexMismatchError, match="built with model"):
        idx.attach_encoder(other)
    same_weights_other_pooling = Encoder.load(tiny_bert_dir, pooler="cls")
    with pytest.raises(IndexMismatchError, match="pooler 'avg'"):
        SearchIndex.load(path, encoder=same_weights_other_pooling)
    small = SearchIndex.create(16, "flat")
    with pytest.raises(IndexMismatchError, match="gives dimension 32 but the index has dimension 16"):
        small.attach_encoder(encoder)
    small.add_vectors(np.eye(16)[:3], ["a", "b", "c"])
    small.save(tmp_path / "small")
    with pytest.raises(IndexMismatchError, match="has dimension 16 but encoder .* gives 32"):
        SearchIndex.load(tmp_path / "small", encoder=encoder)
    # 'auto' reloads the recorded model (with its pooling) and searches like the original.
    auto = SearchIndex.load(path, encoder="auto")
    assert auto.search(QUERIES, top_k=3) == idx.search(QUERIES, top_k=3)


def test_text_input_errors(encoder: Encoder) -> None:
    idx = SearchIndex.build(encoder, TEXTS[:20], kind="flat")
    with pytest.raises(EmptyQueryError, match="query #1 is empty"):
        idx.search(["fine", "   "])
    with pytest.raises(EmptyQueryError, match="no queries"):
        idx.search([])
    with pytest.raises(SearchIndexError, match="query #0 is int"):
        idx.search([3])
    with pytest.raises(SearchIndexError, match="not one string"):
        idx.add("just one string")
    bare = SearchIndex.create(32, "flat")
    with pytest.raises(SearchIndexError, match="no encoder"):
        bare.search("hello")
    ids = idx.add(["a brand new sentence"], [{"src": "test"}])
    assert ids == [20] and idx.search("a brand new sentence", top_k=1)[0].metadata == {"src": "test"}


def run_cli(*argv: str) -> int:
    """Run `diffcse ...` in-process."""
    return main(list(argv))


def test_cli_build_add_search_delete(tiny_bert_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS[:200]) + "\n\n")
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"text": "a man plays guitar", "metadata": {"src": "jsonl"}}) + "\n")
    idx_dir = tmp_path / "idx"
    common = ["--threads", "2", "--batch-size", "32"]
    assert run_cli("index", "build", "--model", tiny_bert_dir, "--pooler", "avg", "--input", str(corpus),
                   "--index-dir", str(idx_dir), "--type", "hnsw", "--ef-search", "64", *common) == 0
    assert read_manifest(idx_dir).count == 200 and read_manifest(idx_dir).params["ef_search"] == 64
    assert run_cli("index", "add", "--index-dir", str(idx_dir), "--input", str(more), *common) == 0
    capsys.readouterr()
    assert run_cli("search", "--index-dir", str(idx_dir), "--query", "a man plays guitar", "--query", TEXTS[5],
                   "--top-k", "3", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in out] == ["a man plays guitar", TEXTS[5]]
    first = out[0]["results"][0]
    assert (first["id"], first["text"], first["metadata"]) == (200, "a man plays guitar", {"src": "jsonl"})
    assert first["score"] == pytest.approx(1.0, abs=1e-5) and len(out[1]["results"]) == 3
    assert run_cli("search", "--index-dir", str(idx_dir), "--query", TEXTS[5], "--top-k", "3", "--threshold", "0.999999") == 0
    table = capsys.readouterr().out
    assert f"[5]  {TEXTS[5]}" in table and table.count("\n") == 2
    assert run_cli("index", "delete", "--index-dir", str(idx_dir), "--ids", "200", "5") == 0
    assert read_manifest(idx_dir).count == 199
    capsys.readouterr()
    assert run_cli("search", "--index-dir", str(idx_dir), "--query", "a man plays guitar", "--top-k", "200", "--json") == 0
    ids = {r["id"] for r in json.loads(capsys.readouterr().out)[0]["results"]}
    assert 200 not in ids and 5 not in ids and len(ids) == 199


def test_cli_errors(tiny_bert_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS[:30]) + "\n")
    idx_dir = tmp_path / "idx"
    assert run_cli("index", "build", "--model", tiny_bert_dir, "--input", str(tmp_path / "missing.txt"),
                   "--index-dir", str(idx_dir)) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert run_cli("index", "build", "--model", tiny_bert_dir, "--input", str(corpus), "--index-dir", str(idx_dir)) == 0
    assert run_cli("index", "build", "--model", tiny_bert_dir, "--input", str(corpus), "--index-dir", str(idx_dir)) == 2
    assert "--overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    assert run_cli("index", "add", "--index-dir", str(idx_dir), "--input", str(bad)) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert read_manifest(idx_dir).count == 30  # nothing half-added on disk
    assert run_cli("search", "--index-dir", str(idx_dir)) == 2
    assert "no query given" in capsys.readouterr().err
    assert run_cli("search", "--index-dir", str(idx_dir), "--query", "hello", "--model", str(build_tiny_model(tmp_path / "other", seed=7))) == 2
    assert "built with model" in capsys.readouterr().err
    gen = idx_dir / read_manifest(idx_dir).generation
    (gen / "index.faiss").write_bytes((gen / "index.faiss").read_bytes()[:-10])
    assert run_cli("search", "--index-dir", str(idx_dir), "--query", "hello") == 2
    assert "index.faiss is" in capsys.readouterr().err
