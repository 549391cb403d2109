"""SCAL: supervised contrastive adversarial learning (Miao et al. 2021, arXiv:2111.13301).

The label loss (CE of the head on the clean features) is differentiated with respect to the
encoder's input embeddings; one FGSM step, or k PGD steps, of size epsilon along that gradient
(L2: per example, the gradient scaled to the step's length; L-inf: its sign) gives an
adversarial version of each sentence, kept in the per-example epsilon ball. The perturbed input is
run through the same encoder and an InfoNCE term pulls each adversarial vector to its own clean
vector, with the batch's other clean vectors as negatives.

With partial fine-tuning (``--train-layers``) the embeddings and the bottom layers are frozen and
cached, so there are no word embeddings to perturb inside the trained graph: the perturbation is
applied to the cached hidden states that enter the trainable top layers instead.

InfoNCE is pytorch-metric-learning's NTXentLoss with the clean vectors as the reference set
(anchor i's positive is reference i, every other reference is a negative). The perturbation is
ours: pml has no input-space adversary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from diffcse.finetune.objectives.base import LossContext, Objective, check_choice, check_positive

log = logging.getLogger(__name__)
NORMS = ("l2", "linf")


def _per_example_l2(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example's [T, H] block, shaped [B, 1, 1] for broadcasting."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def ascent_direction(grad: torch.Tensor, mask: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent unit step for one side: L2 = grad / ||grad|| per example, L-inf = sign(grad)."""
    grad = grad * mask.unsqueeze(-1).to(grad.dtype)  # padding positions are never perturbed
    if norm == "l2":
        length = _per_example_l2(grad)
        # A zero gradient (nothing to attack) leaves that example unperturbed instead of dividing by 0.
        return torch.where(length > 0, grad / length.clamp_min(torch.finfo(grad.dtype).tiny), torch.zeros_like(grad))
    return grad.sign()


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """Project each example's perturbation back into its epsilon ball (L2 or L-inf)."""
    if norm == "l2":
        length = _per_example_l2(delta)
        return delta * torch.clamp(epsilon / length.clamp_min(torch.finfo(delta.dtype).tiny), max=1.0)
    return delta.clamp(-epsilon, epsilon)


def adversarial_perturbation(
    inputs: list[torch.Tensor],
    masks: list[torch.Tensor],
    clean_loss: torch.Tensor,
    loss_at: Callable[[list[torch.Tensor]], torch.Tensor],
    epsilon: float,
    steps: int = 1,
    step_size: float | None = None,
    norm: str = "l2",
) -> list[torch.Tensor]:
    """Perturbations (detached, one per input side) that raise the label loss: FGSM (1 step) or PGD (k steps).

    `clean_loss` must be computed from `inputs` (its graph is kept for the caller's backward);
    `loss_at(perturbed_inputs)` recomputes the label loss for PGD's later steps. Each step moves
    by `step_size` along the per-example ascent direction and projects into the epsilon ball.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (got {epsilon})")
    alpha = default_step_size(epsilon, steps) if step_size is None else float(step_size)
    grads = torch.autograd.grad(clean_loss, inputs, retain_graph=True)
    deltas = [project(alpha * ascent_direction(g, m, norm), epsilon, norm) for g, m in zip(grads, masks, strict=True)]
    base = [x.detach() for x in inputs]
    for _ in range(steps - 1):
        deltas = [d.detach().requires_grad_(True) for d in deltas]
        loss = loss_at([x + d for x, d in zip(base, deltas, strict=True)])
        grads = torch.autograd.grad(loss, deltas)
        deltas = [project(d + alpha * ascent_direction(g, m, norm), epsilon, norm)
                  for d, g, m in zip(deltas, grads, masks, strict=True)]
    return [d.detach() for d in deltas]


def default_step_size(epsilon: float, steps: int) -> float:
    """One step: epsilon (FGSM); k steps: 2.5 * epsilon / k (Madry et al.'s PGD rule), at most epsilon."""
    return min(float(epsilon), 2.5 * float(epsilon) / steps)


class SCAL(Objective):
    """InfoNCE between adversarially perturbed and clean sentence vectors (the SCAL term)."""

    name = "scal"
    needs_inputs = True

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        epsilon: float = 1.0,
        steps: int = 1,
        step_size: float | None = None,
        norm: str = "l2",
        temperature: float = 0.05,
    ) -> None:
        super().__init__()
        self.validate({"epsilon": epsilon, "steps": steps, "step_size": step_size, "norm": norm,
                       "temperature": temperature})
        from pytorch_metric_learning.losses import NTXentLoss

        self.epsilon = float(epsilon)
        self.steps = int(steps)
        self.step_size = None if step_size is None else float(step_size)
        self.norm = norm
        self.temperature = float(temperature)
        self.infonce = NTXentLoss(temperature=self.temperature)
        self._said_where = False

    @classmethod
    def validate(cls, params: dict[str, Any]) -> None:
        """epsilon > 0, an integer steps >= 1, step_size > 0 if given, norm l2|linf, temperature > 0."""
        check_positive("scal", params, "epsilon", "temperature")
        steps = params["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"loss param: scal.steps (k) must be an integer >= 1 (got {steps!r})")
        if params["step_size"] is not None:
            check_positive("scal", params, "step_size")
        check_choice("scal", params, "norm", NORMS)

    def forward(  # type: ignore[override]
        self, features: torch.Tensor, labels: torch.Tensor, context: LossContext | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """InfoNCE(perturbed → clean) for the batch whose clean features are `features`."""
        if context is None or None in (context.inputs, context.masks, context.encode, context.head):
            raise ValueError("loss scal needs the encoder's inputs and the head (run it through Finetuner)")
        if not self._said_where:
            log.info("scal: perturbing the %s entering the trainable encoder", context.input_kind)
            self._said_where = True
        head, encode = context.head, context.encode
        # The label loss through the head on attached features, whatever the spec's CCE weight:
        # the adversary attacks the classifier being trained.
        clean_loss = F.cross_entropy(head(features), labels)
        deltas = adversarial_perturbation(
            context.inputs, context.masks, clean_loss, lambda xs: F.cross_entropy(head(encode(xs)), labels),
            self.epsilon, self.steps, self.step_size, self.norm,
        )
        adversarial = encode([x + d for x, d in zip(context.inputs, deltas, strict=True)])
        ids = torch.arange(len(features), device=features.device)
        value = self.infonce(adversarial, ids, ref_emb=features, ref_labels=ids.clone())
        size = max(float(_per_example_l2(d).max()) if self.norm == "l2" else float(d.abs().max()) for d in deltas)
        return value, {"scal.delta_norm": size}
