"""A faithful, fast, CPU-capable SentEval (STS and transfer tasks) for sentence encoders."""

from .data import (
    ALL_TASKS,
    STS_TASKS,
    TRANSFER_TASKS,
    SentEvalDataError,
    SentEvalDataMissing,
    resolve_data_dir,
)
from .sts import StsbDevEvaluator

__all__ = [
    "ALL_TASKS",
    "STS_TASKS",
    "TRANSFER_TASKS",
    "SentEvalDataError",
    "SentEvalDataMissing",
    "StsbDevEvaluator",
    "evaluate",
    "resolve_data_dir",
]


def __getattr__(name: str):  # noqa: ANN202 - module-level lazy attribute
    """Import ``evaluate`` lazily so the dev evaluator does not pull in torch."""
    if name == "evaluate":
        from .engine import evaluate

        return evaluate
    raise AttributeError(name)
