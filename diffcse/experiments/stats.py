"""The statistics of an experiment grid: mean ± std over seeds, and paired differences with a t interval.

Runs of two variants with the same seed share their data order and initial heads, so a variant is
compared with the baseline seed by seed: d_s = variant_s - baseline_s. The interval is the
Student-t one over those n differences, mean(d) ± t_{(1+c)/2, n-1} · sd(d) / sqrt(n) with sd's
ddof=1; with n < 2 it is undefined (no spread to measure), and says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
WITHIN_NOISE = "within seed noise"
UNDEFINED = "undefined (n < 2 paired seeds)"


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; None for fewer than 2 values) of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"n": 0, "mean": None, "std": None}
    return {"n": len(finite), "mean": float(np.mean(finite)),
            "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None}


def paired_difference(variant: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> dict:
    """variant - baseline over the seeds both have: mean, std, t interval and a verdict."""
    seeds = sorted(s for s in variant if s in baseline and _finite(variant[s]) and _finite(baseline[s]))
    diffs = np.array([variant[s] - baseline[s] for s in seeds], dtype=np.float64)
    out: dict = {"n": len(seeds), "seeds": seeds, "confidence": confidence, "mean": None, "std": None,
                 "ci_low": None, "ci_high": None}
    if len(seeds) == 0:
        out["verdict"] = UNDEFINED
        return out
    out["mean"] = float(diffs.mean())
    if len(seeds) < 2:
        out["verdict"] = UNDEFINED
        return out
    sd = float(diffs.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, len(seeds) - 1)) * sd / math.sqrt(len(seeds))
    out.update(std=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    out["verdict"] = verdict(out["ci_low"], out["ci_high"])
    return out


def verdict(low: float, high: float) -> str:
    """What an interval of the difference says: within seed noise when it contains 0, else the sign."""
    if low <= 0.0 <= high:
        return WITHIN_NOISE
    return "above baseline" if low > 0 else "below baseline"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
