"""Few-shot supervised fine-tuning with CCE, distance-metric-learning losses and our objectives (SentEval transfer tasks).

Names are imported lazily, so ``import diffcse.finetune.names`` (the CLI's choices) stays cheap.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "data": ("CV_TASKS", "FEWSHOT_TASKS", "Episode", "Examples", "LoadedTask", "load_fewshot_task", "make_episode"),
    "losses": (
        "ALIASES", "DML_LOSSES", "LOSS_TERMS", "PROXY_LOSSES", "CombinedLoss", "LossSpec", "build_dml_loss",
        "parse_loss_spec", "predict_nearest_proxy", "proxy_scores", "LossContext", "OBJECTIVES",
        "check_spec_classes",
    ),
    "model": ("EncoderInputs", "Featurizer", "FineTuneModel", "pair_features"),
    "front": ("scl_front",),
    "sampling": ("holdout_split", "sample_per_class", "stratified_cap"),
    "config": ("FinetuneConfig",),
    "train": ("Finetuner", "RunResult", "run_finetune", "summarize"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> object:
    """Import a public name from its submodule on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module 'diffcse.finetune' has no attribute {name!r}")
    return getattr(import_module(f"diffcse.finetune.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    """Public names, for tab completion."""
    return __all__
