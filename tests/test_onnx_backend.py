"""`--backend onnx`: ONNX Runtime's fused BERT forward gives the torch Encoder's vectors, is cached, and refuses what it cannot do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_model, sentences

from diffcse.cli import main as cli_main
from diffcse.core.encoder import Encoder
from diffcse.core.errors import InputError

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private export cache for the test."""
    monkeypatch.setenv("DIFFCSE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def one_minus_cos(a: np.ndarray, b: np.ndarray) -> float:
    """Largest 1 - cos over rows, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float((1 - (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).max())


@pytest.mark.parametrize(("arch", "pooler"), [("bert", "cls"), ("bert", "cls_before_pooler"), ("bert", "avg"),
                                              ("distilbert", "avg")])
def test_onnx_vectors_equal_torch(tmp_path: Path, cache: Path, arch: str, pooler: str) -> None:
    folder = str(build_tiny_model(tmp_path / arch, arch=arch, seed=4))
    texts = sentences(61, seed=7) + ["a", "the " * 60]  # one token, and one cut at max length
    torch_vectors = Encoder.load(folder, pooler=pooler).encode(texts, batch_size=8)
    encoder = Encoder.load(folder, pooler=pooler, backend="onnx")
    assert encoder.backend == "onnx"
    onnx_vectors = encoder.encode(texts, batch_size=8)
    assert onnx_vectors.shape == torch_vectors.shape
    assert one_minus_cos(torch_vectors, onnx_vectors) <= 1e-5
    assert np.allclose(onnx_vectors, torch_vectors, atol=1e-4)
    # The reason for the backend: ORT's attention fusion applied to the exported graph.
    (exported,) = cache.glob("*.onnx")
    ops = {node.op_type for node in onnx.load(str(exported)).graph.node}
    assert "Attention" in ops or "MultiHeadAttention" in ops, sorted(ops)


def test_export_is_cached_and_checked_when_loaded(tmp_path: Path, cache: Path) -> None:
    folder = str(build_tiny_model(tmp_path / "a", seed=1))
    Encoder.load(folder, pooler="avg", backend="onnx")
    (exported,) = cache.glob("*.onnx")
    stamp = exported.stat().st_mtime_ns
    Encoder.load(folder, pooler="avg", backend="onnx")
    assert list(cache.glob("*")) == [exported] and exported.stat().st_mtime_ns == stamp
    # Another model's export under this model's key (a stale or tampered cache) is caught by the check.
    other = str(build_tiny_model(tmp_path / "b", seed=2))
    Encoder.load(other, pooler="avg", backend="onnx")
    (other_file,) = set(cache.glob("*.onnx")) - {exported}
    other_file.replace(exported)
    with pytest.raises(RuntimeError, match=r"differs from torch by 1 - cos"):
        Encoder.load(folder, pooler="avg", backend="onnx")


def test_what_the_onnx_backend_refuses(tmp_path: Path, cache: Path, tiny_bert_dir: str, tiny_t5_dir: str) -> None:
    with pytest.raises(InputError, match="model type 't5' is not supported"):
        Encoder.load(tiny_t5_dir, pooler="avg", backend="onnx")
    with pytest.raises(InputError, match="pooler 'avg_first_last' needs every layer"):
        Encoder.load(tiny_bert_dir, pooler="avg_first_last", backend="onnx")
    with pytest.raises(InputError, match="runs in fp32"):
        Encoder.load(tiny_bert_dir, backend="onnx", precision="bf16")
    with pytest.raises(InputError, match="SentenceTransformer"):
        Encoder.load(tiny_bert_dir, pooler="st", backend="onnx")
    with pytest.raises(InputError, match="unknown backend 'tensorrt'"):
        Encoder.load(tiny_bert_dir, backend="tensorrt")
    assert not cache.exists() or not list(cache.iterdir())


def test_encode_and_search_commands_take_the_backend(tmp_path: Path, cache: Path, tiny_bert_dir: str) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(40, seed=9)) + "\n")
    for backend in ("torch", "onnx"):
        assert cli_main(["encode", "--model", tiny_bert_dir, "--pooler", "avg", "--input", str(corpus),
                         "--output", str(tmp_path / f"{backend}.npy"), "--backend", backend]) == 0
    assert one_minus_cos(np.load(tmp_path / "torch.npy"), np.load(tmp_path / "onnx.npy")) <= 1e-5
    # An index built on torch vectors is searched with ONNX vectors: same weights, so it is accepted.
    assert cli_main(["index", "build", "--model", tiny_bert_dir, "--pooler", "avg", "--input", str(corpus),
                     "--index-dir", str(tmp_path / "idx"), "--kind", "flat"]) == 0
    first = corpus.read_text().splitlines()[3]
    assert cli_main(["search", "--index-dir", str(tmp_path / "idx"), "--query", first, "--top-k", "1",
                     "--backend", "onnx"]) == 0
