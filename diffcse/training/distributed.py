"""Multi-process training: gather embeddings with gradients, and BatchNorm over the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# torch.distributed.nn.functional does the same but is deprecated in favour of a private module;
# these two autograd functions are the whole of what we need.
class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.size(0)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        # Every rank's loss used our rows: their gradients add up on the owner.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class _SumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank (in rank order); gradients flow back to the owning rank."""
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum x over ranks, differentiably."""
    if world()[1] == 1:
        return x
    return _SumWithGrad.apply(x)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batch of every rank.

    torch's SyncBatchNorm refuses CPU tensors, and multi-process CPU (gloo) training is how we test
    distributed equivalence, so this computes the global mean and variance with differentiable
    all-reduces of the per-rank sums. With one process it is plain BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise with global batch statistics in training, running statistics in eval."""
        if not self.training or world()[1] == 1:
            return super().forward(x)
        # Two passes (mean, then squared deviations): E[x²]−E[x]² cancels badly in fp32.
        stats = all_reduce_with_grad(torch.cat([x.sum(0), x.new_tensor([x.size(0)])]))
        count = stats[-1]
        mean = stats[:-1] / count
        var = all_reduce_with_grad(((x - mean) ** 2).sum(0)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d in module for GlobalBatchNorm1d, keeping weights and statistics."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module
