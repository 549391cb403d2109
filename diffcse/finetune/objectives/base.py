"""What every fine-tuning objective shares: the loss context and the Objective base class.

An objective is a loss term of the spec (``--loss cce+scal``) that is ours rather than a
pytorch-metric-learning class: it returns its value and extra numbers to log, may need more than
the feature vectors (the encoder's inputs, the head, the shared parameters: ``LossContext``), and
checks its own ``--loss-param`` arguments before any model is loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class LossContext:
    """What an objective may need besides the batch's features and labels.

    ``inputs`` are the tensors that enter the trainable part of the encoder, one per sentence
    side (two for pair tasks): the word embeddings with full fine-tuning, or the frozen layers'
    cached hidden states with partial fine-tuning (``input_kind`` says which). ``encode`` maps
    such tensors (e.g. perturbed ones) to the features the head sees, through the same model.
    ``params`` are the shared encoder parameters (EPO's gradients are taken with respect to them).
    """

    head: nn.Module | None = None
    inputs: list[torch.Tensor] | None = None
    masks: list[torch.Tensor] | None = None
    encode: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    params: list[nn.Parameter] | None = None
    input_kind: str = "word embeddings"


class Objective(nn.Module):
    """A loss term of ours: ``forward(features, labels, context) -> (value, extra parts to log)``."""

    name: ClassVar[str] = ""
    needs_inputs: ClassVar[bool] = False  # the training loop must hand over the encoder's inputs

    def forward(  # type: ignore[override]
        self, features: torch.Tensor, labels: torch.Tensor, context: LossContext | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The term's value and the extra numbers to log (named '<term>.<what>')."""
        raise NotImplementedError

    def learned_weights(self) -> dict[str, float]:
        """Loss weights this term learns (empty for most terms)."""
        return {}

    @classmethod
    def argument_names(cls) -> list[str]:
        """The ``--loss-param`` arguments the term takes (its constructor's keywords)."""
        names = list(inspect.signature(cls.__init__).parameters)
        return [n for n in names if n not in ("self", "num_classes", "embedding_size", "kwargs")]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each argument's default value."""
        params = inspect.signature(cls.__init__).parameters
        return {n: params[n].default for n in cls.argument_names()}

    @classmethod
    def check_params(cls, kwargs: dict[str, Any]) -> None:
        """Fail naming the argument when a name is unknown or a value is out of range."""
        accepted = cls.argument_names()
        bad = sorted(set(kwargs) - set(accepted))
        if bad:
            raise ValueError(f"loss param: {cls.name} has no argument {', '.join(bad)}; it takes {', '.join(accepted)}")
        cls.validate({**cls.defaults(), **kwargs})

    @classmethod
    def validate(cls, params: dict[str, Any]) -> None:
        """Check the argument values (all of them, defaults filled in); raise ValueError naming the bad one."""


def check_positive(term: str, params: dict[str, Any], *names: str, allow_zero: bool = False) -> None:
    """Raise naming `term.name` unless each named value is a number > 0 (or >= 0)."""
    for name in names:
        value = params[name]
        ok = isinstance(value, int | float) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"loss param: {term}.{name} must be a number {bound} (got {value!r})")


def check_choice(term: str, params: dict[str, Any], name: str, choices: tuple[str, ...]) -> None:
    """Raise naming `term.name` unless its value is one of the choices."""
    if params[name] not in choices:
        raise ValueError(f"loss param: {term}.{name} must be one of {', '.join(choices)} (got {params[name]!r})")
