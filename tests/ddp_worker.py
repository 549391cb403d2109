"""Run by torchrun from test_distributed.py: one DDP step on this rank's half of a saved batch."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def build(model_dir: str, head: str, objective: str = "simcse"):
    """The model both the DDP ranks and the single-process reference use (dropout off)."""
    from transformers import AutoModel

    from diffcse.distributed import convert_batchnorm
    from diffcse.modeling import SentenceEncoder
    from diffcse.objectives.contrastive import ContrastiveModel
    from diffcse.objectives.infonce import InfoNCE

    torch.manual_seed(0)
    backbone = AutoModel.from_pretrained(model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    backbone.pooler.requires_grad_(False)
    encoder = convert_batchnorm(SentenceEncoder(backbone, pooler="cls", head=head))
    # float64, so the comparison can be strict: fp32 rounding differs with how rows are split.
    return ContrastiveModel(encoder, InfoNCE(0.05, hard_negative_weight=0.5)).double().train()


def snapshot(model: torch.nn.Module, loss: torch.Tensor) -> dict:
    """What the test compares: loss, every gradient, every BN buffer."""
    return {
        "loss": loss.detach(),
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers() if "running" in n},
    }


def main() -> None:
    """Rank r takes rows [r·B, (r+1)·B) of the batch, steps once under DDP, rank 0 saves."""
    model_dir, head, batch_path, out_path = sys.argv[1:5]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(model_dir, head)
    ddp = DistributedDataParallel(model)
    batch = torch.load(batch_path)
    per = batch["input_ids"].shape[0] // world
    local = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
    loss = ddp(**local)["loss"]
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    if rank == 0:
        torch.save(snapshot(model, mean_loss), out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
