"""The SimCSE training model: one forward over all views, InfoNCE on the projected vectors."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from diffcse.core.modeling import EncoderOutput, SentenceEncoder
from diffcse.training.distributed import gather_with_grad, world
from diffcse.training.objectives.infonce import InfoNCE


class ContrastiveModel(nn.Module):
    """Unsupervised (1 view, duplicated) or supervised (2-3 views) SimCSE as a Trainer-ready module.

    The batch is [N, V, L]; all N·V' rows go through the encoder in one pass (unsupervised: each
    sentence twice, so dropout gives the two views), and the loss is InfoNCE on z1, z2 (, z3).
    """

    # Checkpoint names left out as duplicates of shared tensors (set by the trainer; HF's attribute name).
    _keys_to_ignore_on_save: list[str] | None = None

    def __init__(self, encoder: SentenceEncoder, loss: InfoNCE, gather_negatives: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.loss = loss
        self.gather_negatives = gather_negatives
        self.aux_mlm: nn.Module | None = None  # SimCSE's auxiliary MLM term (objectives.mlm.AuxiliaryMLM)
        self._stats: dict[str, list[float]] = defaultdict(list)

    def flatten_views(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[N, V, L] ids and mask as [N·V', L] rows, sentence by sentence (V' = 2 for one view)."""
        if input_ids.dim() != 3:
            raise ValueError(f"expected input_ids of shape [N, views, L], got {tuple(input_ids.shape)}")
        n, views, length = input_ids.shape
        if views == 1:
            # Same sentence twice in one pass: SimCSE's positive pair is two dropout masks.
            input_ids = input_ids.expand(n, 2, length)
            attention_mask = attention_mask.expand(n, 2, length)
            views = 2
        return input_ids.reshape(n * views, length), attention_mask.reshape(n * views, length), views

    def encode_views(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[EncoderOutput, torch.Tensor, torch.Tensor, int]:
        """Run every view of the batch through the encoder at once; return outputs and flat inputs."""
        flat_ids, flat_mask, views = self.flatten_views(input_ids, attention_mask)
        return self.encoder(flat_ids, flat_mask), flat_ids, flat_mask, views

    def contrastive_loss(self, out: EncoderOutput, views: int) -> torch.Tensor:
        """InfoNCE over the views of an encoder output laid out as [N·views, H]."""
        z = out.embedding.view(-1, views, out.embedding.size(-1))
        z1, z2, z3 = z[:, 0], z[:, 1], (z[:, 2] if views == 3 else None)
        offset = 0
        rank, size = world()
        if self.gather_negatives and size > 1:
            # Every rank's second (and third) views become this rank's negatives; with the
            # per-rank mean loss and DDP's gradient averaging this is the single-process loss.
            offset = rank * z1.size(0)
            z2 = gather_with_grad(z2)
            z3 = gather_with_grad(z3) if z3 is not None else None
        loss, stats = self.loss(z1, z2, z3, offset=offset)
        self.record(stats, loss_contrast=loss.item(), negatives=z2.size(0) - 1 + (0 if z3 is None else z3.size(0)))
        return loss

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return {'loss': ...} for the Trainer."""
        out, _, _, views = self.encode_views(input_ids, attention_mask)
        return {"loss": self.contrastive_loss(out, views) + self.auxiliary_mlm(input_ids, attention_mask)}

    def auxiliary_mlm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | float:
        """mlm_weight x the MLM loss of each sentence's first view (0 without the auxiliary term)."""
        if self.aux_mlm is None:
            return 0.0
        loss = self.aux_mlm(input_ids[:, 0], attention_mask[:, 0])
        self.record(loss_mlm=loss.item() / self.aux_mlm.weight)
        return loss

    def record(self, stats: dict[str, float] | None = None, **more: float) -> None:
        """Keep per-step numbers until the next log line averages them."""
        for key, value in {**(stats or {}), **more}.items():
            self._stats[key].append(float(value))

    def tie_weights(self) -> None:
        """Called by the Trainer after loading a checkpoint without the shared tensors: they are the same
        Parameters here, so there is nothing to tie again."""

    def pop_stats(self) -> dict[str, float]:
        """Average and clear what record() collected since the last call."""
        out = {k: sum(v) / len(v) for k, v in self._stats.items() if v}
        self._stats.clear()
        return out
