"""DiffCSE's frozen generators: a masked LM, embedding neighbours, or uniform random tokens.

Every generator maps (original ids, masked ids, attention mask, selected positions) to new ids.
Only selected positions may change; the caller restores position 0 and padding. None of them
trains: the MLM lives outside the module tree (so it is neither optimised nor written into
checkpoints), the other two hold only non-persistent buffers.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase

from diffcse.core.folder import resolve_model_path
from diffcse.core.packing import Packable, packed_inputs
from diffcse.training.objectives.masking import ordinary_token_ids, unusable_token_ids

GENERATORS = ("mlm:PATH", "embedding-neighbours", "random")
SAMPLING = ("argmax", "sample")


def check_same_vocabulary(encoder_tokenizer: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, what: str) -> None:
    """Raise a clear error unless both tokenizers map every token to the same id."""
    a, b = encoder_tokenizer.get_vocab(), other.get_vocab()
    if a == b:
        return
    only_a = sorted(set(a) - set(b))[:5]
    only_b = sorted(set(b) - set(a))[:5]
    moved = sorted(t for t in set(a) & set(b) if a[t] != b[t])[:5]
    raise ValueError(
        f"{what}: vocabulary differs from the encoder's ({len(b)} vs {len(a)} tokens; "
        f"only in encoder: {only_a}, only in {what}: {only_b}, different ids: {moved}). "
        "The generator must share the encoder's tokenizer (e.g. DistilBERT for BERT, DistilRoBERTa for RoBERTa)."
    )


class MLMGenerator(Packable):
    """A frozen masked LM that fills the selected positions, computing vocabulary logits only there.

    The LM head is applied to the hidden states gathered at selected positions: a forward hook on the
    MLM's base model hands its head a [1, M, H] tensor instead of [B, L, H]. Every standard MLM head
    (BERT, DistilBERT, RoBERTa, ...) is position-wise, so the tokens equal a full-sequence argmax at
    those positions, at ~ratio of the cost of the V-way projection.
    """

    def __init__(
        self,
        model: nn.Module,
        sampling: str = "argmax",
        temperature: float = 1.0,
        train_mode: bool = True,
        masked_only: bool = True,
    ) -> None:
        if sampling not in SAMPLING:
            raise ValueError(f"generator_sampling: {sampling!r} is not one of {', '.join(SAMPLING)}")
        if temperature <= 0:
            raise ValueError(f"generator_temperature: must be > 0, got {temperature}")
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.sampling = sampling
        self.temperature = temperature
        self.train_mode = train_mode
        # False = the reference's computation: logits and argmax at every position (for timing/checks).
        self.masked_only = masked_only
        self._selected: torch.Tensor | None = None
        self.model.base_model.register_forward_hook(self._gather_selected)

    def packed_transformer(self) -> nn.Module:
        """The MLM's base transformer (see diffcse.core.packing.Packable); its LM head has no dropout."""
        return self.model.base_model

    @classmethod
    def load(
        cls,
        path: str,
        encoder_tokenizer: PreTrainedTokenizerBase,
        sampling: str = "argmax",
        temperature: float = 1.0,
        train_mode: bool = True,
        masked_only: bool = True,
    ) -> MLMGenerator:
        """Load `path` as a masked LM; refuse a model without a trained MLM head or another vocabulary."""
        path = resolve_model_path(path, what="generator")
        try:
            model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True, local_files_only=True)
        except (ValueError, OSError, KeyError) as err:
            raise ValueError(f"generator: cannot load {path!r} as a masked language model ({err})") from err
        missing = info.get("missing_keys") or []
        if missing:
            # A plain encoder (e.g. a sentence-transformers BertModel) loads with a *random* MLM head.
            shown = ", ".join(sorted(missing)[:4])
            raise ValueError(
                f"generator: {path!r} is not a masked language model: its checkpoint lacks the MLM head "
                f"({len(missing)} missing weights, e.g. {shown}). Use an MLM such as distilbert-base-uncased, "
                "or --generator embedding-neighbours / random."
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (ValueError, OSError) as err:
            raise ValueError(f"generator: {path!r} has no tokenizer to check the vocabulary against ({err})") from err
        check_same_vocabulary(encoder_tokenizer, tokenizer, "generator")
        return cls(model, sampling, temperature, train_mode, masked_only)

    def _gather_selected(self, module: nn.Module, args: object, output: object) -> object:
        # Forward hook on the base model: keep only the selected positions' hidden states.
        if self._selected is None:
            return output
        hidden = output["last_hidden_state"]
        output["last_hidden_state"] = hidden[self._selected].unsqueeze(0)
        return output

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [M, V] at the M selected positions (row-major order)."""
        self._move_to(input_ids.device)
        self.model.train(self.train_mode)
        packing = self.packing_for(attention_mask)
        if packing is not None:
            # Selected positions are never padding, so the packed row keeps their row-major order.
            self._selected = packing.pack(selected.unsqueeze(-1)).squeeze(-1)
            inputs = packed_inputs(self.model.base_model, packing, input_ids)
        else:
            self._selected = selected
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        try:
            logits = self.model(**inputs, return_dict=True).logits
        finally:
            self._selected = None
        return logits[0]

    def full_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [B, L, V] at every position (the reference's computation; for checks)."""
        self._move_to(input_ids.device)
        self.model.train(self.train_mode)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).logits

    @torch.no_grad()
    def __call__(
        self,
        original_ids: torch.Tensor,
        masked_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        selected: torch.Tensor,
    ) -> torch.Tensor:
        """Fill the selected positions of the masked input with the MLM's prediction."""
        out = masked_ids.clone()
        if not self.masked_only:
            # Reference behaviour: every position takes the generator's token (the caller restores
            # position 0 and padding); unselected positions almost always get their own token back.
            logits = self.full_logits(masked_ids, attention_mask).float()
            return self._pick(logits.flatten(0, 1)).view_as(out)
        if not selected.any():
            return out
        out[selected] = self._pick(self.logits_at(masked_ids, attention_mask, selected).float())
        return out

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sampling == "argmax":
            return logits.argmax(-1)
        return torch.multinomial(torch.softmax(logits / self.temperature, dim=-1), 1).squeeze(-1)

    def _move_to(self, device: torch.device) -> None:
        if next(self.model.parameters()).device != device:
            self.model.to(device)


class TokenReplacer(nn.Module):
    """A generator that needs no model: each selected position gets `replacements(original tokens)`."""

    def replacements(self, originals: torch.Tensor) -> torch.Tensor:
        """New ids for the given original ids (1-D)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(
        self,
        original_ids: torch.Tensor,
        masked_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        selected: torch.Tensor,
    ) -> torch.Tensor:
        """The original ids with every selected position replaced; the rest untouched."""
        out = original_ids.clone()
        out[selected] = self.replacements(original_ids[selected])
        return out


def neighbour_table(
    embeddings: torch.Tensor, k: int, excluded: torch.Tensor, chunk_size: int = 2048
) -> torch.Tensor:
    """Each token's k nearest tokens by cosine of the embedding rows, never itself nor an excluded id.

    The V x V similarity is computed in row chunks so memory stays at chunk_size x V floats.
    """
    vocab = embeddings.size(0)
    if not 1 <= k < vocab - len(excluded):
        raise ValueError(f"neighbours_k: must be in [1, {vocab - len(excluded) - 1}], got {k}")
    weights = embeddings.detach().float().cpu().contiguous()
    key = (hashlib.sha1(weights.numpy().tobytes()).hexdigest(), k, tuple(excluded.tolist()))
    if key not in _TABLE_CACHE:
        # Several runs in one process (benchmarks, sweeps) start from the same matrix: build once.
        _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = _neighbour_table(weights, k, excluded, chunk_size)
    return _TABLE_CACHE[key].clone()


_TABLE_CACHE: dict[tuple, torch.Tensor] = {}


def _neighbour_table(embeddings: torch.Tensor, k: int, excluded: torch.Tensor, chunk_size: int) -> torch.Tensor:
    vocab = embeddings.size(0)
    unit = torch.nn.functional.normalize(embeddings, dim=-1)
    table = torch.empty(vocab, k, dtype=torch.long)
    for start in range(0, vocab, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, vocab))
        sims = unit[rows] @ unit.T
        sims[:, excluded] = -float("inf")
        sims[torch.arange(len(rows)), rows] = -float("inf")
        table[rows] = sims.topk(k, dim=-1).indices
    return table


class EmbeddingNeighboursGenerator(TokenReplacer):
    """Replace each selected token by one drawn uniformly from its k cosine neighbours in the input embeddings.

    For users with no MLM: it needs no extra weights. The table is built once from the encoder's
    word-embedding matrix as it is at the start of training.
    """

    def __init__(self, word_embeddings: torch.Tensor, excluded_ids: list[int], k: int = 10) -> None:
        super().__init__()
        excluded = torch.tensor(sorted(set(excluded_ids)), dtype=torch.long)
        self.k = k
        # Non-persistent: derived data, rebuilt from the model on load, kept out of checkpoints.
        self.register_buffer("table", neighbour_table(word_embeddings, k, excluded), persistent=False)

    @classmethod
    def from_encoder(cls, backbone: nn.Module, tokenizer: PreTrainedTokenizerBase, k: int) -> EmbeddingNeighboursGenerator:
        """Build the table from the backbone's input word embeddings; specials and [unusedN] are never neighbours."""
        weight = backbone.get_input_embeddings().weight
        if weight.size(0) < len(tokenizer):
            raise ValueError(
                f"generator: the encoder has {weight.size(0)} word embeddings but its tokenizer {len(tokenizer)} tokens"
            )
        # Rows past the tokenizer's size (padded vocabularies) are never produced by tokenisation.
        return cls(weight[: len(tokenizer)], unusable_token_ids(tokenizer), k)

    def replacements(self, originals: torch.Tensor) -> torch.Tensor:
        """A random one of each original token's k neighbours (never the token itself)."""
        choice = torch.randint(self.k, (originals.numel(),), device=originals.device)
        return self.table[originals, choice]


class RandomGenerator(TokenReplacer):
    """Replace each selected token by a uniformly random ordinary vocabulary token (the paper's ablation).

    Ordinary = neither special nor a never-trained placeholder like [unused12] (masking.ordinary_token_ids).
    """

    def __init__(self, ordinary_ids: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pool", ordinary_ids.long(), persistent=False)

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> RandomGenerator:
        """Draw from the tokenizer's ordinary ids (no specials, no placeholders)."""
        return cls(ordinary_token_ids(tokenizer))

    def replacements(self, originals: torch.Tensor) -> torch.Tensor:
        """A random ordinary token per position (it may by chance equal the original)."""
        return self.pool[torch.randint(len(self.pool), (originals.numel(),), device=originals.device)]


def build_generator(
    spec: str,
    tokenizer: PreTrainedTokenizerBase,
    backbone: nn.Module,
    sampling: str = "argmax",
    temperature: float = 1.0,
    train_mode: bool = True,
    k: int = 10,
    masked_only: bool = True,
) -> MLMGenerator | EmbeddingNeighboursGenerator | RandomGenerator:
    """Parse the `generator` field (mlm:PATH | embedding-neighbours | random) and build it.

    masked_only=False (generator_positions: all) is the reference's computation for the MLM: its
    argmax replaces every position, not only the masked ones; the other generators touch masked
    positions only by construction, so they refuse it.
    """
    if spec.startswith("mlm:"):
        path = spec[len("mlm:") :].strip()
        if not path:
            raise ValueError("generator: 'mlm:' needs a model folder, e.g. mlm:models/distilbert-base-uncased")
        return MLMGenerator.load(path, tokenizer, sampling, temperature, train_mode, masked_only)
    if not masked_only:
        raise ValueError(f"generator_positions: 'all' applies to an mlm:PATH generator, not {spec!r}")
    if spec == "embedding-neighbours":
        return EmbeddingNeighboursGenerator.from_encoder(backbone, tokenizer, k)
    if spec == "random":
        return RandomGenerator.from_tokenizer(tokenizer)
    raise ValueError(f"generator: {spec!r} is not one of {', '.join(GENERATORS)}")
