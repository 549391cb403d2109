"""Our fine-tuning objectives, one module each; loss-spec terms beside CCE and the pml DML losses.

| term | module | what |
|---|---|---|
| ``scal`` | scal.py | InfoNCE between FGSM/PGD-perturbed and clean sentence vectors |
| ``clld`` | clld.py | SupCon with negatives weighted by label closeness |
| ``moscl`` | moscl.py (+ epo.py) | SupCon's pull and push parts, combined linearly or by EPO |
| ``ensemble`` | ensemble.py | pml DML losses with learned (uncertainty) weights |
| ``jcc`` | jcc.py | prototype cosine-softmax + SupCon; nearest-prototype inference |
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from diffcse.finetune.objectives.base import LossContext, Objective

_CLASSES = {
    "scal": ("scal", "SCAL"),
    "clld": ("clld", "CLLD"),
    "moscl": ("moscl", "MultiObjectiveSCL"),
    "ensemble": ("ensemble", "LearnedEnsemble"),
    "jcc": ("jcc", "JointContrastiveClassifier"),
}

__all__ = ["LossContext", "Objective", "build_objective", "objective_class"]


def objective_class(name: str) -> type[Objective]:
    """The Objective class behind a term name."""
    if name not in _CLASSES:
        raise ValueError(f"loss: unknown objective {name!r}; known: {', '.join(_CLASSES)}")
    module, cls = _CLASSES[name]
    return getattr(import_module(f"diffcse.finetune.objectives.{module}"), cls)


def build_objective(name: str, num_classes: int, embedding_size: int, **kwargs: Any) -> Objective:
    """Construct an objective, checking its arguments first."""
    cls = objective_class(name)
    cls.check_params(kwargs)
    return cls(num_classes, embedding_size, **kwargs)
