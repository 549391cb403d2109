"""Run by torchrun from test_distributed.py: one DDP step on this rank's half of a saved batch."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def build(model_dir: str, head: str, objective: str = "simcse"):
    """The model both the DDP ranks and the single-process reference use (dropout off)."""
    from transformers import AutoModel, AutoTokenizer

    from diffcse.core.modeling import SentenceEncoder
    from diffcse.training.distributed import convert_batchnorm
    from diffcse.training.objectives.contrastive import ContrastiveModel
    from diffcse.training.objectives.infonce import InfoNCE

    torch.manual_seed(0)
    backbone = AutoModel.from_pretrained(model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    backbone.pooler.requires_grad_(False)
    encoder = convert_batchnorm(SentenceEncoder(backbone, pooler="cls", head=head))
    if objective == "simcse":
        # float64, so the comparison can be strict: fp32 rounding differs with how rows are split.
        return ContrastiveModel(encoder, InfoNCE(0.05, hard_negative_weight=0.5)).double().train()
    from diffcse.training.objectives.diffcse import ConditionalDiscriminator, DiffCSEModel
    from diffcse.training.objectives.generators import RandomGenerator
    from diffcse.training.objectives.masking import TokenMasker
    from diffcse.training.objectives.rtd import ReplacedTokenDetectionLoss

    tok = AutoTokenizer.from_pretrained(model_dir)
    disc = ConditionalDiscriminator(
        AutoModel.from_pretrained(model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    )
    # The shipped default: both transformers run packed (real tokens only).
    encoder.enable_packing()
    disc.enable_packing()
    model = DiffCSEModel(
        encoder, InfoNCE(0.05), TokenMasker.from_tokenizer(tok, 0.3), RandomGenerator.from_tokenizer(tok),
        disc, ReplacedTokenDetectionLoss(), lambda_weight=0.5,
    )
    return model.double().train()


def fix_corruption(model: torch.nn.Module, corrupted: torch.Tensor, labels: torch.Tensor) -> None:
    """Make the random masking/generation a given draw, so ranks and the reference see the same edits."""

    def corrupt(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, length = input_ids.shape
        assert corrupted.shape[0] == n
        return corrupted[:, :length], labels[:, :length]

    model.corrupt = corrupt


def local_rows(batch: dict, rank: int, world: int) -> dict:
    """This rank's rows of the batch, padding trimmed to its own longest row (as its collator would)."""
    per = batch["input_ids"].shape[0] // world
    local = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
    length = int(local["attention_mask"].sum(-1).max())
    return {k: v[..., :length] for k, v in local.items()}


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
    objective = sys.argv[5] if len(sys.argv) > 5 else "simcse"
    chunk = int(sys.argv[6]) if len(sys.argv) > 6 else 0  # > 0: a gradient-cached step in chunks of this size
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(model_dir, head, objective)
    batch = torch.load(batch_path)
    local = local_rows({k: batch[k] for k in ("input_ids", "attention_mask")}, rank, world)
    if objective == "diffcse":
        # Rows of the flattened [N·views, L] batch that belong to this rank.
        views = max(2, batch["input_ids"].shape[1])  # one column = unsupervised, run as two views
        per = local["input_ids"].shape[0] * views
        fix_corruption(model, batch["corrupted"][rank * per : (rank + 1) * per], batch["replaced"][rank * per : (rank + 1) * per])
    if chunk:
        from diffcse.training.gradcache import all_reduce_gradients, cached_step

        loss = cached_step(model, local["input_ids"], local["attention_mask"], chunk)
        all_reduce_gradients(list(model.parameters()))
    else:
        ddp = DistributedDataParallel(model)
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
