"""Learned loss ensembles: several DML losses on one encoder, their weights learned end to end.

The weights use the uncertainty-weighting form of Kendall, Gal & Cipolla (CVPR 2018): each member
loss L_i gets a learned log-variance s_i and the term is

    Σ_i exp(−s_i)·L_i + s_i,

so the effective weight exp(−s_i) is always positive and cannot be driven to 0 for free (the
+s_i penalises it). Members are pytorch-metric-learning losses (any of the DML terms, with their
own arguments as ``ensemble.<member>.<arg>``); the log-variances are ours. They train in the
proxies' optimiser group (``--proxy-lr``), start at ``init_log_weight`` (0: weight 1) and are
logged every step (``RunResult.learned_weights``, ``results.json``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffcse.finetune.names import DML_LOSSES, ENSEMBLE_DEFAULT_MEMBERS, PROXY_LOSSES
from diffcse.finetune.objectives.base import LossContext, Objective


def parse_members(members: object) -> list[str]:
    """'supcon,proxyanchor' (or a list) to member names, checked."""
    names = members.split(",") if isinstance(members, str) else list(members) if isinstance(members, list | tuple) else None
    if names is None:
        raise ValueError(f"loss param: ensemble.members must be comma-separated DML terms (got {members!r})")
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if len(names) < 2:
        raise ValueError(f"loss param: ensemble.members needs at least two DML terms (got {members!r})")
    unknown = [n for n in names if n not in DML_LOSSES]
    if unknown:
        raise ValueError(f"loss param: ensemble.members: unknown term {unknown[0]!r}; choose from {', '.join(DML_LOSSES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"loss param: ensemble.members: a term appears twice in {members!r}")
    return names


def split_member_params(members: list[str], kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{'proxyanchor.margin': 0.2} to {'proxyanchor': {'margin': 0.2}}, checked against the members."""
    from diffcse.finetune.losses import check_loss_params

    out: dict[str, dict[str, Any]] = {m: {} for m in members}
    for key, value in kwargs.items():
        member, dot, arg = key.partition(".")
        if not dot or member not in out:
            raise ValueError(f"loss param: ensemble has no argument {key}; it takes members, init_log_weight "
                             f"and MEMBER.ARG for its members ({', '.join(members)})")
        out[member][arg] = value
    for member, args in out.items():
        check_loss_params(member, args)
    return out


class LearnedEnsemble(Objective):
    """Σ exp(−s_i)·L_i + s_i over pytorch-metric-learning losses, s learned."""

    name = "ensemble"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        members: str = ENSEMBLE_DEFAULT_MEMBERS,
        init_log_weight: float = 0.0,
        **member_params: Any,
    ) -> None:
        super().__init__()
        from diffcse.finetune.losses import build_dml_loss

        names = parse_members(members)
        per_member = split_member_params(names, member_params)
        self.names = names
        self.members = nn.ModuleDict(
            {m: build_dml_loss(m, num_classes, embedding_size, **per_member[m]) for m in names}
        )
        self.log_vars = nn.Parameter(torch.full((len(names),), float(init_log_weight)))

    @classmethod
    def check_params(cls, kwargs: dict[str, Any]) -> None:
        """members: DML terms; init_log_weight: a number; MEMBER.ARG: that member's pml arguments."""
        kwargs = dict(kwargs)
        names = parse_members(kwargs.pop("members", ENSEMBLE_DEFAULT_MEMBERS))
        init = kwargs.pop("init_log_weight", 0.0)
        if isinstance(init, bool) or not isinstance(init, int | float):
            raise ValueError(f"loss param: ensemble.init_log_weight must be a number (got {init!r})")
        split_member_params(names, kwargs)

    def weights(self) -> torch.Tensor:
        """The effective weights exp(−s_i) (positive by construction)."""
        return torch.exp(-self.log_vars)

    def learned_weights(self) -> dict[str, float]:
        """{member: exp(−s_member)} now."""
        return {m: float(w) for m, w in zip(self.names, self.weights().detach(), strict=True)}

    def proxy_member(self) -> nn.Module | None:
        """The first member with proxies (for nearest-proxy inference), or None."""
        return next((self.members[m] for m in self.names if m in PROXY_LOSSES), None)

    def forward(  # type: ignore[override]
        self, features: torch.Tensor, labels: torch.Tensor, context: LossContext | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Σ exp(−s_i)·L_i + s_i; logs each member's L_i and weight."""
        s = self.log_vars.to(features.dtype)
        total = features.new_zeros(())
        extra: dict[str, float] = {}
        for i, name in enumerate(self.names):
            value = self.members[name](features, labels)
            total = total + torch.exp(-s[i]) * value + s[i]
            extra[f"ensemble.{name}"] = float(value.detach())
            extra[f"ensemble.w.{name}"] = float(torch.exp(-s[i]).detach())
        return total, extra
