"""Shared fixtures: tiny random HF models built from a config, saved to a tmp dir (offline, fast)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

WORDS = (
    "a the man woman child dog cat plays play playing guitar piano music is are was were on in at "
    "of to and or with without eats food bread apple runs run fast slow red blue green big small "
    "house car road street city park sits sleeps talks speaks reads book news day night good bad "
    "happy sad new old young people two three one some many not very quite this that it he she "
    "they we you i movie film great terrible boring fun love hate like story actor"
).split()


def write_vocab(folder: Path) -> Path:
    """Write a small uncased WordPiece vocabulary: specials, words, letters and ## pieces."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens = specials + sorted(set(WORDS)) + chars + ["##" + c for c in string.ascii_lowercase]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    return path


def build_tiny_model(folder: Path, arch: str = "bert", seed: int = 0, layers: int = 2) -> Path:
    """Save a tiny random BERT, DistilBERT or T5 encoder (model + fast tokenizer) to folder."""
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizerFast,
        DistilBertConfig,
        DistilBertModel,
    )

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if arch != "t5":
        vocab = write_vocab(folder)
        # from_pretrained reads vocab.txt on transformers 4 and 5 alike (v5's constructor ignores vocab_file=).
        tokenizer = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True, model_max_length=64)
        n_vocab = len(vocab.read_text().split())
    if arch == "bert":
        config = BertConfig(
            vocab_size=n_vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64,
        )
        model = BertModel(config)
    elif arch == "distilbert":
        config = DistilBertConfig(
            vocab_size=n_vocab, dim=32, n_layers=layers, n_heads=2, hidden_dim=64,
            max_position_embeddings=64,
        )
        model = DistilBertModel(config)
    elif arch == "t5":
        from transformers import T5Config, T5EncoderModel

        tokenizer = t5_style_tokenizer()
        config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=layers, num_heads=2,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        model = T5EncoderModel(config)
    else:
        raise ValueError(arch)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def t5_style_tokenizer() -> object:
    """A small Unigram (sentencepiece-style) fast tokenizer over the test words, appending </s> as T5 does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "</s>", "<unk>"] + ["▁" + w for w in sorted(set(WORDS))] + list(string.ascii_lowercase)
    backend = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=64)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT folder (2 layers, hidden 32) with its tokenizer."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def tiny_distilbert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random DistilBERT folder sharing the tiny BERT's vocabulary."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_distilbert"), arch="distilbert"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random T5 encoder (Sentence-T5's backbone) with a Unigram tokenizer."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_t5"), arch="t5"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data root (DIFFCSE_DATA_DIR); tests that need it skip when it is absent."""
    root = os.environ.get("DIFFCSE_DATA_DIR")
    if not root or not Path(root, "senteval").exists():
        pytest.skip("DIFFCSE_DATA_DIR with senteval/ is not set")
    return Path(root)


def sentences(n: int, seed: int = 0, words: int | None = None) -> list[str]:
    """Deterministic pseudo-sentences of the tiny vocabulary's words (each one token)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words or rng.randint(3, 12))) for _ in range(n)]
