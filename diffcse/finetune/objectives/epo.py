"""Exact Pareto Optimal search (EPO; Mahapatra & Rajan, ICML 2020), written from the paper.

Given m objectives l (positive), their gradients G (m × n) and a preference vector r, EPO
combines the gradients as d = Gᵀβ with β on the simplex. The target is the Pareto-front point
where r₁l₁ = r₂l₂ = … ("exact Pareto optimal" for r). How far l is from that ray is measured by
the non-uniformity μ = KL(l̂ ‖ 1/m), l̂ = r⊙l / Σ r⊙l; a = r ⊙ (log(m·l̂) − μ) is, up to a positive
factor, ∂μ/∂l, so a step along −d changes μ at the rate −βᵀCa (C = GGᵀ).

- Balance mode (μ > eps): maximise βᵀCa (the fastest decrease of μ) subject to (Cβ)_j ≥ 0 for
  the objectives with the largest r_j·l_j (they must not grow); the others may grow
  ("controlled ascent") so the iterate can move along the front towards the ray.
- Descent mode (μ ≤ eps): maximise Σ_j (Cβ)_j subject to Cβ ≥ 0 (every objective descends)
  and βᵀCa ≥ 0 (the balance is not lost); if no β meets both, Cβ ≥ 0 alone (always feasible:
  the min-norm point of the gradients' hull meets it).

Each is a linear programme in β (m variables): for 2 objectives solved in closed form (β = (t, 1 − t),
each constraint bounds t), for more with scipy.optimize.linprog (HiGHS). The
paper's own solver differs in details of the balance-mode constraint set; this is our reading of
its description, and the tests check the property that matters: the iterates reach the front
point with r₁l₁ = r₂l₂.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def non_uniformity(losses: np.ndarray, preference: np.ndarray) -> float:
    """μ_r(l) = KL(l̂ ‖ uniform) with l̂ = r⊙l / Σ r⊙l: 0 exactly on the preference ray."""
    adjusted = np.asarray(preference, dtype=np.float64) * np.asarray(losses, dtype=np.float64)
    share = adjusted / adjusted.sum()
    share = share[share > 0]
    return float(np.sum(share * np.log(share * len(adjusted))))


def adjustment(losses: np.ndarray, preference: np.ndarray) -> tuple[np.ndarray, float]:
    """The adjustment vector a = r ⊙ (log(m·l̂) − μ) and μ."""
    r = np.asarray(preference, dtype=np.float64)
    adjusted = r * np.asarray(losses, dtype=np.float64)
    share = adjusted / adjusted.sum()
    mu = non_uniformity(losses, preference)
    return r * (np.log(share * len(share)) - mu), mu


def _solve_two(objective: np.ndarray, a_ub: np.ndarray, b_ub: np.ndarray) -> np.ndarray | None:
    """The 2-objective LP in closed form: β = (t, 1 − t), t ∈ [0, 1], every constraint an interval on t."""
    lo, hi = 0.0, 1.0
    tol = 1e-12
    for row, bound in zip(a_ub, b_ub, strict=True):
        slope, rest = row[0] - row[1], bound - row[1]  # row·β ≤ bound  ⇔  slope·t ≤ rest
        if abs(slope) <= tol:
            if rest < -tol:
                return None
        elif slope > 0:
            hi = min(hi, rest / slope)
        else:
            lo = max(lo, rest / slope)
    if lo > hi + tol:
        return None
    lo, hi = min(lo, hi), max(lo, hi)
    gain = objective[0] - objective[1]
    # A tie (flat objective) takes the middle of the feasible interval, the least one-sided choice.
    t = hi if gain > tol else lo if gain < -tol else (lo + hi) / 2
    return np.array([t, 1.0 - t])


def _solve(objective: np.ndarray, a_ub: np.ndarray | None, b_ub: np.ndarray | None) -> np.ndarray | None:
    """max objective·β over the simplex with A_ub β ≤ b_ub; None when infeasible."""
    m = len(objective)
    if m == 2 and a_ub is not None:
        return _solve_two(objective, a_ub, b_ub)
    from scipy.optimize import linprog

    res = linprog(-objective, A_ub=a_ub, b_ub=b_ub, A_eq=np.ones((1, m)), b_eq=np.ones(1),
                  bounds=[(0.0, None)] * m, method="highs")
    if res.status != 0:
        return None
    beta = np.clip(res.x, 0.0, None)
    return beta / beta.sum()


def epo_weights(
    losses: Sequence[float] | np.ndarray,
    gram: np.ndarray,
    preference: Sequence[float] | np.ndarray,
    eps: float = 1e-4,
) -> tuple[np.ndarray, str]:
    """EPO's combination β (simplex) of the objectives' gradients, and the mode ('balance' or 'descent').

    `gram` is C = GGᵀ, the objectives' gradient inner products. The search direction is Gᵀβ
    (descend along its negative), i.e. the gradient of Σ β_j l_j with β held fixed.
    """
    losses = np.asarray(losses, dtype=np.float64)
    r = np.asarray(preference, dtype=np.float64)
    if losses.ndim != 1 or len(losses) < 2 or r.shape != losses.shape:
        raise ValueError(f"EPO needs >= 2 losses and one preference per loss (got {losses.shape}, {r.shape})")
    if np.any(r <= 0):
        raise ValueError(f"EPO preferences must be > 0 (got {r.tolist()})")
    # Logs of the shares need positive losses; a loss at 0 sits at the front's end anyway.
    losses = np.maximum(losses, 1e-12)
    scale = float(np.abs(gram).max())
    if not np.isfinite(scale) or scale == 0.0:
        return r / r.sum(), "descent"  # no gradient information: any β gives the zero step
    c = np.asarray(gram, dtype=np.float64) / scale  # a positive scale changes no argmax or constraint
    a, mu = adjustment(losses, r)
    if mu > eps:
        adjusted = r * losses
        worst = np.flatnonzero(adjusted >= adjusted.max() * (1 - 1e-12))
        beta = _solve(c @ a, -c[worst], np.zeros(len(worst)))
        if beta is not None:
            return beta, "balance"
    ones = np.ones(len(losses))
    for a_ub, b_ub in ((np.vstack([-c, -(c @ a)[None]]), np.zeros(len(losses) + 1)), (-c, np.zeros(len(losses)))):
        beta = _solve(c @ ones, a_ub, b_ub)
        if beta is not None:
            return beta, "descent"
    return r / r.sum(), "descent"


def linear_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Linear scalarisation: the fixed weights themselves (Σ w_j l_j)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"linear scalarisation weights must be >= 0, not all 0 (got {w.tolist()})")
    return w


@dataclass
class FrontPoint:
    """Where descent with one preference (EPO) or one weight vector (linear) ended."""

    preference: tuple[float, ...]
    losses: tuple[float, ...]
    x: tuple[float, ...]
    mode: str


def descend(
    objectives: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor | Sequence[float],
    preference: Sequence[float],
    method: str = "epo",
    steps: int = 500,
    lr: float = 0.01,
    eps: float = 1e-4,
) -> FrontPoint:
    """Gradient descent on a vector objective along EPO's (or linear scalarisation's) combined direction.

    The step decays linearly from `lr` to 0: with a fixed step, balance mode overshoots the
    preference ray by about one step each way and never settles.
    """
    if method not in ("epo", "linear"):
        raise ValueError(f"method must be epo or linear (got {method!r})")
    x = torch.as_tensor(x0, dtype=torch.float64).clone().requires_grad_(True)
    mode = "linear"
    for step in range(steps):
        values = objectives(x)
        grads = torch.stack([torch.autograd.grad(v, x, retain_graph=True)[0].flatten() for v in values])
        if method == "epo":
            beta, mode = epo_weights(values.detach().numpy(), (grads @ grads.T).numpy(), preference, eps)
        else:
            beta = linear_weights(preference)
        with torch.no_grad():
            x -= lr * (1 - step / steps) * (torch.as_tensor(beta, dtype=grads.dtype) @ grads).view_as(x)
    with torch.no_grad():
        final = objectives(x)
    return FrontPoint(tuple(float(p) for p in preference), tuple(final.tolist()), tuple(x.detach().flatten().tolist()), mode)


def trace_front(
    objectives: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor | Sequence[float],
    preferences: Sequence[Sequence[float]],
    method: str = "epo",
    steps: int = 500,
    lr: float = 0.01,
    eps: float = 1e-4,
) -> list[FrontPoint]:
    """One front point per preference vector (EPO) or weight vector (linear), each from the same start."""
    return [descend(objectives, x0, p, method, steps, lr, eps) for p in preferences]
