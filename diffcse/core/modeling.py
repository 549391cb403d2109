"""The sentence encoder: an HF transformer, a pooler, and the optional training heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from diffcse.core.errors import InputError
from diffcse.core.folder import POOLERS
from diffcse.core.packing import Packable, packed_inputs

HEADS = ("none", "mlp", "batchnorm")


def pool(
    outputs: object, attention_mask: torch.Tensor, pooler: str, use_backbone_pooler: bool = False
) -> torch.Tensor:
    """Turn a transformer's outputs into one vector per sentence with the named pooler."""
    last = outputs.last_hidden_state
    if pooler in ("cls", "cls_before_pooler"):
        if pooler == "cls" and use_backbone_pooler:
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is None:
                raise ValueError("pooler 'cls' needs a model with a pooler layer; use 'cls_before_pooler'")
            return pooled
        return last[:, 0]
    mask = attention_mask.unsqueeze(-1).to(last.dtype)
    denom = mask.sum(1).clamp_min(1.0)
    if pooler == "avg":
        return (last * mask).sum(1) / denom
    hidden = outputs.hidden_states
    if hidden is None:
        raise ValueError(f"pooler {pooler!r} needs output_hidden_states=True")
    if pooler == "avg_first_last":
        both = (hidden[1] + hidden[-1]) / 2.0
    elif pooler == "avg_top2":
        both = (hidden[-1] + hidden[-2]) / 2.0
    else:
        raise ValueError(f"unknown pooler {pooler!r}; choose from {', '.join(POOLERS)}")
    return (both * mask).sum(1) / denom


# Encoder-decoder families whose sentence encoder is the encoder stack alone (Sentence-T5).
_ENCODER_OF = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when it is bf16/fp16 (losses and similarities under autocast); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def load_backbone(path: str, **overrides: object) -> PreTrainedModel:
    """The folder's transformer (the encoder stack of a T5); unloadable is an error naming it (never a download)."""
    try:
        from transformers import AutoConfig

        model_type = getattr(AutoConfig.from_pretrained(path, local_files_only=True), "model_type", "")
        if model_type in _ENCODER_OF:
            import transformers

            return getattr(transformers, _ENCODER_OF[model_type]).from_pretrained(path, local_files_only=True, **overrides)
        return AutoModel.from_pretrained(path, local_files_only=True, **overrides)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"model {path}: cannot load its weights ({first})") from None


class MLPHead(nn.Module):
    """SimCSE's projection: Linear(H, H) followed by Tanh."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project pooled vectors."""
        return self.activation(self.dense(x))


class BatchNormProjection(nn.Module):
    """DiffCSE's head: Linear(H,2H) → BN → ReLU → Linear(2H,H) → BN(affine=False), no biases."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size, bias=False),
            nn.BatchNorm1d(2 * hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(2 * hidden_size, hidden_size, bias=False),
            nn.BatchNorm1d(hidden_size, affine=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project the whole 2N batch at once so both views share BN statistics."""
        return self.net(x)


def make_head(kind: str, hidden_size: int) -> nn.Module | None:
    """Build the named training head (or None)."""
    if kind == "none":
        return None
    if kind == "mlp":
        return MLPHead(hidden_size)
    if kind == "batchnorm":
        return BatchNormProjection(hidden_size)
    raise ValueError(f"unknown head {kind!r}; choose from {', '.join(HEADS)}")


@dataclass
class EncoderOutput:
    """What one encoder pass returns: the pooled vector and the (head-)projected one."""

    pooled: torch.Tensor
    embedding: torch.Tensor


class SentenceEncoder(Packable, nn.Module):
    """An HF encoder with a pooler and an optional head used in training only (mlp_only_train)."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        pooler: str = "cls",
        head: str = "mlp",
        mlp_only_train: bool = True,
        use_backbone_pooler: bool = False,
    ) -> None:
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; choose from {', '.join(POOLERS)}")
        self.backbone = backbone
        self.pooler = pooler
        self.head_kind = head
        self.head = make_head(head, backbone.config.hidden_size)
        self.mlp_only_train = mlp_only_train
        self.use_backbone_pooler = use_backbone_pooler

    def packed_transformer(self) -> nn.Module:
        """The backbone (see diffcse.core.packing.Packable)."""
        return self.backbone

    def enable_packing(self) -> bool:
        """Run forwards on the batch's real tokens only (see diffcse.core.packing); True if the model allows it."""
        # The backbone's pooler layer reads row 0 of the packed row, so it stays padded.
        return not self.use_backbone_pooler and super().enable_packing()

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: object) -> SentenceEncoder:
        """Load the backbone from an HF folder (or an ST folder's root) and wrap it."""
        return cls(load_backbone(path), **kwargs)

    @property
    def hidden_size(self) -> int:
        """The backbone's hidden size (the embedding dimension)."""
        return int(self.backbone.config.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        apply_head: bool = True,
        inputs_embeds: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Encode a batch; the head applies in training, and at inference unless mlp_only_train.

        apply_head=False leaves `embedding` as the pooled vector (gradient caching projects the
        whole batch at once later, so the head's BatchNorm sees the whole batch). `inputs_embeds`
        ([B, L, H] word embeddings) replaces the ids' own, e.g. perturbed ones (adversarial views).
        """
        kwargs = {"attention_mask": attention_mask}
        kwargs.update({"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids})
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        need_hidden = self.pooler in ("avg_first_last", "avg_top2")
        packing = self.packing_for(attention_mask)
        if packing is not None:
            packed = self.backbone(
                **packed_inputs(self.backbone, packing, input_ids, token_type_ids=token_type_ids,
                                inputs_embeds=inputs_embeds),
                output_hidden_states=need_hidden,
                return_dict=True,
            )
            outputs = BaseModelOutput(
                last_hidden_state=packing.unpack(packed.last_hidden_state),
                hidden_states=tuple(packing.unpack(h) for h in packed.hidden_states) if need_hidden else None,
            )
        else:
            outputs = self.backbone(**kwargs, output_hidden_states=need_hidden, return_dict=True)
        pooled = pool(outputs, attention_mask, self.pooler, self.use_backbone_pooler)
        return EncoderOutput(pooled=pooled, embedding=self.project(pooled) if apply_head else pooled)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The embedding of pooled vectors: the head in training, and at inference unless mlp_only_train."""
        if self.head is not None and (self.training or not self.mlp_only_train):
            return self.head(pooled)
        return pooled

