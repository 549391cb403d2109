"""Joint contrastive classifier: class prototypes learned with the encoder, nearest-prototype inference.

One prototype per class (a parameter). The term is

    CE( cos(f, P_c) / temperature over classes c, y ) + supcon_weight · SupCon(f, y)

— a softmax over the cosines to the prototypes pulls each example to its class prototype and
away from the others, and the supervised contrastive term (Khosla et al. 2020) does the same
between examples. Prediction is the class of the nearest prototype by cosine
(``--inference proxy``), so the classifier and the embedding space are one object. This is the
joint prototype/contrastive recipe of e.g. prototypical-contrastive classifiers; we follow no
single paper's hyper-parameters.

Both parts are pytorch-metric-learning's own: NormalizedSoftmaxLoss (cosine softmax over its
class weights, which are the prototypes) and SupConLoss; this class only joins them and exposes
the prototypes as ``proxies`` with the cosine ``distance``, which is what nearest-proxy inference
(diffcse.finetune.losses.proxy_scores) reads.
"""

from __future__ import annotations

from typing import Any

import torch

from diffcse.finetune.objectives.base import LossContext, Objective, check_positive


class JointContrastiveClassifier(Objective):
    """Prototype cosine-softmax CE + supervised contrastive loss; the prototypes are the classifier."""

    name = "jcc"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        temperature: float = 0.1,
        supcon_weight: float = 1.0,
        supcon_temperature: float = 0.1,
    ) -> None:
        super().__init__()
        self.validate({"temperature": temperature, "supcon_weight": supcon_weight,
                       "supcon_temperature": supcon_temperature})
        from pytorch_metric_learning.losses import NormalizedSoftmaxLoss, SupConLoss

        self.num_classes = int(num_classes)
        self.prototype_loss = NormalizedSoftmaxLoss(num_classes, embedding_size, temperature=float(temperature))
        self.supcon = SupConLoss(temperature=float(supcon_temperature))
        self.supcon_weight = float(supcon_weight)
        # Cosine (normalising dot product): the metric the prototype softmax uses.
        self.distance = self.prototype_loss.distance

    @classmethod
    def validate(cls, params: dict[str, Any]) -> None:
        """temperatures > 0, supcon_weight >= 0."""
        check_positive("jcc", params, "temperature", "supcon_temperature")
        check_positive("jcc", params, "supcon_weight", allow_zero=True)

    @property
    def proxies(self) -> torch.Tensor:
        """The class prototypes [C, D]."""
        return self.prototype_loss.W.t()

    def forward(  # type: ignore[override]
        self, features: torch.Tensor, labels: torch.Tensor, context: LossContext | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Prototype CE + supcon_weight · SupCon."""
        proto = self.prototype_loss(features, labels)
        extra = {"jcc.prototypes": float(proto.detach())}
        if self.supcon_weight == 0:
            return proto, extra
        contrast = self.supcon(features, labels)
        extra["jcc.supcon"] = float(contrast.detach())
        return proto + self.supcon_weight * contrast, extra
