"""SimCSE's InfoNCE loss over in-batch negatives, with optional hard negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCE(nn.Module):
    """Cross-entropy over cos(z1_i, z2_j)/τ (one direction, labels on the diagonal).

    With z3 (supervised SimCSE), cos(z1_i, z3_j)/τ is appended as a second block of negatives
    and `hard_negative_weight` is added to each row's own hard-negative logit, as SimCSE does.
    """

    def __init__(self, temperature: float = 0.05, hard_negative_weight: float = 0.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.hard_negative_weight = hard_negative_weight

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, z3: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the loss and the mean positive / in-batch-negative cosine for logging."""
        cos = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T
        logits = cos / self.temperature
        n = z1.size(0)
        if z3 is not None:
            cos3 = F.normalize(z1, dim=-1) @ F.normalize(z3, dim=-1).T
            extra = torch.eye(n, device=z1.device, dtype=logits.dtype) * self.hard_negative_weight
            logits = torch.cat([logits, cos3 / self.temperature + extra], dim=1)
        labels = torch.arange(n, device=z1.device)
        loss = F.cross_entropy(logits.float(), labels)
        with torch.no_grad():
            diag = cos.diagonal()
            off = (cos.sum() - diag.sum()) / max(n * n - n, 1)
            stats = {"pos_sim": diag.mean().item(), "neg_sim": off.item()}
            if z3 is not None:
                stats["hard_neg_sim"] = cos3.diagonal().mean().item()
        return loss, stats
