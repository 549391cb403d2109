"""Masked-language-model training: the `mlm` objective and SimCSE's auxiliary MLM loss (`mlm_weight`).

`--objective mlm` is continued masked-LM training on a corpus (domain adaptation, or making the
MLM-pretrained start and the smaller generator the papers begin from). Masking is the HF masked-LM
collator's (15% by default; 80/10/10), applied in the forward pass. A folder without an MLM head (e.g. a sentence-transformers
model) gets a fresh one whose decoder is tied to the word embeddings, as the architecture ties it.
The export is a masked-LM folder (head included) that `--generator mlm:PATH` accepts and that
AutoModel and diffcse's Encoder load as an encoder.

`mlm_weight > 0` adds SimCSE's `do_mlm` term to simcse/sup-simcse/diffcse: the first view of each
sentence masked the same way, its MLM loss (through the encoder's own transformer and the head)
weighted by mlm_weight.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling, PreTrainedModel

from diffcse.core.errors import InputError
from diffcse.core.modeling import SentenceEncoder

log = logging.getLogger(__name__)


def load_masked_lm(path: str) -> PreTrainedModel:
    """The folder as a masked LM; a folder without an MLM head gets a fresh one tied to the word embeddings."""
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"model {path}: cannot be loaded as a masked language model ({first})") from None
    missing = info.get("missing_keys") or []
    if missing:
        log.warning("%s has no MLM head (%d weights missing); training a fresh one, its decoder tied to the word "
                    "embeddings", path, len(missing))
    return model


def mlm_masker(tokenizer: object, probability: float) -> DataCollatorForLanguageModeling:
    """HF's masked-LM collator (its masking: never special tokens or padding; 80% [MASK], 10% random, 10% kept)."""
    if tokenizer.mask_token is None:
        raise InputError(f"the tokenizer {type(tokenizer).__name__} has no mask token; masked-LM training needs one")
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability)


def mask_batch(
    masker: DataCollatorForLanguageModeling, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's masking of [N, L] ids (padding and special tokens never masked): masked ids and labels (-100 elsewhere).

    Done in the model's forward, not in the data collator: the data loader collates one batch ahead,
    so masks drawn there would not replay after a resume.
    """
    ids = input_ids.detach().cpu().clone()
    special = torch.tensor(
        [masker.tokenizer.get_special_tokens_mask(row, already_has_special_tokens=True) for row in ids.tolist()],
        dtype=torch.bool,
    ) | ~attention_mask.detach().cpu().bool()
    masked, labels = masker.torch_mask_tokens(ids, special)
    return masked.to(input_ids.device), labels.to(input_ids.device)


class MaskedLMModel(nn.Module):
    """The `mlm` objective: a masked LM whose transformer is also a SentenceEncoder (for STS-B dev scoring)."""

    # Checkpoint names left out as duplicates of shared tensors (set by the trainer; HF's attribute name).
    _keys_to_ignore_on_save: list[str] | None = None

    def __init__(self, mlm: PreTrainedModel, encoder: SentenceEncoder, masker: DataCollatorForLanguageModeling) -> None:
        super().__init__()
        if encoder.backbone is not mlm.base_model:
            raise ValueError("the encoder must wrap the masked LM's own transformer")
        self.mlm = mlm
        self.encoder = encoder
        self.masker = masker
        self.gather_negatives = False  # no negatives in a masked-LM step
        self._losses: list[float] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The masked-LM loss of a [N, 1, L] batch, masked here (exactly the HF model's own loss)."""
        ids, mask = input_ids[:, 0], attention_mask[:, 0]
        masked, labels = mask_batch(self.masker, ids, mask)
        loss = self.mlm(input_ids=masked, attention_mask=mask, labels=labels, return_dict=True).loss
        self._losses.append(float(loss.detach()))
        return {"loss": loss}

    def tie_weights(self) -> None:
        """Called by the Trainer after loading a checkpoint without the shared tensors: they are the same
        Parameters here, so there is nothing to tie again."""

    def pop_stats(self) -> dict[str, float]:
        """Mean MLM loss since the last log line."""
        out = {"loss_mlm": sum(self._losses) / len(self._losses)} if self._losses else {}
        self._losses.clear()
        return out


class AuxiliaryMLM(nn.Module):
    """SimCSE's auxiliary MLM term: mask the first view of each sentence, predict it through the shared transformer."""

    def __init__(self, mlm: PreTrainedModel, masker: DataCollatorForLanguageModeling, weight: float) -> None:
        super().__init__()
        self.mlm = mlm
        self.masker = masker
        self.weight = weight
        self.stats: dict[str, list[float]] = defaultdict(list)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """weight x the MLM loss of [N, L] ids (first views), masked here."""
        masked, labels = mask_batch(self.masker, input_ids, attention_mask)
        out = self.mlm(input_ids=masked, attention_mask=attention_mask, labels=labels, return_dict=True)
        return self.weight * out.loss
