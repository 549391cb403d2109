"""Sentence-BERT's objectives for labelled pairs (Reimers & Gurevych 2019).

- `sbert-softmax`: a classifier over (u, v, |u − v|) of the two sentence vectors, cross-entropy
  against the pair's label (NLI-style: entailment / neutral / contradiction, or paraphrase or not).
- `sbert-cosine`: cos(u, v) regressed on the pair's score (mean squared error), the score divided
  by `score_scale` (5 for STS-style 0..5 scores).

Both sentences of every pair go through the encoder in one pass; the classifier is a training
head only: the exported model is the encoder.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from diffcse.core.modeling import SentenceEncoder, at_least_fp32


class SoftmaxPairLoss(nn.Module):
    """Cross-entropy of Linear(3H → C) over (u, v, |u − v|)."""

    def __init__(self, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(3 * hidden_size, num_labels)

    def forward(self, u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss and the batch's accuracy."""
        logits = self.classifier(torch.cat([u, v, (u - v).abs()], dim=-1))
        loss = F.cross_entropy(at_least_fp32(logits), labels.long())
        return loss, {"pair_accuracy": float((logits.argmax(-1) == labels).float().mean())}


class CosineRegressionLoss(nn.Module):
    """Mean squared error between cos(u, v) and score / score_scale."""

    def __init__(self, score_scale: float = 1.0) -> None:
        super().__init__()
        if score_scale <= 0:
            raise ValueError(f"score_scale: must be > 0, got {score_scale}")
        self.score_scale = score_scale

    def forward(self, u: torch.Tensor, v: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss and the mean cosine of the batch."""
        cos = F.cosine_similarity(at_least_fp32(u), at_least_fp32(v), dim=-1)
        target = scores.to(cos.dtype) / self.score_scale
        return F.mse_loss(cos, target), {"pair_cos": float(cos.detach().mean())}


class PairObjectiveModel(nn.Module):
    """An encoder trained on labelled pairs with one of the losses above (Trainer-ready)."""

    _keys_to_ignore_on_save: list[str] | None = None

    def __init__(self, encoder: SentenceEncoder, loss: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.loss = loss
        self.gather_negatives = False  # no in-batch negatives
        self._stats: dict[str, list[float]] = defaultdict(list)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss of a [N, 2, L] batch of pairs and their targets."""
        n, views, length = input_ids.shape
        if views != 2:
            raise ValueError(f"pair objectives take two sentences per example, got {views}")
        emb = self.encoder(input_ids.reshape(2 * n, length), attention_mask.reshape(2 * n, length)).embedding
        emb = emb.view(n, 2, -1)
        loss, stats = self.loss(emb[:, 0], emb[:, 1], labels)
        for key, value in {**stats, "loss_pair": float(loss.detach())}.items():
            self._stats[key].append(value)
        return {"loss": loss}

    def tie_weights(self) -> None:
        """Nothing shares weights here; the Trainer may call it after loading a checkpoint."""

    def pop_stats(self) -> dict[str, float]:
        """Averages since the last log line."""
        out = {k: sum(v) / len(v) for k, v in self._stats.items() if v}
        self._stats.clear()
        return out
