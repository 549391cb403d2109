"""The pull/push trade-off front of SCL-as-two-objectives on one few-shot task.

One fine-tuning run per preference vector (EPO) or weight vector (linear scalarisation) of the
``moscl`` term, all on the same episode and seed; each run's last-step pull and push values and
its test accuracy make one point of the front. For a whole-training-set value of the two parts,
use a batch size of at least the episode's size. The toy-problem counterpart (exact gradients,
no encoder) is diffcse.finetune.objectives.epo.trace_front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffcse.finetune.config import FinetuneConfig
    from diffcse.finetune.data import Episode
    from diffcse.finetune.train import Finetuner


def scl_front(
    tuner: Finetuner,
    episode: Episode,
    cfg: FinetuneConfig,
    preferences: Sequence[Sequence[float]],
    method: str = "epo",
) -> list[dict]:
    """Fine-tune once per (pull, push) preference or weight pair; where each run ends (pull, push, accuracy)."""
    spec = cfg.validate()
    if "moscl" not in spec.weights:
        raise ValueError(f"scl_front: the loss must have a moscl term (got {cfg.loss!r})")
    if method not in ("epo", "linear"):
        raise ValueError(f"scl_front: method must be epo or linear (got {method!r})")
    keys = ("pref_pull", "pref_push") if method == "epo" else ("pull_weight", "push_weight")
    points = []
    for pref in preferences:
        if len(pref) != 2:
            raise ValueError(f"scl_front: a preference is a (pull, push) pair (got {pref!r})")
        params = {term: dict(args) for term, args in cfg.loss_params.items()}
        params.setdefault("moscl", {}).update({"method": method, keys[0]: float(pref[0]), keys[1]: float(pref[1])})
        res = tuner.run(episode, replace(cfg, loss_params=params))
        points.append({
            "method": method, "preference": [float(pref[0]), float(pref[1])],
            "pull": res.loss_last["moscl.pull"], "push": res.loss_last["moscl.push"],
            "beta_pull": res.loss_last["moscl.beta_pull"], "accuracy": res.accuracy, "steps": res.steps,
        })
    return points
