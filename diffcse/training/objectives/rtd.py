"""The replaced-token-detection loss of DiffCSE's conditional discriminator."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diffcse.training.distributed import world


class ReplacedTokenDetectionLoss(nn.Module):
    """2-way cross-entropy per position between the discriminator's logits and replaced/kept labels.

    By default the mean runs over attended (non-padding) positions only. With count_padding=True the
    mean runs over every position of the padded [B, L] batch with padding labelled 'kept', which is
    what the DiffCSE reference code does (its loss is diluted by the padding share of the batch).

    Under DDP the mean is over the global batch's positions: each rank divides its sum by the
    all-reduced count (times the world size, which DDP's gradient averaging divides back out), so
    ranks with more tokens weigh more, exactly as in one process with the whole batch.
    """

    def __init__(self, count_padding: bool = False) -> None:
        super().__init__()
        self.count_padding = count_padding

    def denominator(self, attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """What this rank divides its summed loss by: its share of the global position count.

        With one process that is the batch's position count; under DDP it is the all-reduced count
        over the world size, so DDP's gradient averaging gives the one-process mean.
        """
        if self.count_padding:
            count = torch.tensor(float(attention_mask.numel()), dtype=dtype, device=attention_mask.device)
        else:
            count = attention_mask.bool().sum().to(dtype)
        _, size = world()
        if size > 1:
            count = count.clone()
            dist.all_reduce(count)
            count = count / size
        return count.clamp_min(1.0 / size)

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
        denominator: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the loss and accuracy on replaced / kept tokens and the replaced fraction (attended positions).

        `denominator` (from `denominator()` of the whole batch) lets a part of the batch give its
        share of the whole batch's mean, as gradient caching needs.
        """
        if logits.shape[:-1] != labels.shape or logits.size(-1) != 2:
            raise ValueError(f"expected logits [B, L, 2] and labels [B, L], got {tuple(logits.shape)} and {tuple(labels.shape)}")
        attended = attention_mask.bool()
        labels = labels.long() * attended  # padding is 'kept' (label 0), as in the reference
        # At least float32 (bf16/fp16 logits under autocast); float64 stays float64.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        per_token = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none")
        if self.count_padding:
            total = per_token.sum()
        else:
            total = (per_token * attended.reshape(-1).to(per_token.dtype)).sum()
        if denominator is None:
            denominator = self.denominator(attention_mask, per_token.dtype)
        loss = total / denominator.to(per_token.device, per_token.dtype)
        with torch.no_grad():
            correct = logits.argmax(-1) == labels
            replaced = labels.bool() & attended
            kept = ~labels.bool() & attended
            stats = {
                "rtd_acc_replaced": _ratio(correct & replaced, replaced),
                "rtd_acc_kept": _ratio(correct & kept, kept),
                "replaced_fraction": _ratio(replaced, attended),
            }
        # An empty class (e.g. nothing replaced this step) has no accuracy; leave it out of the average.
        return loss, {k: v for k, v in stats.items() if v is not None}


def _ratio(hits: torch.Tensor, total: torch.Tensor) -> float | None:
    n = int(total.sum())
    return float(hits.sum()) / n if n else None
