"""USCAL: unsupervised contrastive adversarial learning (the `uscal` objective).

SimCSE's step, plus an adversarial view made in the word-embedding space: the first view's word
embeddings move by a perturbation δ of size `epsilon` along the gradient of the contrastive loss
itself (δ = ε·g/‖g‖₂ per sentence, or ε·sign(g) for the L∞ norm; with adv_steps k > 1, k − 1
further steps of projected gradient ascent on the adversarial loss inside the ε-ball, each of size
2.5ε/k), and the perturbed sentence vector is pulled to its clean one by a second InfoNCE term
(the batch's other clean vectors as negatives):

    L = L_SimCSE(z1, z2) + adv_weight · L_InfoNCE(z1, z_adv)

Padding positions are never perturbed; the perturbation itself carries no gradient (it is a fixed
offset of the step), while the word embeddings under it are trained as usual.
"""

from __future__ import annotations

import torch

from diffcse.core.modeling import SentenceEncoder
from diffcse.training.objectives.contrastive import ContrastiveModel
from diffcse.training.objectives.infonce import InfoNCE

NORMS = ("l2", "linf")


def perturbation(gradient: torch.Tensor, attention_mask: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """A step of size epsilon along `gradient` ([B, L, H]) per sentence, zero at padding."""
    real = attention_mask.unsqueeze(-1).to(gradient.dtype)
    g = gradient * real
    if norm == "linf":
        return epsilon * g.sign()
    scale = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return epsilon * g / scale


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """delta brought back into the epsilon-ball of the norm, per sentence."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    size = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
    return delta * torch.clamp(epsilon / size.clamp_min(1e-12), max=1.0)


class AdversarialContrastiveModel(ContrastiveModel):
    """SimCSE plus USCAL's adversarial view (see the module docstring)."""

    def __init__(
        self,
        encoder: SentenceEncoder,
        loss: InfoNCE,
        epsilon: float = 1.0,
        norm: str = "l2",
        steps: int = 1,
        weight: float = 1.0,
    ) -> None:
        super().__init__(encoder, loss)
        if epsilon <= 0:
            raise ValueError(f"adv_epsilon: must be > 0, got {epsilon}")
        if norm not in NORMS:
            raise ValueError(f"adv_norm: {norm!r} is not one of {', '.join(NORMS)}")
        if steps < 1:
            raise ValueError(f"adv_steps: must be >= 1, got {steps}")
        self.epsilon, self.norm, self.steps, self.weight = epsilon, norm, steps, weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_SimCSE + adv_weight · InfoNCE(clean first views, adversarial first views)."""
        flat_ids, flat_mask, views = self.flatten_views(input_ids, attention_mask)
        embeds = self.encoder.backbone.get_input_embeddings()(flat_ids)
        out = self.encoder(flat_ids, flat_mask, inputs_embeds=embeds)
        loss = self.contrastive_loss(out, views)
        first = torch.arange(0, flat_ids.size(0), views, device=flat_ids.device)
        ids, mask, clean = flat_ids[first], flat_mask[first], embeds[first]
        (gradient,) = torch.autograd.grad(loss, embeds, retain_graph=True)
        delta = self.adversarial_offset(gradient[first], ids, mask, clean, out.embedding[first])
        adv = self.encoder(ids, mask, inputs_embeds=clean + delta).embedding
        loss_adv, stats = self.loss(out.embedding[first], adv)
        self.record(loss_adv=float(loss_adv.detach()), adv_pos_sim=stats["pos_sim"])
        return {"loss": loss + self.weight * loss_adv + self.auxiliary_mlm(input_ids, attention_mask)}

    def adversarial_offset(
        self, gradient: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, clean: torch.Tensor, z_clean: torch.Tensor
    ) -> torch.Tensor:
        """δ (detached): one step along the contrastive gradient, then k-1 projected steps on the adversarial loss."""
        delta = perturbation(gradient, mask, self.epsilon, self.norm).detach()
        step = 2.5 * self.epsilon / self.steps
        for _ in range(self.steps - 1):
            delta.requires_grad_(True)
            adv = self.encoder(ids, mask, inputs_embeds=clean.detach() + delta).embedding
            loss_adv, _ = self.loss(z_clean.detach(), adv)
            (g,) = torch.autograd.grad(loss_adv, delta)
            delta = project(delta.detach() + perturbation(g, mask, step, self.norm), self.epsilon, self.norm).detach()
        return delta
