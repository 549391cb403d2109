"""Padding-free training forwards: a batch's real tokens packed into one row.

A SimCSE batch of wiki sentences cut at 32 tokens is about a third padding, and a padded
forward spends the same FLOPs on a pad as on a word. Packing lays the batch's real tokens end to
end ([1, T] with T = number of real tokens), so every Linear/LayerNorm/GELU/dropout runs on real
tokens only; attention alone re-pads per sentence (it is a few percent of the FLOPs at these
lengths) so no token attends across sentences. The result equals the padded forward to float
rounding; dropout draws differ only in order.

Built on transformers' own extension points: an attention function registered with
`AttentionInterface` (plain SDPA whenever no packing is passed, so the model behaves as usual) and
the SDPA mask function under the same name. `enable_packing` switches a backbone over only after
checking, on a tiny batch, that packed and padded outputs agree; models that take positions
differently (or not at all) are left padded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from diffcse.core.dropout import fast_dropout, use_fast_dropout

log = logging.getLogger(__name__)

ATTENTION = "diffcse_packed"
PACKING_KWARG = "diffcse_packing"
# Architectures whose learned positions start after the padding id (fairseq convention).
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet")


@dataclass
class Packing:
    """Where each real token of a padded [B, L] batch sits in the packed [1, T] row."""

    batch: int
    length: int
    index: torch.Tensor  # [T] flat positions (row * L + col) of the real tokens
    starts: torch.Tensor  # [B] packed position of each row's first token
    columns: torch.Tensor  # [T] each token's position within its own row
    key_mask: torch.Tensor  # [B, 1, 1, L] bool, True where a key is a real token
    fast_dropout: bool = False  # attention-probability dropout via diffcse.core.dropout's mask

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing | None:
        """Describe the packing of a right-padded [B, L] mask; None if it is not one (then run padded)."""
        b, length = attention_mask.shape
        real = attention_mask.bool()
        lengths = real.sum(1)
        if bool((lengths == 0).any()):
            return None
        if not bool((real == (torch.arange(length, device=real.device) < lengths.unsqueeze(1))).all()):
            return None
        index = real.reshape(-1).nonzero().squeeze(1)
        starts = torch.cumsum(lengths, 0) - lengths
        return cls(b, length, index, starts, index % length, real[:, None, None, :])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] → [1, T, ...] keeping only the real tokens."""
        return x.reshape(self.batch * self.length, *x.shape[2:])[self.index].unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, T, ...] → [B, L, ...] with zeros at the padding."""
        flat = x[0]
        out = flat.new_zeros(self.batch * self.length, *flat.shape[1:]).index_copy(0, self.index, flat)
        return out.view(self.batch, self.length, *flat.shape[1:])


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """SDPA over each sentence of a packed row (re-padded for this op only); plain SDPA otherwise."""
    packing = kwargs.pop(PACKING_KWARG, None)
    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    assert isinstance(packing, Packing)
    heads, dim = query.size(1), query.size(3)

    def pad(x: torch.Tensor) -> torch.Tensor:
        # [1, heads, T, d] → [B, heads, L, d]
        rows = x[0].transpose(0, 1)
        full = rows.new_zeros(packing.batch * packing.length, heads, dim).index_copy(0, packing.index, rows)
        return full.view(packing.batch, packing.length, heads, dim).transpose(1, 2)

    q, k, v = pad(query), pad(key), pad(value)
    if dropout > 0.0 and packing.fast_dropout:
        # SDPA with dropout on CPU takes a path 3.5x slower than without; this is its math with
        # the cheaper mask (same law).
        scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else dim**-0.5)
        probs = scores.masked_fill(~packing.key_mask, float("-inf")).softmax(-1)
        out = fast_dropout(probs, dropout) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.key_mask, dropout_p=dropout, scale=scaling)
    # Callers expect [batch, seq, heads, d], like the eager/SDPA functions return.
    return out.transpose(1, 2).reshape(packing.batch * packing.length, heads, dim)[packing.index].unsqueeze(0), None


def register() -> None:
    """Make the packed attention (and its SDPA mask) known to transformers; safe to call again."""
    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def position_offset(backbone: nn.Module) -> int:
    """The first position id the architecture gives a real token (0, or padding id + 1)."""
    config = backbone.config
    if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
        return int(config.pad_token_id) + 1
    return 0


def max_positions(config: object) -> int | None:
    """How many tokens (specials included) the architecture can place; None when positions are relative."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
        limit -= int(config.pad_token_id) + 1
    return limit


def packed_inputs(backbone: nn.Module, packing: Packing, input_ids: torch.Tensor, **extra: torch.Tensor | None) -> dict:
    """The keyword arguments for one packed forward of `backbone` (ids, positions, packing, extras).

    An `inputs_embeds` extra replaces the ids (the model embeds no tokens itself then).
    """
    kwargs: dict = {
        "position_ids": (packing.columns + position_offset(backbone)).unsqueeze(0),
        PACKING_KWARG: packing,
    }
    for name, value in extra.items():
        if value is not None:
            kwargs[name] = packing.pack(value)
    if "inputs_embeds" not in kwargs:
        kwargs["input_ids"] = packing.pack(input_ids)
    return kwargs


def enable_packing(backbone: nn.Module) -> bool:
    """Switch `backbone` to packed attention if a packed forward reproduces the padded one; say which."""
    previous = backbone.config._attn_implementation
    if previous == ATTENTION:
        return True
    if previous not in ("sdpa", "eager"):
        log.info("packing: off (attention %r is not sdpa/eager)", previous)
        return False
    register()
    try:
        backbone.set_attn_implementation(ATTENTION)
        ok = _check(backbone)
    except Exception as err:  # any architecture that does not take packed positions stays padded
        log.warning("packing: off for %s, it runs padded (%s)", type(backbone).__name__, err)
        ok = False
    if not ok:
        backbone.set_attn_implementation(previous)
        log.warning("packing: off for %s, it runs padded (a packed forward does not reproduce the padded one)",
                    type(backbone).__name__)
    return ok


@torch.no_grad()
def _check(backbone: nn.Module) -> bool:
    """Run a 3-sentence batch padded and packed (eval mode) and compare the token states."""
    vocab = int(backbone.config.vocab_size)
    special = {getattr(backbone.config, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    ordinary = [i for i in range(min(vocab, 200)) if i not in special][-20:]
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7]
    ids = torch.full((3, 7), int(backbone.config.pad_token_id or 0), dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    pool = torch.tensor(ordinary)
    for row, n in enumerate(lengths):
        ids[row, :n] = pool[torch.randint(len(pool), (n,), generator=gen)]
        mask[row, :n] = 1
    device = next(backbone.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    was_training = backbone.training
    backbone.eval()
    try:
        padded = backbone(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
        packing = Packing.of(mask)
        assert packing is not None
        packed = backbone(**packed_inputs(backbone, packing, ids), return_dict=True).last_hidden_state
    finally:
        backbone.train(was_training)
    real = mask.bool()
    diff = (packing.unpack(packed)[real] - padded[real]).abs().max().item()
    return diff <= 1e-4 * max(1.0, padded[real].abs().max().item())


class Packable:
    """Mixin for a model part that can run packed and draw cheaper dropout masks.

    Subclasses name their HF transformer in `packed_transformer()`; `packing_for(mask)` then gives
    the Packing to run a batch with (None = run padded).
    """

    packing: bool = False
    fast_dropout: bool = False

    def packed_transformer(self) -> nn.Module:
        """The HF transformer whose forwards are packed."""
        raise NotImplementedError

    def enable_packing(self) -> bool:
        """Run forwards on real tokens only; True if the transformer's check passed."""
        self.packing = enable_packing(self.packed_transformer())
        return self.packing

    def enable_fast_dropout(self) -> None:
        """Draw the transformer's dropout masks with diffcse.core.dropout (same law, ~2x cheaper on CPU)."""
        use_fast_dropout(self.packed_transformer())
        self.fast_dropout = True

    def speed_up(self, packing: bool, fast_dropout: bool) -> None:
        """Switch on what the training config asks for (TrainConfig.packing / .fast_dropout)."""
        if packing:
            self.enable_packing()
        if fast_dropout:
            self.enable_fast_dropout()

    def packing_for(self, attention_mask: torch.Tensor) -> Packing | None:
        """How to pack this batch, or None to run it padded."""
        packing = Packing.of(attention_mask) if self.packing else None
        if packing is not None:
            packing.fast_dropout = self.fast_dropout
        return packing
