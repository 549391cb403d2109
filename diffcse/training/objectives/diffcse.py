"""DiffCSE: SimCSE's contrastive loss plus conditional replaced-token detection (RTD).

    L = L_contrast + λ · L_RTD                                      (DiffCSEModel.forward)

Per step: both views of each sentence go through the encoder in one pass (as in SimCSE); each view
is masked independently and a frozen generator fills the masked positions; a separate
discriminator, conditioned on that view's sentence vector h (put at position 0 of its embedding
output by a forward hook), tells replaced tokens from kept ones. L_RTD's gradient reaches the
encoder through h, so the sentence vector is pushed to carry what the edit changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from diffcse.core.modeling import EncoderOutput, SentenceEncoder, load_backbone
from diffcse.core.packing import Packable, packed_inputs
from diffcse.training.config import TrainConfig
from diffcse.training.objectives.contrastive import ContrastiveModel
from diffcse.training.objectives.generators import SAMPLING, MLMGenerator, build_generator
from diffcse.training.objectives.infonce import InfoNCE
from diffcse.training.objectives.masking import TokenMasker
from diffcse.training.objectives.rtd import ReplacedTokenDetectionLoss

log = logging.getLogger(__name__)

DISCRIMINATOR_INPUTS = ("projected", "pooled")


class PositionZeroCondition:
    """A forward hook on a transformer's embeddings module that puts a given vector at position 0.

    The embeddings module's output (word + position + type embeddings after LayerNorm and dropout)
    keeps every other position; position 0 becomes h. Outside `use(h)` the hook passes the output
    through unchanged. Built on `register_forward_hook`, so transformers is used unmodified.
    """

    def __init__(self, embeddings: nn.Module) -> None:
        self.vector: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None
        self.handle = embeddings.register_forward_hook(self._hook)

    @contextmanager
    def use(self, h: torch.Tensor, starts: torch.Tensor | None = None) -> Iterator[None]:
        """Condition every forward inside the block on h ([B, H]); `starts` = rows' first tokens if packed."""
        self.vector, self.starts = h, starts
        try:
            yield
        finally:
            self.vector = self.starts = None

    def _hook(self, module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        if self.vector is None:
            return output
        if not isinstance(output, torch.Tensor) or output.dim() != 3:
            raise TypeError(f"discriminator: expected the embeddings module to return [B, L, H], got {type(output).__name__}")
        h = self.vector
        if self.starts is not None:
            # Packed [1, T, H]: each sentence's position 0 is its first token in the row.
            if h.shape != (self.starts.numel(), output.size(2)) or output.size(0) != 1:
                raise ValueError(
                    f"discriminator: sentence vectors {tuple(h.shape)} do not fit its packed embeddings {tuple(output.shape)}"
                )
            return output[0].index_copy(0, self.starts, h.to(output.dtype)).unsqueeze(0)
        if h.shape != (output.size(0), output.size(2)):
            raise ValueError(
                f"discriminator: sentence vectors {tuple(h.shape)} do not fit its embeddings {tuple(output.shape)}"
            )
        # cat, not in-place assignment: keeps autograd's view of h intact so L_RTD reaches the encoder.
        return torch.cat([h.to(output.dtype).unsqueeze(1), output[:, 1:]], dim=1)


class ConditionalDiscriminator(Packable, nn.Module):
    """A transformer plus Linear(H, 2) that labels each token replaced/kept, conditioned on h at position 0."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        embeddings = getattr(transformer, "embeddings", None)
        if not isinstance(embeddings, nn.Module):
            raise ValueError(
                f"discriminator: {type(transformer).__name__} has no `embeddings` module to condition on h"
            )
        self.head = nn.Linear(int(transformer.config.hidden_size), 2)
        # Only token states are used; a frozen pooler keeps DDP from waiting for its gradients.
        if getattr(transformer, "pooler", None) is not None:
            transformer.pooler.requires_grad_(False)
        self.condition = PositionZeroCondition(embeddings)

    def packed_transformer(self) -> nn.Module:
        """The discriminator's transformer (see diffcse.core.packing.Packable)."""
        return self.transformer

    @classmethod
    def from_pretrained(cls, path: str, layers: int | None = None) -> ConditionalDiscriminator:
        """Initialise from the encoder's checkpoint, optionally keeping only its first `layers` layers."""
        total = int(AutoConfig.from_pretrained(path).num_hidden_layers)
        if layers is not None and not 1 <= layers <= total:
            raise ValueError(f"discriminator_layers: must be in [1, {total}] for {path}, got {layers}")
        kwargs = {} if layers is None else {"num_hidden_layers": layers}
        return cls(load_backbone(path, **kwargs))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Replaced/kept logits [B, L, 2] for the (corrupted) ids, given sentence vectors h [B, H]."""
        packing = self.packing_for(attention_mask)
        if packing is not None:
            # Padding positions get zero logits; L_RTD ignores them (packing is off when it counts them).
            with self.condition.use(h, packing.starts):
                hidden = self.transformer(**packed_inputs(self.transformer, packing, input_ids), return_dict=True)
            return packing.unpack(self.head(hidden.last_hidden_state))
        with self.condition.use(h):
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return self.head(hidden.last_hidden_state)


class DiffCSEModel(ContrastiveModel):
    """SimCSE's model plus masking, a frozen generator, the conditional discriminator and L_RTD."""

    def __init__(
        self,
        encoder: SentenceEncoder,
        loss: InfoNCE,
        masker: TokenMasker,
        generator: object,
        discriminator: ConditionalDiscriminator,
        rtd_loss: ReplacedTokenDetectionLoss,
        lambda_weight: float = 0.005,
        discriminator_input: str = "projected",
    ) -> None:
        super().__init__(encoder, loss)
        if discriminator_input not in DISCRIMINATOR_INPUTS:
            raise ValueError(
                f"discriminator_input: {discriminator_input!r} is not one of {', '.join(DISCRIMINATOR_INPUTS)}"
            )
        if lambda_weight < 0:
            raise ValueError(f"lambda_weight: must be >= 0, got {lambda_weight}")
        self.masker = masker
        # An nn.Module generator (neighbours/random) holds only non-persistent buffers; an MLMGenerator
        # is a plain object, so its weights stay out of the optimiser and the checkpoints.
        self.generator = generator
        self.discriminator = discriminator
        self.rtd_loss = rtd_loss
        self.lambda_weight = lambda_weight
        self.discriminator_input = discriminator_input

    @classmethod
    def from_config(
        cls,
        config: TrainConfig,
        encoder: SentenceEncoder,
        loss: InfoNCE,
        tokenizer: PreTrainedTokenizerBase,
        model_path: str,
    ) -> DiffCSEModel:
        """Build every DiffCSE part from the training config (the discriminator from model_path)."""
        if config.generator_sampling not in SAMPLING:
            raise ValueError(f"generator_sampling: {config.generator_sampling!r} is not one of {', '.join(SAMPLING)}")
        if config.head != "batchnorm":
            log.info("DiffCSE with head %r; the paper's recipe uses head: batchnorm", config.head)
        masker = TokenMasker.from_tokenizer(tokenizer, config.mask_ratio)
        generator = build_generator(
            config.generator, tokenizer, encoder.backbone, config.generator_sampling,
            config.generator_temperature, config.generator_train_mode, config.neighbours_k,
            masked_only=config.generator_positions == "masked",
        )
        discriminator = ConditionalDiscriminator.from_pretrained(model_path, config.discriminator_layers)
        if discriminator.transformer.config.hidden_size != encoder.hidden_size:
            raise ValueError("discriminator: hidden size differs from the encoder's")
        # Counting padding in L_RTD (the reference's behaviour) needs the pads' real logits.
        discriminator.speed_up(config.packing and not config.rtd_count_padding, config.fast_dropout)
        if isinstance(generator, MLMGenerator):
            generator.speed_up(config.packing, config.fast_dropout)
        return cls(
            encoder, loss, masker, generator, discriminator,
            ReplacedTokenDetectionLoss(config.rtd_count_padding), config.lambda_weight, config.discriminator_input,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """L = L_contrast + λ·L_RTD over one batch of [N, views, L] ids."""
        out, ids, mask, views = self.encode_views(input_ids, attention_mask)
        loss_contrast = self.contrastive_loss(out, views)
        loss_rtd = self.replaced_token_detection(out, ids, mask)
        self.record(loss_rtd=loss_rtd.item())
        return {"loss": loss_contrast + self.lambda_weight * loss_rtd + self.auxiliary_mlm(input_ids, attention_mask)}

    def rtd_chunked(
        self,
        out: EncoderOutput,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: list[tuple[int, int]],
        autocast: Callable[[], AbstractContextManager],
        loss_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L_RTD with the discriminator run (and backpropagated) one chunk of rows at a time.

        For gradient caching (diffcse.training.gradcache): each chunk's share of the whole batch's
        mean is backpropagated at once, scaled by λ·loss_scale, into the discriminator's .grad;
        returns the loss value, the sentence vectors h it was conditioned on, and dL/dh.
        """
        corrupted, replaced = self.corrupt(input_ids, attention_mask)
        h = out.embedding if self.discriminator_input == "projected" else out.pooled
        dtype = torch.promote_types(h.dtype, torch.float32)
        denominator = self.rtd_loss.denominator(attention_mask, dtype)
        h_grad = torch.zeros_like(h)
        total = torch.zeros((), dtype=dtype, device=h.device)
        logits_all = torch.zeros((*input_ids.shape, 2), dtype=dtype, device=h.device)
        for a, b in rows:
            # Padding counts in L_RTD only with rtd_count_padding; otherwise a chunk may drop its pad columns.
            cols = input_ids.size(1) if self.rtd_loss.count_padding else int(attention_mask[a:b].sum(1).max())
            h_part = h[a:b].detach().requires_grad_()
            with autocast():
                logits = self.discriminator(corrupted[a:b, :cols], attention_mask[a:b, :cols], h_part)
            part, _ = self.rtd_loss(logits, replaced[a:b, :cols], attention_mask[a:b, :cols], denominator)
            (part * (self.lambda_weight * loss_scale)).backward()
            h_grad[a:b] = h_part.grad
            total = total + part.detach()
            logits_all[a:b, :cols] = logits.detach().to(dtype)
        with torch.no_grad():
            _, stats = self.rtd_loss(logits_all, replaced, attention_mask, denominator)
        self.record(stats, loss_rtd=total.item())
        return total, h, h_grad

    @torch.no_grad()
    def corrupt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask each row, let the generator fill it in; return the new ids and the replaced labels."""
        masked = self.masker(input_ids, attention_mask)
        generated = self.generator(input_ids, masked.input_ids, attention_mask, masked.selected)
        generated[:, 0] = input_ids[:, 0]  # the reference restores [CLS]/<s> at position 0
        attended = attention_mask.bool()
        if self.rtd_loss.count_padding:
            # The reference's discriminator input, `generated * attention_mask`: pads become id 0.
            # Their logits count in L_RTD then, so what they read matters (for BERT, 0 is [PAD]).
            generated = generated * attention_mask
        else:
            generated = torch.where(attended, generated, input_ids)  # padding stays padding
        replaced = (generated != input_ids) & attended
        return generated, replaced

    def replaced_token_detection(
        self, out: EncoderOutput, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """L_RTD of the discriminator conditioned on each row's sentence vector; records its accuracies."""
        corrupted, replaced = self.corrupt(input_ids, attention_mask)
        h = out.embedding if self.discriminator_input == "projected" else out.pooled
        logits = self.discriminator(corrupted, attention_mask, h)
        loss, stats = self.rtd_loss(logits, replaced, attention_mask)
        self.record(stats)
        return loss
