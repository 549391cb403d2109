"""Fine-tuning losses: CCE, pytorch-metric-learning DML losses, our objectives, and weighted sums of them.

A loss spec is a ``+``-joined list of terms, e.g. ``cce``, ``cce+proxyanchor``, ``softtriple``,
``cce+scal``, or the alias ``tripleentropy``. Each DML term is pytorch-metric-learning's own loss
object; the objectives (scal, clld, moscl, ensemble, jcc) are diffcse.finetune.objectives
modules. The total is ``sum(weight_i * term_i)``. Every term sees the same feature vector the
classification head sees (the pooled sentence embedding, or the pair features for sentence-pair
tasks); objectives may also use a LossContext (the encoder's inputs, the head, the shared
parameters) that the training loop hands over.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffcse.finetune.names import (
    ALIASES,
    CCE,
    DML_LOSSES,
    ENSEMBLE_DEFAULT_MEMBERS,
    LOSS_TERMS,
    OBJECTIVES,
    PROXY_LOSSES,
)
from diffcse.finetune.objectives.base import LossContext, Objective

__all__ = ["ALIASES", "CCE", "DML_LOSSES", "LOSS_TERMS", "OBJECTIVES", "PROXY_LOSSES", "LossContext"]


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
        """The terms usable for nearest-proxy inference: proxy DML losses, jcc, an ensemble with a proxy member."""
        out = []
        for t in self.weights:
            if t in PROXY_LOSSES or t == "jcc":
                out.append(t)
            elif t == "ensemble":
                members = str(self.params.get(t, {}).get("members", ENSEMBLE_DEFAULT_MEMBERS))
                if any(m.strip().lower() in PROXY_LOSSES for m in members.split(",")):
                    out.append(t)
        return out


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
            raise ValueError(f"loss param: {name!r} is not a DML term or objective of loss {spec!r}")
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
    """Fail naming the argument when a term does not take it (pml class or objective), or a value is bad."""
    if name in OBJECTIVES:
        from diffcse.finetune.objectives import objective_class

        objective_class(name).check_params(kwargs)
        return
    if name not in DML_LOSSES:
        raise ValueError(f"loss: unknown DML term {name!r}; known: {', '.join([*DML_LOSSES, *OBJECTIVES])}")
    accepted = set(inspect.signature(_pml_class(name).__init__).parameters) - {"self", "kwargs"}
    # Set by us (proxy losses) or objects the command line cannot express.
    accepted -= {"num_classes", "embedding_size"}
    bad = sorted(set(kwargs) - accepted)
    if bad:
        raise ValueError(
            f"loss param: {name} has no argument {', '.join(bad)}; it takes {', '.join(sorted(accepted))}"
        )


def build_dml_loss(name: str, num_classes: int, embedding_size: int, **kwargs: Any) -> nn.Module:
    """Construct a term's loss module (pml class or objective), checking the arguments first."""
    if name in OBJECTIVES:
        from diffcse.finetune.objectives import build_objective

        return build_objective(name, num_classes, embedding_size, **kwargs)
    check_loss_params(name, kwargs)
    cls = _pml_class(name)
    if name in PROXY_LOSSES:
        return cls(num_classes=num_classes, embedding_size=embedding_size, **kwargs)
    return cls(**kwargs)


def check_spec_classes(spec: LossSpec, num_classes: int) -> None:
    """Checks that need the task's number of classes (a label-distance file's size), before a model loads."""
    distances = spec.params.get("clld", {}).get("distances")
    if "clld" in spec.weights and distances is not None:
        from diffcse.finetune.objectives.clld import check_label_distances

        check_label_distances(Path(str(distances)), num_classes)


@dataclass
class LossOutput:
    """The weighted total and each unweighted term (detached) for logging."""

    total: torch.Tensor
    parts: dict[str, float]


class CombinedLoss(nn.Module):
    """``sum(w_i * term_i)`` over CCE, pytorch-metric-learning losses and our objectives.

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
        """The terms' own trainable parameters (proxies, SoftTriple centers, prototypes, label embeddings, learned loss weights)."""
        return list(self.dml.parameters())

    @property
    def needs_inputs(self) -> bool:
        """Whether a term needs the encoder's inputs in the LossContext (scal)."""
        return any(isinstance(m, Objective) and m.needs_inputs for m in self.dml.values())

    def learned_weights(self) -> dict[str, float]:
        """The loss weights learned by the terms now ({'ensemble.supcon': w, ...}; empty if none)."""
        return {f"{t}.{k}": v for t, m in self.dml.items() if isinstance(m, Objective)
                for k, v in m.learned_weights().items()}

    def proxy_module(self) -> nn.Module:
        """The module nearest-proxy inference reads: the first proxy term (an ensemble's first proxy member)."""
        for term in self.spec.proxy_terms:
            module = self.dml[term]
            if hasattr(module, "proxy_member"):
                module = module.proxy_member()
            if module is not None:
                return module
        raise ValueError(f"loss {self.spec.name!r} has no proxy term; nearest-proxy inference needs one")

    def forward(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        context: LossContext | None = None,
    ) -> LossOutput:
        """Compute the weighted total from classifier logits and the features the other terms use."""
        total = features.new_zeros(())
        parts: dict[str, float] = {}
        for term, weight in self.spec.weights.items():
            extra: dict[str, float] = {}
            if term == CCE:
                value = F.cross_entropy(logits, labels)
            elif isinstance(self.dml[term], Objective):
                value, extra = self.dml[term](features, labels, context)
            else:
                value = self.dml[term](features, labels)
            parts[term] = float(value.detach())
            parts.update(extra)
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
