"""Training configuration: one dataclass, loadable from YAML, overridable from the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

OBJECTIVES = ("simcse", "sup-simcse", "diffcse")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Training heads (diffcse.modeling.HEADS) plus "auto": each objective's paper recipe.
HEADS = ("auto", "none", "mlp", "batchnorm")
DEFAULT_HEADS = {"simcse": "mlp", "sup-simcse": "mlp", "diffcse": "batchnorm"}


@dataclass
class TrainConfig:
    """Every knob of a training run; defaults are the SimCSE BERT-base recipe where they apply."""

    # What to train and on what.
    model: str | None = None  # None = the packaged all-MiniLM-L6-v2
    train_file: str | None = None  # None = $DIFFCSE_DATA_DIR/corpus/derived/sentences.txt
    output_dir: str = "runs/simcse"
    objective: str = "simcse"
    encoding_errors: str = "strict"
    # Encoder and heads.
    pooler: str = "auto"  # auto = the folder's own pooling (ST config), else cls
    head: str = "auto"  # auto = the objective's own (DEFAULT_HEADS), mlp, batchnorm, none
    mlp_only_train: bool = True
    max_seq_length: int = 32
    # Forwards on real tokens only (diffcse.packing): same loss, no FLOPs on padding; models
    # whose packed output does not match the padded one fall back to padding by themselves.
    packing: bool = True
    # Dropout masks from 31 random bits per element (diffcse.dropout): the same Bernoulli law,
    # about half the cost of torch's bernoulli_ on CPU; off = torch's own dropout.
    fast_dropout: bool = True
    # Contrastive loss.
    temperature: float = 0.05
    hard_negative_weight: float = 0.0
    # Optimisation.
    batch_size: int = 64
    learning_rate: float = 3e-5
    num_epochs: float = 1.0
    max_steps: int = -1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    precision: str = "auto"  # auto = bf16 autocast where the hardware has bf16 units, else fp32
    seed: int = 42
    gradient_accumulation_steps: int = 1
    # Evaluation, logging, checkpoints.
    eval_steps: int = 125
    do_eval: bool = True
    senteval_data: str | None = None
    logging_steps: int = 10
    save_steps: int = 250
    save_total_limit: int = 2
    resume: bool = False
    dataloader_workers: int = 0
    # Multi-process (torchrun/accelerate): negatives from every rank, BN statistics over all ranks.
    gather_negatives: bool = True
    sync_batchnorm: bool = True
    # DiffCSE (objective: diffcse).
    generator: str = "embedding-neighbours"  # mlm:PATH | embedding-neighbours | random
    mask_ratio: float = 0.30
    lambda_weight: float = 0.005
    generator_sampling: str = "argmax"  # argmax | sample
    generator_temperature: float = 1.0
    generator_train_mode: bool = True  # the reference leaves the generator's dropout on
    neighbours_k: int = 10
    discriminator_layers: int | None = None  # None = all layers
    discriminator_input: str = "projected"  # projected | pooled
    rtd_count_padding: bool = False
    # Extra free-form notes kept with the run.
    notes: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Reject impossible settings early, naming the field; resolve head 'auto' for the objective.

        The resolved head is stored back on the config, so the saved train_config.yaml (and a
        --resume from it) records the head actually trained.
        """
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.head not in HEADS:
            raise ValueError(f"head: {self.head!r} is not one of {', '.join(HEADS)}")
        if self.head == "auto":
            self.head = DEFAULT_HEADS[self.objective]
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "max_seq_length", "eval_steps", "logging_steps", "save_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.max_seq_length < 3:
            raise ValueError("max_seq_length: must leave room for special tokens (>= 3)")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio: must be in (0, 1), got {self.mask_ratio}")
        if self.objective == "sup-simcse" and self.train_file is None:
            raise ValueError("train_file: supervised SimCSE needs a CSV with sent0,sent1[,hard_neg]")

    def to_dict(self) -> dict:
        """Plain dict for YAML/JSON."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def bf16_supported() -> bool:
    """Whether bf16 autocast runs on native bf16 units here (CUDA, or x86 with AVX512-BF16/AMX)."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """Turn 'auto' into the precision this machine runs fastest without fp16's loss scaling."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_supported() else "fp32"


def field_names() -> list[str]:
    """Names of every TrainConfig field."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Build a config from a YAML file, then apply overrides whose value is not None."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of field: value")
        unknown = sorted(set(loaded) - set(field_names()))
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}")
        values.update(loaded)
    for key, value in (overrides or {}).items():
        if value is not None:
            if key not in field_names():
                raise ValueError(f"unknown config field {key!r}")
            values[key] = value
    config = TrainConfig(**values)
    config.validate()
    return config
