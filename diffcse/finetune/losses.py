"""Fine-tuning losses: CCE, pytorch-metric-learning DML losses, and weighted sums of them.

A loss spec is a ``+``-joined list of terms, e.g. ``cce``, ``cce+proxyanchor``, ``softtriple``,
or the alias ``tripleentropy``. Each DML term is pytorch-metric-learning's own loss object; the
total is ``sum(weight_i * term_i)``. The DML terms see the same feature vector the classification
head sees (the pooled sentence embedding, or the pair features for sentence-pair tasks).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffcse.finetune.names import ALIASES, CCE, DML_LOSSES, LOSS_TERMS, PROXY_LOSSES

__all__ = ["ALIASES", "CCE", "DML_LOSSES", "LOSS_TERMS", "PROXY_LOSSES"]


@dataclass
class LossSpec:
    """Which terms make up the loss, their weights and their pytorch-metric-learning arguments."""

    name: str
    weights: dict[str, float]
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def terms(self) -> list[str]:
        """Term names in spec order."""
        return list(self.weights)

    @property
    def has_cce(self) -> bool:
        """Whether CCE is one of the terms (with a non-zero weight)."""
        return self.weights.get(CCE, 0.0) != 0.0

    @property
    def proxy_terms(self) -> list[str]:
        """The proxy-based DML terms (those usable for nearest-proxy inference)."""
        return [t for t in self.weights if t in PROXY_LOSSES]


def parse_loss_spec(
    spec: str,
    weights: dict[str, float] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
) -> LossSpec:
    """Parse ``cce+proxyanchor``-style specs (or an alias) and apply weight/argument overrides."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("loss: empty loss spec; e.g. cce, cce+proxyanchor, tripleentropy")
    key = spec.strip().lower()
    base_weights: dict[str, float] = {}
    base_params: dict[str, dict[str, Any]] = {}
    if key in ALIASES:
        expanded, alias_weights, alias_params = ALIASES[key]
        base_weights = dict(alias_weights)
        base_params = {k: dict(v) for k, v in alias_params.items()}
        parts = expanded.split("+")
    else:
        parts = [p.strip() for p in key.split("+")]
    for part in parts:
        if part not in LOSS_TERMS:
            known = ", ".join([*LOSS_TERMS, *ALIASES])
            raise ValueError(f"loss: unknown term {part!r} in {spec!r}; known: {known}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"loss: a term appears twice in {spec!r}")
    w = {p: float(base_weights.get(p, 1.0)) for p in parts}
    for name, value in (weights or {}).items():
        if name not in w:
            raise ValueError(f"loss weight: {name!r} is not a term of loss {spec!r} (terms: {', '.join(w)})")
        w[name] = float(value)
    merged = {k: dict(v) for k, v in base_params.items()}
    for name, kwargs in (params or {}).items():
        if name not in w or name == CCE:
            raise ValueError(f"loss param: {name!r} is not a DML term of loss {spec!r}")
        merged.setdefault(name, {}).update(kwargs)
    for name, kwargs in merged.items():
        check_loss_params(name, kwargs)
    return LossSpec(name=key, weights=w, params=merged)


def _pml_class(name: str) -> type:
    """The pytorch-metric-learning class behind a DML term name."""
    from pytorch_metric_learning import losses

    return {
        "proxyanchor": losses.ProxyAnchorLoss,
        "softtriple": losses.SoftTripleLoss,
        "supcon": losses.SupConLoss,
        "proxynca": losses.ProxyNCALoss,
        "tripletmargin": losses.TripletMarginLoss,
    }[name]


def check_loss_params(name: str, kwargs: dict[str, Any]) -> None:
    """Fail naming the argument when a DML term's pytorch-metric-learning class does not take it."""
    if name not in DML_LOSSES:
        raise ValueError(f"loss: unknown DML term {name!r}; known: {', '.join(DML_LOSSES)}")
    accepted = set(inspect.signature(_pml_class(name).__init__).parameters) - {"self", "kwargs"}
    # Set by us (proxy losses) or objects the command line cannot express.
    accepted -= {"num_classes", "embedding_size"}
    bad = sorted(set(kwargs) - accepted)
    if bad:
        raise ValueError(
            f"loss param: {name} has no argument {', '.join(bad)}; it takes {', '.join(sorted(accepted))}"
        )


def build_dml_loss(name: str, num_classes: int, embedding_size: int, **kwargs: Any) -> nn.Module:
    """Construct pytorch-metric-learning's loss for a term, checking the argument names first."""
    check_loss_params(name, kwargs)
    cls = _pml_class(name)
    if name in PROXY_LOSSES:
        return cls(num_classes=num_classes, embedding_size=embedding_size, **kwargs)
    return cls(**kwargs)


@dataclass
class LossOutput:
    """The weighted total and each unweighted term (detached) for logging."""

    total: torch.Tensor
    parts: dict[str, float]


class CombinedLoss(nn.Module):
    """``sum(w_i * term_i)`` over CCE and pytorch-metric-learning losses.

    Without a CCE term the head is still fitted with CCE on the logits given, which the caller
    computes from detached features (a linear probe): classifier inference keeps working while
    the encoder is shaped by the DML loss alone. ``parts`` reports that term as ``probe``.
    """

    def __init__(self, spec: LossSpec, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes = int(num_classes)
        self.dml = nn.ModuleDict(
            {
                t: build_dml_loss(t, num_classes, embedding_size, **spec.params.get(t, {}))
                for t in spec.terms
                if t != CCE
            }
        )

    def proxy_parameters(self) -> list[nn.Parameter]:
        """The DML losses' own trainable parameters (proxies / SoftTriple centers)."""
        return list(self.dml.parameters())

    def forward(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Compute the weighted total from classifier logits and the features the DML terms use."""
        total = features.new_zeros(())
        parts: dict[str, float] = {}
        for term, weight in self.spec.weights.items():
            if term == CCE:
                value = F.cross_entropy(logits, labels)
            else:
                value = self.dml[term](features, labels)
            parts[term] = float(value.detach())
            total = total + weight * value
        if not self.spec.has_cce:
            # Linear probe: the caller computes these logits from detached features, so this
            # term trains the head only and never reaches the encoder.
            probe = F.cross_entropy(logits, labels)
            parts["probe"] = float(probe.detach())
            total = total + probe
        return LossOutput(total=total, parts=parts)


def proxy_scores(loss: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Per-class closeness [N, C] of features to a proxy loss's proxies (larger = nearer).

    ProxyAnchor and ProxyNCA have one proxy per class; SoftTriple has several centers per class
    and a class scores by its nearest center. Each loss's own distance object is used, so the
    metric (cosine, or normalised squared L2 for ProxyNCA) is the one it trained with.
    """
    distance = loss.distance
    if hasattr(loss, "proxies"):
        mat = distance(features, loss.proxies.to(features.dtype))
    elif hasattr(loss, "fc") and hasattr(loss, "centers_per_class"):
        mat = distance(features, loss.fc.t().to(features.dtype))
        # pml lays centers out class-major: column c * K + k is center k of class c.
        mat = mat.view(features.shape[0], loss.num_classes, loss.centers_per_class)
        mat = mat.max(dim=2).values if distance.is_inverted else mat.min(dim=2).values
    else:
        raise ValueError(f"{type(loss).__name__} has no proxies; nearest-proxy inference needs a proxy loss")
    return mat if distance.is_inverted else -mat


def predict_nearest_proxy(loss: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Label of the nearest proxy for each feature vector."""
    return proxy_scores(loss, features).argmax(dim=1)
