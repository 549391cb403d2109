"""Gradient caching: contrastive batches larger than memory, with the gradient of the whole batch.

Contrastive quality grows with the number of in-batch negatives, but a batch's activations grow
with it too. Gradient caching (Gao et al. 2021, GradCache) splits the step in three:

1. encode the batch chunk by chunk **without** gradients, keeping only the pooled vectors, and
   the random state each chunk started from;
2. compute the whole batch's loss from those vectors (the head, InfoNCE with every negative, and
   for DiffCSE the discriminator chunk by chunk) and its gradient with respect to them;
3. encode each chunk again **with** gradients, from the random state saved in 1, so every dropout
   mask (torch's and ours, packed or padded) is drawn again exactly as in 1, and backpropagate the
   cached gradient of its vectors.

Memory then holds one chunk's activations instead of the batch's, for one more forward pass. The
parameter gradients are those of the uncached step with the same dropout masks (tests compare them
to 1e-6 in float64). The head runs over the whole batch at once in step 2, so the BatchNorm head
sees the whole batch's statistics, as without caching. The random state after a step is the one
step 2 ended with, so a run resumed from a checkpoint continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist

from diffcse.core.modeling import EncoderOutput, at_least_fp32
from diffcse.training.distributed import world
from diffcse.training.objectives.contrastive import ContrastiveModel


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU generator's state and, on CUDA, the device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a chunk's columns to its own longest row (a chunk of short sentences pads less)."""
    longest = int(mask.sum(1).max())
    return ids[:, :longest], mask[:, :longest]


def cached_step(
    model: ContrastiveModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    chunk_size: int,
    loss_scale: float = 1.0,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """One training step's forward and backward with gradient caching; returns the loss (detached).

    `chunk_size` counts sentences (each sentence's views stay in one chunk). Gradients are added to
    the parameters' .grad, multiplied by `loss_scale` (the Trainer's 1 / accumulation steps).
    `autocast` makes the mixed-precision context each forward runs in.
    """
    if chunk_size < 1:
        raise ValueError(f"grad_cache_chunk: must be >= 1, got {chunk_size}")
    n, views, _ = input_ids.shape
    encoder = model.encoder
    device = input_ids.device
    flat_ids, flat_mask, views = model.flatten_views(input_ids, attention_mask)
    rows = [(start * views, min(start + chunk_size, n) * views) for start in range(0, n, chunk_size)]

    # 1. Pooled vectors chunk by chunk, no activations kept; remember each chunk's random state.
    states, pooled = [], []
    with torch.no_grad():
        for a, b in rows:
            states.append(_rng_state(device))
            with autocast():
                pooled.append(at_least_fp32(encoder(*_trim(flat_ids[a:b], flat_mask[a:b]), apply_head=False).pooled))
    cached = torch.cat(pooled).requires_grad_()

    # 2. The whole batch's loss from the cached vectors: head, InfoNCE, and DiffCSE's RTD.
    with autocast():
        embedding = encoder.project(cached)
    out = EncoderOutput(pooled=cached, embedding=embedding)
    loss = model.contrastive_loss(out, views)
    tensors, grads = [loss * loss_scale], [None]
    rtd = getattr(model, "rtd_chunked", None)
    if rtd is not None:
        # The discriminator runs chunk by chunk, each chunk's backward at once; the gradient that
        # reached each sentence vector h then goes back through the head with the contrastive one.
        rtd_value, h, h_grad = rtd(out, flat_ids, flat_mask, rows, autocast, loss_scale)
        loss = loss + model.lambda_weight * rtd_value
        tensors.append(h)
        grads.append(h_grad)
    torch.autograd.backward(tensors, grads)
    after = _rng_state(device)

    # 3. Each chunk again, with gradients, from the same random state: the same dropout masks.
    for (a, b), state in zip(rows, states, strict=True):
        _set_rng_state(state, device)
        with autocast():
            again = at_least_fp32(encoder(*_trim(flat_ids[a:b], flat_mask[a:b]), apply_head=False).pooled)
        again.backward(cached.grad[a:b])
    _set_rng_state(after, device)
    return loss.detach() * loss_scale


def all_reduce_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Average .grad over the ranks, as DDP does (cached steps run outside DDP's own hooks)."""
    _, size = world()
    if size == 1:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(size)
