"""Stop (or skip) a training step whose loss or gradients are NaN or infinite, at the step it happens.

A diverged run used to keep going with NaN weights, log its loss as 0.0 and export NaN tensors
with exit 0. Here the optimiser itself checks the gradients before each update (the HF Trainer
calls `optimizer.step()` once per optimiser step, after clipping): non-finite gradients either
raise `TrainingDiverged`, which names the step and the last complete checkpoint, or (policy
'skip') drop the update, up to a limit.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from diffcse.core.errors import RunFailed

log = logging.getLogger(__name__)


class TrainingDiverged(RunFailed):
    """The loss or the gradients became NaN/infinite; the message names the step and what to resume from."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class NonFiniteGuard(TrainerCallback):
    """Decides what a non-finite step does; a TrainerCallback so it knows the step being taken."""

    def __init__(self, policy: str = "stop", max_skipped: int = 10, skipped: int = 0) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite: {policy!r} is not 'stop' or 'skip'")
        self.policy = policy
        self.max_skipped = max_skipped
        self.skipped = skipped
        self.step = 0
        self.last_loss: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """Remember which optimiser step is being computed (1-based, as logs and checkpoints count)."""
        self.step = state.global_step + 1

    def allow(self, gradients: list[torch.Tensor]) -> bool:
        """True if the update may go ahead; False to skip it; raises TrainingDiverged to stop."""
        if not gradients:
            return True
        norm = torch.nn.utils.get_total_norm(gradients)
        if bool(torch.isfinite(norm)):
            return True
        what = f"the gradient norm is {float(norm)}"
        if self.policy == "skip" and self.skipped < self.max_skipped:
            self.skipped += 1
            log.warning("step %d: %s; skipped this update (%d of at most %d)", self.step, what, self.skipped, self.max_skipped)
            return False
        extra = f" after skipping {self.skipped} steps (--max-skipped-steps {self.max_skipped})" if self.policy == "skip" else ""
        raise TrainingDiverged(f"training diverged at step {self.step}: {what}{extra}", self.step)


class GuardedAdamW(torch.optim.AdamW):
    """AdamW (fused where available, as the Trainer's default) that asks a NonFiniteGuard before each update."""

    def __init__(self, params: object, guard: NonFiniteGuard, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.guard = guard

    @torch.no_grad()
    def step(self, closure: object = None) -> object:
        """Update the parameters unless the guard says this step's gradients are not finite."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not self.guard.allow(grads):
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)
