"""The fine-tuning model: a SentenceEncoder, optionally with frozen cached lower layers, and a linear head.

Partial fine-tuning (``train_layers=n``) freezes the embeddings and all but the top n transformer
layers. The frozen part's output for a sentence never changes, so it is computed once (in eval
mode) and cached; training and evaluation then run only the top n layers. That is what makes a
multi-seed, multi-loss few-shot benchmark affordable on a CPU.

Sentence pairs (MRPC) are encoded one sentence at a time and fed to the head and the DML losses
as SentEval's pair features ``[|u - v|, u * v]``.

Objectives that perturb the input (SCAL) go through ``inputs`` / ``features_from``: the tensors
entering the trainable part (word embeddings with full fine-tuning, the cached hidden states with
partial fine-tuning) are built first, so they can be differentiated and perturbed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from diffcse.core.encoder import length_sorted_batches
from diffcse.core.modeling import SentenceEncoder, pool


class _Passthrough(nn.Module):
    """Stands in for a backbone's embeddings module: hands the given hidden states on unchanged."""

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        """Return inputs_embeds (the cached output of the frozen layers)."""
        if inputs_embeds is None:
            raise ValueError("the top-layers view takes cached hidden states as inputs_embeds")
        return inputs_embeds


def _layers_of(backbone: nn.Module) -> nn.ModuleList:
    """The transformer layer list of a BERT-style backbone (BERT, RoBERTa, MiniLM, ...)."""
    encoder = getattr(backbone, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(backbone, "embeddings"):
        raise ValueError(
            f"train_layers: partial fine-tuning supports BERT-style models (embeddings + encoder.layer); "
            f"{type(backbone).__name__} is not one; use train_layers=None (all layers)"
        )
    pos = getattr(backbone.config, "position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        raise ValueError(f"train_layers: needs absolute position embeddings, the model uses {pos!r}")
    return layers


def _view(backbone: nn.Module, layers: Sequence[nn.Module], embeddings: nn.Module | None) -> nn.Module:
    """A backbone sharing its weights but running only `layers` (and the given embeddings module)."""
    view = copy.copy(backbone)
    # Own child registries, so swapping children on the view leaves the real backbone intact.
    view._modules = dict(backbone._modules)
    encoder = copy.copy(backbone.encoder)
    encoder._modules = dict(backbone.encoder._modules)
    encoder.layer = nn.ModuleList(layers)
    view.encoder = encoder
    if embeddings is not None:
        view.embeddings = embeddings
    if "pooler" in view._modules:
        view.pooler = None
    return view


@dataclass
class EncoderInputs:
    """What enters the trainable part of the encoder for one batch of sentences (one side of a pair)."""

    embeds: torch.Tensor  # [B, T, H]: word embeddings, or the frozen layers' cached output
    mask: torch.Tensor  # [B, T] attention mask
    token_type_ids: torch.Tensor | None
    kind: str  # "word embeddings" or "cached hidden states"


@dataclass
class Prepared:
    """Texts ready for the trainable part: token ids (full fine-tuning) or cached hidden states."""

    items: list[object]
    lengths: np.ndarray


class Featurizer:
    """Turns texts into pooled vectors through the trainable part of a SentenceEncoder."""

    def __init__(
        self,
        encoder: SentenceEncoder,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_length: int,
        train_layers: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_seq_length = int(max_seq_length)
        self.device = torch.device(device)
        self.train_layers = train_layers
        self._cache: dict[str, torch.Tensor] = {}
        self.top: nn.Module | None = None
        self.bottom: nn.Module | None = None
        if train_layers is not None:
            self._split(train_layers)

    def _split(self, n: int) -> None:
        """Freeze all but the top n layers and build the bottom/top views."""
        backbone = self.encoder.backbone
        layers = _layers_of(backbone)
        if not 0 <= n <= len(layers):
            raise ValueError(f"train_layers: must be in 0..{len(layers)} for this model (got {n})")
        if self.encoder.pooler not in ("avg", "cls_before_pooler", "cls") or self.encoder.use_backbone_pooler:
            raise ValueError(f"train_layers: pooler {self.encoder.pooler!r} needs all hidden states; use avg or cls")
        cut = len(layers) - n
        for p in backbone.embeddings.parameters():
            p.requires_grad_(False)
        for layer in layers[:cut]:
            for p in layer.parameters():
                p.requires_grad_(False)
        if hasattr(backbone, "pooler") and backbone.pooler is not None:
            for p in backbone.pooler.parameters():
                p.requires_grad_(False)
        self.bottom = _view(backbone, list(layers[:cut]), None)
        self.top = _view(backbone, list(layers[cut:]), _Passthrough())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The encoder parameters that fine-tuning updates."""
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def _tokenize(self, texts: Sequence[str]) -> dict:
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length, padding=False)

    @torch.inference_mode()
    def _fill_cache(self, texts: Sequence[str], batch_size: int = 64) -> None:
        """Run the frozen bottom once for every text not cached yet (eval mode, no dropout)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if not missing:
            return
        enc = self._tokenize(missing)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        was = self.bottom.training
        self.bottom.eval()
        try:
            for idx in length_sorted_batches([len(x) for x in enc["input_ids"]], batch_size):
                batch = self.tokenizer.pad({k: [enc[k][i] for i in idx] for k in keys}, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                hidden = self.bottom(**batch, return_dict=True).last_hidden_state
                for row, i in enumerate(idx):
                    n = len(enc["input_ids"][i])
                    self._cache[missing[i]] = hidden[row, :n].to("cpu", torch.float32).clone()
        finally:
            self.bottom.train(was)

    def prepare(self, texts: Sequence[str]) -> Prepared:
        """Tokenise the texts, and with frozen layers also run and cache those layers."""
        if self.top is None:
            enc = self._tokenize(texts)
            keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
            items = [{k: enc[k][i] for k in keys} for i in range(len(texts))]
            return Prepared(items, np.asarray([len(x["input_ids"]) for x in items]))
        self._fill_cache(texts)
        items = [self._cache[t] for t in texts]
        return Prepared(items, np.asarray([len(x) for x in items]))

    def embed(self, prepared: Prepared, idx: Sequence[int]) -> torch.Tensor:
        """Pooled vectors [len(idx), H] for the chosen prepared texts, with grad through the trainable part."""
        if self.top is None:
            batch = self.tokenizer.pad([prepared.items[i] for i in idx], return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            return self.encoder(**batch).pooled
        hidden, mask = self._cached_batch(prepared, idx)
        outputs = self.top(inputs_embeds=hidden, attention_mask=mask, return_dict=True)
        return pool(outputs, mask, self.encoder.pooler, False)

    def _cached_batch(self, prepared: Prepared, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached hidden states of the chosen texts, right-padded, and their attention mask."""
        seqs = [prepared.items[i] for i in idx]
        width = max(len(s) for s in seqs)
        dtype = next(self.encoder.parameters()).dtype  # the cache is float32; a float64 model reads float64
        hidden = torch.zeros(len(seqs), width, seqs[0].shape[-1], dtype=dtype)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            hidden[row, : len(s)] = s
            mask[row, : len(s)] = 1
        return hidden.to(self.device), mask.to(self.device)

    def inputs(self, prepared: Prepared, idx: Sequence[int]) -> EncoderInputs:
        """The tensors entering the trainable part for the chosen texts, differentiable (for perturbations).

        Full fine-tuning: the word embeddings of the tokens (before position and token-type
        embeddings, as HF's ``inputs_embeds``). Partial fine-tuning: the cached output of the
        frozen layers, as a leaf that requires grad.
        """
        if self.top is None:
            batch = self.tokenizer.pad([prepared.items[i] for i in idx], return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            embeds = self.encoder.backbone.get_input_embeddings()(batch["input_ids"])
            return EncoderInputs(embeds, batch["attention_mask"], batch.get("token_type_ids"), "word embeddings")
        hidden, mask = self._cached_batch(prepared, idx)
        return EncoderInputs(hidden.requires_grad_(True), mask, None, "cached hidden states")

    def embed_inputs(self, inputs: EncoderInputs, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled vectors from `inputs` (or from `embeds` in their place, e.g. perturbed), through the trainable part."""
        x = inputs.embeds if embeds is None else embeds
        if self.top is not None:
            outputs = self.top(inputs_embeds=x, attention_mask=inputs.mask, return_dict=True)
            return pool(outputs, inputs.mask, self.encoder.pooler, False)
        kwargs = {"inputs_embeds": x, "attention_mask": inputs.mask}
        if inputs.token_type_ids is not None:
            kwargs["token_type_ids"] = inputs.token_type_ids
        need_hidden = self.encoder.pooler in ("avg_first_last", "avg_top2")
        outputs = self.encoder.backbone(**kwargs, output_hidden_states=need_hidden, return_dict=True)
        return pool(outputs, inputs.mask, self.encoder.pooler, self.encoder.use_backbone_pooler)

    def train(self, mode: bool = True) -> None:
        """Set train/eval mode on the encoder (dropout in the trainable layers)."""
        self.encoder.train(mode)


def pair_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SentEval's sentence-pair features [|u - v|, u * v]."""
    return torch.cat([(u - v).abs(), u * v], dim=-1)


class FineTuneModel(nn.Module):
    """Encoder features → linear classification head; pairs become [|u - v|, u * v]."""

    def __init__(self, featurizer: Featurizer, num_classes: int, pair: bool) -> None:
        super().__init__()
        self.featurizer = featurizer
        self.encoder = featurizer.encoder
        self.pair = pair
        dim = featurizer.encoder.hidden_size
        self.feature_dim = 2 * dim if pair else dim
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, first: Prepared, idx: Sequence[int], second: Prepared | None = None) -> torch.Tensor:
        """The feature vectors the head and the DML losses see, for the chosen examples."""
        u = self.featurizer.embed(first, idx)
        if not self.pair:
            return u
        if second is None:
            raise ValueError("a pair task needs the second sentences")
        return pair_features(u, self.featurizer.embed(second, idx))

    def inputs(self, first: Prepared, idx: Sequence[int], second: Prepared | None = None) -> list[EncoderInputs]:
        """The encoder inputs of the chosen examples: one entry, or two for a pair task."""
        if self.pair and second is None:
            raise ValueError("a pair task needs the second sentences")
        out = [self.featurizer.inputs(first, idx)]
        return out + [self.featurizer.inputs(second, idx)] if self.pair else out

    def features_from(self, inputs: list[EncoderInputs], embeds: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The feature vectors computed from encoder inputs (or from `embeds` replacing them, e.g. perturbed)."""
        xs = [None] * len(inputs) if embeds is None else embeds
        vecs = [self.featurizer.embed_inputs(i, x) for i, x in zip(inputs, xs, strict=True)]
        return pair_features(*vecs) if self.pair else vecs[0]
