"""Supervised contrastive learning as two-objective optimisation (Moukafih et al. 2022, arXiv:2209.14161).

The supervised contrastive loss is split into its two parts, each averaged over the anchors that
have one (cosine similarity s, temperature τ):

- pull (anchor–positive): mean over positives p of (1 − s_ip) / τ;
- push (anchor–negative): logsumexp over negatives n of (s_in + 1) / τ, minus log |N(i)|.

Both lie in [0, 2/τ] (EPO needs positive objectives, and equal ranges make preferences
comparable). pull + push is SupCon with the positives left out of the denominator (the
"decoupled" form) up to a constant, so linear scalarisation with weights (1, 1) has that loss's
gradient. The two are combined per step by

- ``method=linear``: w_pull·pull + w_push·push (fixed weights);
- ``method=epo``: β_pull·pull + β_push·push with β from EPO (objectives/epo.py) for the preference
  vector (pref_pull, pref_push), recomputed every step from the two objectives' gradients and
  held fixed in the backward pass, so the step is EPO's combined direction. The gradients are
  taken with respect to the shared encoder parameters (``grad=params``, the paper's setting; two
  extra backward passes per step) or, cheaper, the batch's feature vectors (``grad=features``).

Our own code: pytorch-metric-learning's SupConLoss does not expose the two parts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffcse.finetune.objectives.base import LossContext, Objective, check_choice, check_positive
from diffcse.finetune.objectives.epo import epo_weights

METHODS = ("epo", "linear")
GRAD_SPACES = ("params", "features")


def scl_pull_push(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pull and push parts of the supervised contrastive loss (see the module docstring)."""
    z = F.normalize(features, dim=1)
    sim = z @ z.t()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    has_pos, has_neg = n_pos > 0, n_neg > 0
    zero = features.sum() * 0.0  # keeps the graph when a part has no anchor
    pull = zero
    if has_pos.any():
        per_anchor = ((1.0 - sim) * pos).sum(1)[has_pos] / n_pos[has_pos] / temperature
        pull = per_anchor.mean()
    push = zero
    if has_neg.any():
        logits = ((sim + 1.0) / temperature).masked_fill(~neg, float("-inf"))
        per_anchor = torch.logsumexp(logits[has_neg], dim=1) - torch.log(n_neg[has_neg].to(sim.dtype))
        push = per_anchor.mean()
    return pull, push


def gram_matrix(values: list[torch.Tensor], wrt: list[torch.Tensor]) -> np.ndarray:
    """C = GGᵀ for the gradients of `values` with respect to the tensors `wrt` (graph kept)."""
    grads = []
    for value in values:
        if value.requires_grad:
            g = torch.autograd.grad(value, wrt, retain_graph=True, allow_unused=True)
            grads.append([torch.zeros_like(w) if gi is None else gi for gi, w in zip(g, wrt, strict=True)])
        else:
            grads.append([torch.zeros_like(w) for w in wrt])
    m = len(values)
    gram = np.zeros((m, m))
    for i in range(m):
        for j in range(i, m):
            dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(grads[i], grads[j], strict=True))
            gram[i, j] = gram[j, i] = dot
    return gram


class MultiObjectiveSCL(Objective):
    """SupCon's pull and push parts as two objectives, combined linearly or by EPO."""

    name = "moscl"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        method: str = "epo",
        temperature: float = 0.1,
        pull_weight: float = 1.0,
        push_weight: float = 1.0,
        pref_pull: float = 1.0,
        pref_push: float = 1.0,
        eps: float = 1e-4,
        grad: str = "params",
    ) -> None:
        super().__init__()
        self.validate({"method": method, "temperature": temperature, "pull_weight": pull_weight,
                       "push_weight": push_weight, "pref_pull": pref_pull, "pref_push": pref_push,
                       "eps": eps, "grad": grad})
        self.method = method
        self.temperature = float(temperature)
        self.weights = (float(pull_weight), float(push_weight))
        self.preference = (float(pref_pull), float(pref_push))
        self.eps = float(eps)
        self.grad = grad
        self.last_mode = ""

    @classmethod
    def validate(cls, params: dict[str, Any]) -> None:
        """temperature, preferences > 0; weights >= 0 and not both 0; eps >= 0; method and grad from their choices."""
        check_choice("moscl", params, "method", METHODS)
        check_choice("moscl", params, "grad", GRAD_SPACES)
        check_positive("moscl", params, "temperature", "pref_pull", "pref_push")
        check_positive("moscl", params, "pull_weight", "push_weight", "eps", allow_zero=True)
        if params["pull_weight"] == 0 and params["push_weight"] == 0:
            raise ValueError("loss param: moscl.pull_weight and moscl.push_weight cannot both be 0")

    def combination(self, pull: torch.Tensor, push: torch.Tensor, features: torch.Tensor,
                    params: list[nn.Parameter] | None) -> tuple[float, float]:
        """This step's (β_pull, β_push): the fixed weights, or EPO's from the two gradients."""
        if self.method == "linear":
            self.last_mode = "linear"
            return self.weights
        wrt: list[torch.Tensor] = list(params) if self.grad == "params" and params else [features]
        gram = gram_matrix([pull, push], wrt)
        beta, self.last_mode = epo_weights([float(pull.detach()), float(push.detach())], gram, self.preference, self.eps)
        return float(beta[0]), float(beta[1])

    def forward(  # type: ignore[override]
        self, features: torch.Tensor, labels: torch.Tensor, context: LossContext | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """β_pull·pull + β_push·push, β fixed in the backward pass.

        Without a context (or its params) EPO's gradients are taken with respect to `features`
        (e.g. when the features are themselves the parameters being optimised).
        """
        pull, push = scl_pull_push(features, labels, self.temperature)
        params = context.params if context is not None else None
        b_pull, b_push = self.combination(pull, push, features, params)
        value = b_pull * pull + b_push * push
        return value, {"moscl.pull": float(pull.detach()), "moscl.push": float(push.detach()), "moscl.beta_pull": b_pull}
