"""BERT-style token masking (80% [MASK] / 10% random / 10% unchanged) that never touches specials or padding."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id the tokenizer treats as special ([CLS], [SEP], [PAD], [MASK], <s>, ...)."""
    ids = set(tokenizer.all_special_ids)
    # added special tokens (e.g. a tokenizer extended with markers) are special too
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return sorted(i for i in ids if i is not None)


# WordPiece vocabularies (BERT's) reserve never-trained placeholder rows: [unused0] ... [unused993].
PLACEHOLDER_TOKEN = re.compile(r"^\[unused\d+\]$")


def placeholder_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the vocabulary's reserved placeholders ([unusedN]): tokenisation never produces them."""
    return sorted(i for tok, i in tokenizer.get_vocab().items() if PLACEHOLDER_TOKEN.match(tok))


def unusable_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that are never a real replacement token: the specials plus the placeholders."""
    return sorted(set(special_token_ids(tokenizer)) | set(placeholder_token_ids(tokenizer)))


def ordinary_token_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Vocabulary ids that are neither special nor placeholders: the pool random replacements are drawn from."""
    unusable = set(unusable_token_ids(tokenizer))
    return torch.tensor([i for i in range(len(tokenizer)) if i not in unusable], dtype=torch.long)


@dataclass
class MaskedBatch:
    """The masked input ids and which positions were selected for prediction."""

    input_ids: torch.Tensor
    selected: torch.Tensor  # bool, same shape as input_ids


class TokenMasker:
    """Select each ordinary token with probability `ratio`; of those, 80% → [MASK], 10% → random, 10% kept.

    As in BERT's (and DiffCSE's) data collator, selection is an independent Bernoulli draw per token;
    special tokens and padding are never selected. Random replacements come from the non-special,
    non-placeholder vocabulary, so a masked view never gains a spurious [SEP], [PAD] or [unused5].
    """

    def __init__(
        self,
        mask_token_id: int,
        special_ids: list[int],
        ordinary_ids: torch.Tensor,
        ratio: float = 0.30,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
    ) -> None:
        if not 0 < ratio < 1:
            raise ValueError(f"mask_ratio: must be in (0, 1), got {ratio}")
        if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
            raise ValueError("mask fractions must be >= 0 and sum to at most 1")
        if len(ordinary_ids) == 0:
            raise ValueError("the vocabulary has no non-special tokens to draw replacements from")
        self.mask_token_id = int(mask_token_id)
        self.special_ids = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.ordinary_ids = ordinary_ids.long()
        self.ratio = ratio
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, ratio: float) -> TokenMasker:
        """Build a masker from the tokenizer's own [MASK] and special-token ids."""
        if tokenizer.mask_token_id is None:
            raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no mask token; DiffCSE needs one")
        return cls(tokenizer.mask_token_id, special_token_ids(tokenizer), ordinary_token_ids(tokenizer), ratio)

    def maskable(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions that may be selected: attended and not a special token."""
        special = torch.isin(input_ids, self.special_ids.to(input_ids.device))
        return attention_mask.bool() & ~special

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> MaskedBatch:
        """Mask a [B, L] batch; every row (view) gets its own independent draw."""
        device = input_ids.device
        probs = torch.full(input_ids.shape, self.ratio, device=device)
        selected = torch.bernoulli(probs, generator=generator).bool() & self.maskable(input_ids, attention_mask)
        # One uniform draw per position splits the selected ones into [MASK] / random / kept.
        u = torch.rand(input_ids.shape, device=device, generator=generator)
        to_mask = selected & (u < self.mask_fraction)
        to_random = selected & (u >= self.mask_fraction) & (u < self.mask_fraction + self.random_fraction)
        out = input_ids.clone()
        out[to_mask] = self.mask_token_id
        pool = self.ordinary_ids.to(device)
        picks = torch.randint(len(pool), (int(to_random.sum()),), device=device, generator=generator)
        out[to_random] = pool[picks]
        return MaskedBatch(out, selected)
