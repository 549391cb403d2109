"""Training configuration: one dataclass, loadable from YAML, overridable from the command line.

Fields left as None take the objective's paper recipe (`RECIPES`) when the config is validated,
and the resolved values are what `train_config.yaml` records, so a run always says what it ran.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffcse.core.errors import InputError
from diffcse.core.io import write_text_atomic
from diffcse.core.options import check_fields, opt, read_yaml
from diffcse.core.runtime import PRECISIONS

OBJECTIVES = ("simcse", "sup-simcse", "diffcse", "uscal", "mlm", "sbert-softmax", "sbert-cosine")
# Objectives trained on labelled pairs (a CSV sentence1,sentence2,label|score); their target column.
PAIR_OBJECTIVES = {"sbert-softmax": "label", "sbert-cosine": "score"}
# Training heads (diffcse.core.modeling.HEADS) plus "auto": the objective's recipe.
HEADS = ("auto", "none", "mlp", "batchnorm")
POOLER_CHOICES = ("auto", "cls", "cls_before_pooler", "avg", "avg_first_last", "avg_top2")
GENERATOR_POSITIONS = ("masked", "all")
NONFINITE_POLICIES = ("stop", "skip")
CORPUS_LOADING = ("auto", "memory", "disk")
# The papers' recipes (SimCSE: BERT-base unsup / sup; DiffCSE: BERT-base STS), applied to every
# field the user left unset.
RECIPES: dict[str, dict[str, Any]] = {
    "simcse": {"head": "mlp", "learning_rate": 3e-5, "num_epochs": 1.0, "batch_size": 64},
    # USCAL trains SimCSE's recipe with its adversarial view added.
    "uscal": {"head": "mlp", "learning_rate": 3e-5, "num_epochs": 1.0, "batch_size": 64},
    "sup-simcse": {"head": "mlp", "learning_rate": 5e-5, "num_epochs": 3.0, "batch_size": 512},
    "diffcse": {"head": "batchnorm", "learning_rate": 7e-6, "num_epochs": 2.0, "batch_size": 64,
                "mask_ratio": 0.30, "lambda_weight": 0.005},
    # Continued masked-LM training (BERT's own recipe, as for domain adaptation); no head, no negatives.
    "mlm": {"head": "none", "learning_rate": 5e-5, "num_epochs": 1.0, "batch_size": 64},
    # Sentence-BERT's NLI / STS recipes (batch 16, lr 2e-5, 1 epoch).
    "sbert-softmax": {"head": "none", "learning_rate": 2e-5, "num_epochs": 1.0, "batch_size": 16},
    "sbert-cosine": {"head": "none", "learning_rate": 2e-5, "num_epochs": 1.0, "batch_size": 16},
}


@dataclass
class TrainConfig:
    """Every knob of a training run; None means 'the objective's recipe' (RECIPES)."""

    # What to train and on what.
    model: str | None = opt(None, "HF or sentence-transformers folder (default: the packaged all-MiniLM-L6-v2)")
    train_file: str | None = opt(
        None, "one sentence per line (simcse/diffcse) or a CSV sent0,sent1[,hard_neg] (sup-simcse); "
        "default: $DIFFCSE_DATA_DIR/corpus/derived/sentences.txt")
    output_dir: str = opt("runs/simcse", "where the best model, checkpoints and logs go")
    objective: str = opt("simcse", "training objective", choices=OBJECTIVES)
    encoding_errors: str = opt("strict", "invalid UTF-8 in the training file: an error, or replaced",
                               choices=("strict", "replace"))
    corpus_loading: str = opt("auto", "memory: tokenise the file up front; disk: read sentences per batch "
                              "through a line index (corpora larger than RAM); auto: disk above 1 GiB",
                              choices=CORPUS_LOADING)
    distinct_batches: bool = opt(True, "keep exact duplicate texts out of one batch (they would be false "
                                 "negatives); the number moved is logged")
    # Encoder and heads.
    pooler: str = opt("auto", "auto = the folder's own pooling, else [CLS]; the training head applies "
                      "on top of any pooler (the reference applies it with cls only)", choices=POOLER_CHOICES)
    head: str = opt("auto", "training head: mlp (SimCSE), batchnorm (DiffCSE), none; auto = the objective's",
                    choices=HEADS)
    mlp_only_train: bool = opt(True, "use the head for the loss only; the embedding is the pooled vector")
    max_seq_length: int = opt(32, "tokens per sentence, special tokens included", min=3)
    packing: bool = opt(True, "run forwards on real tokens only, no padding (falls back by itself where a "
                        "model cannot)")
    fast_dropout: bool = opt(True, "dropout masks from 31-bit integers (same law, ~2x cheaper on CPU); "
                             "off = torch's bernoulli")
    # Contrastive loss.
    temperature: float = opt(0.05, "InfoNCE temperature", min=1e-6)
    hard_negative_weight: float = opt(0.0, "sup-simcse: added to each row's own hard-negative logit")
    # Optimisation.
    batch_size: int | None = opt(None, "sentences per step and process (recipe: 64; sup-simcse 512)", min=1)
    learning_rate: float | None = opt(None, "peak learning rate (recipe: simcse 3e-5, sup-simcse 5e-5, "
                                      "diffcse 7e-6)", min=0.0)
    num_epochs: float | None = opt(None, "epochs (recipe: simcse 1, sup-simcse 3, diffcse 2)", min=0.0,
                                   aliases=("--epochs",))
    max_steps: int = opt(-1, "optimiser steps; overrides num_epochs when > 0")
    warmup_steps: int = opt(0, "linear warm-up steps", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = none)", min=0.0)
    precision: str = opt("auto", "auto = bf16 where the hardware has bf16 units, else fp32; fp16 needs a GPU",
                         choices=PRECISIONS)
    seed: int = opt(42, "seeds everything random: heads, data order, dropout, masking")
    gradient_accumulation_steps: int = opt(1, "batches per optimiser step (more steps, not more negatives)", min=1)
    grad_cache_chunk: int | None = opt(None, "gradient caching: encode the batch this many sentences at a "
                                       "time, so memory holds one chunk's activations; the step's gradient is "
                                       "the whole batch's (one extra forward pass)", min=1)
    on_nonfinite: str = opt("stop", "a NaN/inf loss or gradient: stop the run, or skip the step",
                            choices=NONFINITE_POLICIES)
    max_skipped_steps: int = opt(10, "with on_nonfinite=skip: stop after this many skipped steps", min=0)
    # Evaluation, logging, checkpoints.
    eval_steps: int = opt(125, "evaluate STS-B dev every N steps", min=1)
    do_eval: bool = opt(True, "evaluate STS-B dev every --eval-steps and keep the best model")
    senteval_data: str | None = opt(None, "folder holding SentEval's downstream/ (default: $DIFFCSE_DATA_DIR/senteval)")
    dev_file: str | None = opt(None, "select checkpoints on your own dev set (sentence1<TAB>sentence2<TAB>score "
                               "a line) instead of STS-B dev")
    logging_steps: int = opt(10, "log every N steps", min=1)
    save_steps: int = opt(250, "checkpoint every N steps", min=1)
    save_total_limit: int = opt(2, "checkpoints kept", min=1)
    resume: bool = opt(False, "continue from the newest complete checkpoint in OUTPUT_DIR/checkpoints")
    dataloader_workers: int = opt(0, "data loader processes", min=0)
    threads: int | None = opt(None, "torch CPU threads (default: torch's)", min=1)
    # Multi-process (torchrun/accelerate): negatives from every rank, BN statistics over all ranks.
    gather_negatives: bool = opt(True, "under DDP: every rank's sentences are negatives")
    sync_batchnorm: bool = opt(True, "under DDP: BatchNorm statistics over the global batch")
    # DiffCSE (objective: diffcse).
    generator: str | None = opt(None, "DiffCSE generator: mlm:PATH (the paper's), embedding-neighbours or "
                                "random; required for diffcse")
    generator_positions: str = opt("masked", "positions the MLM generator fills: masked (ours: logits only "
                                   "there) or all (the reference: argmax at every position)",
                                   choices=GENERATOR_POSITIONS)
    mask_ratio: float | None = opt(None, "share of tokens masked per view (recipe: 0.30)")
    lambda_weight: float | None = opt(None, "weight of L_RTD (recipe: 0.005)", min=0.0)
    generator_sampling: str = opt("argmax", "argmax (the reference) or sample", choices=("argmax", "sample"))
    generator_temperature: float = opt(1.0, "softmax temperature when sampling", min=1e-6)
    generator_train_mode: bool = opt(True, "the reference leaves the frozen generator's dropout on")
    neighbours_k: int = opt(10, "embedding-neighbours generator: candidates per token", min=1)
    discriminator_layers: int | None = opt(None, "discriminator depth (default: all the encoder's layers)", min=1)
    discriminator_input: str = opt("projected", "what conditions the discriminator: the head's output or "
                                   "the pooled vector", choices=("projected", "pooled"))
    rtd_count_padding: bool = opt(False, "average L_RTD over padding too, as the reference does")
    # Masked-LM (objective: mlm) and SimCSE's auxiliary MLM loss.
    mlm_weight: float = opt(0.0, "simcse/sup-simcse/diffcse: add mlm_weight x an MLM loss on the first view "
                            "(SimCSE's do_mlm; its value 0.1)", min=0.0)
    mlm_probability: float = opt(0.15, "share of tokens the masked-LM collator masks (objective mlm, mlm_weight)")
    # USCAL's adversarial view (objective: uscal).
    adv_epsilon: float = opt(1.0, "uscal: size of the word-embedding perturbation of each sentence (our default)",
                             min=1e-12)
    adv_norm: str = opt("l2", "uscal: the perturbation's norm", choices=("l2", "linf"))
    adv_steps: int = opt(1, "uscal: 1 = one step along the contrastive gradient; k = k-1 more projected steps", min=1)
    adv_weight: float = opt(1.0, "uscal: weight of the adversarial InfoNCE term", min=0.0)
    # Sentence-BERT's pair objectives (sbert-softmax, sbert-cosine).
    score_scale: float = opt(1.0, "sbert-cosine: scores are divided by this to give the cosine target "
                             "(5 for 0..5 STS scores)", min=1e-9)

    def validate(self) -> None:
        """Reject impossible settings, naming the field; fill unset fields from the objective's recipe.

        The resolved values are stored back on the config, so the saved train_config.yaml (and a
        --resume from it) records what was actually trained.
        """
        check_fields(self)
        if self.head not in HEADS:
            raise InputError(f"head: {self.head!r} is not one of {', '.join(HEADS)}")
        recipe = RECIPES[self.objective]
        if self.head == "auto":
            self.head = recipe["head"]
        for name, value in recipe.items():
            if name != "head" and getattr(self, name, "unset") is None:
                setattr(self, name, value)
        if self.precision not in PRECISIONS:
            raise InputError(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.pooler not in POOLER_CHOICES:
            raise InputError(f"pooler: {self.pooler!r} is not one of {', '.join(POOLER_CHOICES)}")
        for name in ("batch_size", "max_seq_length", "eval_steps", "logging_steps", "save_steps",
                     "gradient_accumulation_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"{name}: must be > 0, got {value}")
        if self.max_seq_length < 3:
            raise InputError("max_seq_length: must leave room for special tokens (>= 3)")
        for name in ("temperature", "learning_rate", "num_epochs", "weight_decay", "max_grad_norm",
                     "hard_negative_weight", "generator_temperature"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise InputError(f"{name}: must be a finite number, got {value}")
        if self.temperature <= 0:
            raise InputError(f"temperature: must be > 0, got {self.temperature}")
        if self.learning_rate is not None and self.learning_rate < 0:
            raise InputError(f"learning_rate: must be >= 0, got {self.learning_rate}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise InputError(f"on_nonfinite: {self.on_nonfinite!r} is not one of {', '.join(NONFINITE_POLICIES)}")
        if self.generator_positions not in GENERATOR_POSITIONS:
            raise InputError(f"generator_positions: {self.generator_positions!r} is not one of "
                             f"{', '.join(GENERATOR_POSITIONS)}")
        if self.head == "batchnorm" and not self.mlp_only_train:
            raise InputError(
                "head: batchnorm is a training-only head (its BatchNorm has no meaning at inference); "
                "keep mlp_only_train: true, or use head: mlp"
            )
        if self.objective == "diffcse":
            if not self.generator:
                raise InputError(
                    "generator: DiffCSE needs one: mlm:PATH (the paper's: a masked LM with the encoder's "
                    "vocabulary, e.g. DistilBERT for BERT), or the MLM-free variants embedding-neighbours / random"
                )
            if self.mask_ratio is not None and not 0 < self.mask_ratio < 1:
                raise InputError(f"mask_ratio: must be in (0, 1), got {self.mask_ratio}")
        if self.corpus_loading not in CORPUS_LOADING:
            raise InputError(f"corpus_loading: {self.corpus_loading!r} is not one of {', '.join(CORPUS_LOADING)}")
        if self.corpus_loading == "disk" and self.objective == "sup-simcse":
            raise InputError("corpus_loading: disk reads one sentence per line; sup-simcse's CSV is read into memory")
        if self.grad_cache_chunk is not None and self.precision == "fp16":
            raise InputError("grad_cache_chunk: gradient caching runs in fp32 or bf16, not fp16 (its loss scaling)")
        if not 0 < self.mlm_probability < 1:
            raise InputError(f"mlm_probability: must be in (0, 1), got {self.mlm_probability}")
        if self.objective == "mlm" and self.mlm_weight:
            raise InputError("mlm_weight: adds an MLM term to a contrastive objective; objective mlm is all MLM")
        if self.grad_cache_chunk is not None and (self.objective in ("mlm", "uscal") or self.mlm_weight):
            raise InputError("grad_cache_chunk: gradient caching applies to simcse, sup-simcse and diffcse without "
                             "mlm_weight")
        if self.objective in PAIR_OBJECTIVES:
            if self.train_file is None:
                raise InputError(f"train_file: {self.objective} needs a CSV with sentence1,sentence2,"
                                 f"{PAIR_OBJECTIVES[self.objective]}")
            if self.grad_cache_chunk is not None or self.mlm_weight or self.corpus_loading == "disk":
                raise InputError(f"{self.objective}: gradient caching, mlm_weight and disk corpora are for the "
                                 "sentence objectives")
        if self.objective == "sup-simcse" and self.train_file is None:
            raise InputError("train_file: supervised SimCSE needs a CSV with sent0,sent1[,hard_neg]")

    def to_dict(self) -> dict:
        """Plain dict for YAML/JSON."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (atomically)."""
        import yaml

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def field_names() -> list[str]:
    """Names of every TrainConfig field."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Build a config from a YAML file, then apply overrides whose value is not None; validate it."""
    values: dict = dict(read_yaml(path, TrainConfig)) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            if key not in field_names():
                raise InputError(f"unknown config field {key!r}")
            values[key] = value
    config = TrainConfig(**values)
    config.validate()
    return config
