"""WordPiece placeholders ([unused0] ...) are never a generator's or the masker's replacement token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import sentences, write_vocab
from transformers import BertConfig, BertModel, BertTokenizerFast

from diffcse.training.objectives.generators import (
    EmbeddingNeighboursGenerator,
    RandomGenerator,
    build_generator,
)
from diffcse.training.objectives.masking import (
    TokenMasker,
    ordinary_token_ids,
    placeholder_token_ids,
    special_token_ids,
    unusable_token_ids,
)

N_UNUSED = 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizerFast:
    """The tiny vocabulary laid out like bert-base-uncased's: [PAD], [unused0..9], [UNK] ... [MASK], [unused10..19], words.

    Near-misses of the placeholder pattern are ordinary tokens and must stay candidates.
    """
    folder = tmp_path_factory.mktemp("unused_vocab")
    words = [t for t in write_vocab(folder).read_text().split() if not t.startswith("[")]
    unused = [f"[unused{i}]" for i in range(N_UNUSED)]
    tokens = ["[PAD]", *unused[:10], "[UNK]", "[CLS]", "[SEP]", "[MASK]", *unused[10:], *words, "unused", "##unused"]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True, model_max_length=64)


@pytest.fixture(scope="module")
def unused_ids(tok: BertTokenizerFast) -> torch.Tensor:
    ids = tok.convert_tokens_to_ids([f"[unused{i}]" for i in range(N_UNUSED)])
    assert tok.unk_token_id not in ids
    return torch.tensor(ids)


def backbone_with_placeholders_nearest(tok: BertTokenizerFast, unused_ids: torch.Tensor) -> BertModel:
    """A tiny BERT whose every placeholder row copies an ordinary token's row (cosine 1: its nearest neighbour)."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    ))
    weight = model.get_input_embeddings().weight
    targets = tok.convert_tokens_to_ids(["dog", "cat", "the", "a", "man", "plays", "music", "red", "car", "book"])
    with torch.no_grad():
        for n, i in enumerate(unused_ids.tolist()):
            weight[i] = weight[targets[n % len(targets)]] * (1.0 + 0.01 * n)
    return model


def test_placeholders_are_unusable_but_near_misses_are_ordinary(tok: BertTokenizerFast, unused_ids: torch.Tensor) -> None:
    assert placeholder_token_ids(tok) == sorted(unused_ids.tolist())
    assert not set(unused_ids.tolist()) & set(special_token_ids(tok))  # the tokenizer itself does not flag them
    assert set(unusable_token_ids(tok)) == set(special_token_ids(tok)) | set(unused_ids.tolist())
    pool = ordinary_token_ids(tok)
    assert not torch.isin(pool, unused_ids).any()
    assert not torch.isin(pool, torch.tensor(special_token_ids(tok))).any()
    assert {"unused", "##unused", "dog"} <= set(tok.convert_ids_to_tokens(pool.tolist()))
    assert len(pool) == len(tok) - N_UNUSED - len(special_token_ids(tok))


def test_neighbours_never_include_placeholders(tok: BertTokenizerFast, unused_ids: torch.Tensor) -> None:
    backbone = backbone_with_placeholders_nearest(tok, unused_ids)
    gen = build_generator("embedding-neighbours", tok, backbone, k=3)
    assert isinstance(gen, EmbeddingNeighboursGenerator)
    assert not torch.isin(gen.table, unused_ids).any()
    assert not torch.isin(gen.table, torch.tensor(special_token_ids(tok))).any()
    # The copies really are the nearest rows: with only the specials excluded they would be chosen.
    plain = EmbeddingNeighboursGenerator(backbone.get_input_embeddings().weight, special_token_ids(tok), k=3)
    assert torch.isin(plain.table, unused_ids).any()
    enc = tok(sentences(64, seed=3), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    selected = mask.bool() & (ids != tok.cls_token_id) & (ids != tok.sep_token_id)
    out = gen(ids, ids, mask, selected)
    assert not torch.isin(out, unused_ids).any()


def test_random_replacements_never_placeholders(tok: BertTokenizerFast, unused_ids: torch.Tensor) -> None:
    backbone = backbone_with_placeholders_nearest(tok, unused_ids)
    gen = build_generator("random", tok, backbone)
    assert isinstance(gen, RandomGenerator)
    assert not torch.isin(gen.pool, unused_ids).any()
    enc = tok(sentences(400, seed=4), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    selected = mask.bool() & (ids != tok.cls_token_id) & (ids != tok.sep_token_id)
    torch.manual_seed(0)
    out = gen(ids, ids, mask, selected)
    assert int(selected.sum()) > 2000  # ~13% of the vocabulary is placeholders: unfiltered draws would hit them
    assert not torch.isin(out, unused_ids).any()
    # The masker's 10% random replacements draw from the same pool.
    masked = TokenMasker.from_tokenizer(tok, 0.5)(ids, mask, generator=torch.Generator().manual_seed(0))
    assert not torch.isin(masked.input_ids, unused_ids).any()


def test_vocabulary_without_placeholders_is_unchanged(tiny_bert_dir: str) -> None:
    tok = BertTokenizerFast.from_pretrained(tiny_bert_dir)
    assert placeholder_token_ids(tok) == []
    assert unusable_token_ids(tok) == special_token_ids(tok)
    assert len(ordinary_token_ids(tok)) == len(tok) - len(special_token_ids(tok))


def test_placeholder_pattern_is_exact(tmp_path: Path) -> None:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused7]", "[unused]", "[unused7x]", "x[unused7]", "[UNUSED8]", "word"]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(tmp_path))
    assert tok.convert_ids_to_tokens(placeholder_token_ids(tok)) == ["[unused7]"]
