"""SimCSE's InfoNCE loss over in-batch negatives, with optional hard negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCE(nn.Module):
    """Cross-entropy over cos(z1_i, z2_j)/τ (one direction, labels on the diagonal).

    With z3 (supervised SimCSE), cos(z1_i, z3_j)/τ is appended as a second block of negatives
    and `hard_negative_weight` is added to each row's own hard-negative logit, as SimCSE does.
    Under data parallelism z2/z3 hold every rank's rows and `offset` is where this rank's start,
    so row i's positive is column offset + i.
    """

    def __init__(self, temperature: float = 0.05, hard_negative_weight: float = 0.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.hard_negative_weight = hard_negative_weight

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, z3: torch.Tensor | None = None, offset: int = 0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the loss and the mean positive / in-batch-negative cosine for logging."""
        # Similarities in fp32 even under bf16/fp16 autocast: 1/τ = 20 magnifies rounding.
        with torch.autocast(z1.device.type, enabled=False):
            up = torch.promote_types(z1.dtype, torch.float32)
            return self._loss(z1.to(up), z2.to(up), None if z3 is None else z3.to(up), offset)

    def _loss(
        self, z1: torch.Tensor, z2: torch.Tensor, z3: torch.Tensor | None, offset: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cos = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T
        logits = cos / self.temperature
        n, m = z1.size(0), z2.size(0)
        labels = torch.arange(n, device=z1.device) + offset
        if z3 is not None:
            cos3 = F.normalize(z1, dim=-1) @ F.normalize(z3, dim=-1).T
            extra = torch.zeros_like(cos3)
            extra[torch.arange(n), labels] = self.hard_negative_weight
            logits = torch.cat([logits, cos3 / self.temperature + extra], dim=1)
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            pos = cos[torch.arange(n), labels]
            off = (cos.sum() - pos.sum()) / max(n * m - n, 1)
            stats = {"pos_sim": pos.mean().item(), "neg_sim": off.item()}
            if z3 is not None:
                stats["hard_neg_sim"] = cos3[torch.arange(n), labels].mean().item()
        return loss, stats
