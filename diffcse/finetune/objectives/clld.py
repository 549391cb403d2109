"""CLLD: contrastive learning with label distance (Lan et al. 2021, arXiv:2110.13656).

A supervised contrastive term whose negatives are weighted by how close their label is to the
anchor's, so sentences of easily confused classes are pushed apart harder. For anchor i,
positive p (same label, p ≠ i), every other example a, cosine similarity s and temperature τ:

    ℓ_ip = −log( exp(s_ip/τ) / Σ_{a≠i} ω_ia·exp(s_ia/τ) ),  ω_ia = 1 if y_a = y_i,
                                                          ω_ia = 1 + strength·(1 − d(y_i, y_a)) else,

averaged over each anchor's positives, then over the anchors that have one. d ∈ [0, 1] is the
label distance: from learned label embeddings (the default), d(a, b) = (1 − cos(E_a, E_b)) / 2,
or from a C × C file (CSV or JSON), divided by its largest off-diagonal entry. With strength 0
(or all labels equally far apart in a file) this is pytorch-metric-learning's SupConLoss.

The label embeddings are the class weights of a cosine-softmax classifier on the detached
features (pytorch-metric-learning's NormalizedSoftmaxLoss), trained alongside: classes whose
sentences look alike get nearby embeddings. They enter ω without gradient; otherwise the
contrastive term alone would push every label away from every other to shrink the weights. The
classifier's loss is part of the term's value (logged as ``clld.labels``) and trains only the
embeddings. The weighted term itself is ours: SupConLoss takes no per-pair negative weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffcse.finetune.objectives.base import LossContext, Objective, check_positive


def load_label_distances(path: str | Path) -> np.ndarray:
    """A C × C label-distance matrix from CSV (comma-separated rows) or JSON (a list of rows); checked."""
    path = Path(path)
    where = f"loss param: clld.distances: {path}"
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            matrix = np.asarray(data, dtype=np.float64)
        else:
            matrix = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: not a matrix of numbers ({str(err).splitlines()[0]})") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(f"{where}: expected a square C × C matrix (C >= 2), got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{where}: has non-finite entries")
    if np.any(matrix < 0):
        i, j = np.argwhere(matrix < 0)[0]
        raise ValueError(f"{where}: distances must be >= 0 (row {i}, column {j} is {matrix[i, j]:g})")
    if not np.allclose(matrix, matrix.T, rtol=1e-6, atol=1e-9):
        i, j = np.argwhere(~np.isclose(matrix, matrix.T, rtol=1e-6, atol=1e-9))[0]
        raise ValueError(f"{where}: not symmetric (row {i}, column {j} is {matrix[i, j]:g}, "
                         f"row {j}, column {i} is {matrix[j, i]:g})")
    return matrix


def check_label_distances(path: str | Path, num_classes: int) -> np.ndarray:
    """The file's matrix, or an error when its size is not the task's number of classes."""
    matrix = load_label_distances(path)
    if matrix.shape[0] != num_classes:
        raise ValueError(f"loss param: clld.distances: {path} is {matrix.shape[0]} × {matrix.shape[0]} "
                         f"but the task has {num_classes} classes")
    return matrix


def weighted_supcon(features: torch.Tensor, labels: torch.Tensor, negative_weights: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Supervised contrastive loss with negative a of anchor i weighted by negative_weights[y_i, y_a]."""
    z = F.normalize(features, dim=1)
    logits = z @ z.t() / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    weights = torch.where(same, torch.ones_like(logits), negative_weights[labels][:, labels].to(logits.dtype))
    # log Σ_{a≠i} ω_ia exp(s_ia/τ), as one logsumexp with log ω added to the logits.
    denom = torch.logsumexp((logits + weights.log()).masked_fill(eye, float("-inf")), dim=1)
    pos = same & ~eye
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        return features.sum() * 0.0
    log_prob = logits - denom[:, None]
    per_anchor = -(log_prob * pos).sum(1)[has] / n_pos[has]
    return per_anchor.mean()


class CLLD(Objective):
    """Supervised contrastive loss with label-distance-weighted negatives."""

    name = "clld"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        temperature: float = 0.1,
        strength: float = 1.0,
        distances: str | None = None,
        label_temperature: float = 0.05,
    ) -> None:
        super().__init__()
        self.validate({"temperature": temperature, "strength": strength, "distances": distances,
                       "label_temperature": label_temperature})
        self.num_classes = int(num_classes)
        self.temperature = float(temperature)
        self.strength = float(strength)
        # A file named like a number ("2") arrives from --loss-param as an int.
        distances = None if distances is None else str(distances)
        self.distances_file = distances
        self.label_model: torch.nn.Module | None = None
        if distances is not None:
            matrix = check_label_distances(distances, self.num_classes)
            self.register_buffer("fixed_distance", torch.as_tensor(matrix, dtype=torch.float64))
        else:
            from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

            self.label_model = NormalizedSoftmaxLoss(num_classes, embedding_size, temperature=label_temperature)

    @classmethod
    def validate(cls, params: dict[str, Any]) -> None:
        """temperature, label_temperature > 0; strength >= 0; a distances file that parses and is checked."""
        check_positive("clld", params, "temperature", "label_temperature")
        check_positive("clld", params, "strength", allow_zero=True)
        if params["distances"] is not None:
            load_label_distances(str(params["distances"]))

    @property
    def label_embeddings(self) -> torch.Tensor | None:
        """The learned label embeddings [C, D] (None with a distance file)."""
        return None if self.label_model is None else self.label_model.W.t()

    def label_distance(self) -> torch.Tensor:
        """The C × C label distances in [0, 1] (no gradient)."""
        if self.label_model is None:
            d = self.fixed_distance.double()
            off = ~torch.eye(self.num_classes, dtype=torch.bool, device=d.device)
            top = d[off].max()
            return d / top if top > 0 else torch.zeros_like(d)
        # float64: C × C is cheap, and the weights then do not depend on the features' precision.
        e = F.normalize(self.label_model.W.detach().t().double(), dim=1)
        return ((1.0 - e @ e.t()) / 2.0).clamp(0.0, 1.0)

    def negative_weights(self) -> torch.Tensor:
        """ω[a, b] = 1 + strength·(1 − d(a, b)): the closer two labels, the heavier the negative."""
        return 1.0 + self.strength * (1.0 - self.label_distance())

    def forward(  # type: ignore[override]
        self, features: torch.Tensor, labels: torch.Tensor, context: LossContext | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted contrastive loss, plus the label-embedding classifier's loss when learned."""
        value = weighted_supcon(features, labels, self.negative_weights().to(features.device), self.temperature)
        extra = {"clld.contrastive": float(value.detach())}
        if self.label_model is not None:
            label_loss = self.label_model(features.detach(), labels)
            extra["clld.labels"] = float(label_loss.detach())
            value = value + label_loss
        return value, extra
