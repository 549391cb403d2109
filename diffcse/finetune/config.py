"""The few-shot fine-tuning configuration (the `diffcse finetune` options); light to import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffcse.core.errors import InputError
from diffcse.core.options import check_fields, opt
from diffcse.finetune.names import ALIASES, FEWSHOT_TASKS, LOSS_TERMS

INFERENCE = ("classifier", "proxy")
_LOSS_HELP = (
    f"'+'-joined terms from {', '.join(LOSS_TERMS)}, or {', '.join(ALIASES)} "
    "(= 0.4 cce + 0.6 softtriple with the TripleEntropy paper's SoftTriple settings); e.g. cce+proxyanchor, "
    "cce+scal, cce+clld, cce+moscl, cce+ensemble, jcc (docs/finetune.md)"
)


def _value(text: str) -> int | float | bool | str:
    """A loss argument value: int, float, true/false, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_weights(items: list[str]) -> dict[str, float]:
    """Repeated --loss-weight TERM=W to {term: weight}."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, val = item.partition("=")
        try:
            weight = float(val)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise InputError(f"--loss-weight: expected TERM=NUMBER (e.g. cce=0.4), got {item!r}")
        out[name.strip().lower()] = weight
    return out


def format_weights(weights: dict[str, float]) -> list[str]:
    """{term: weight} back to TERM=W strings."""
    return [f"{k}={v!r}" for k, v in weights.items()]


def parse_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """Repeated --loss-param TERM.ARG=VALUE to {term: {arg: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, val = item.partition("=")
        term, dot, arg = key.partition(".")
        if not sep or not dot or not arg:
            raise InputError(f"--loss-param: expected TERM.ARG=VALUE (e.g. softtriple.la=8), got {item!r}")
        out.setdefault(term.strip().lower(), {})[arg.strip()] = _value(val.strip())
    return out


def format_params(params: dict[str, dict[str, Any]]) -> list[str]:
    """{term: {arg: value}} back to TERM.ARG=VALUE strings."""
    return [f"{term}.{arg}={value!r}" for term, args in params.items() for arg, value in args.items()]


@dataclass
class FinetuneConfig:
    """Every knob of a few-shot fine-tuning run (the `diffcse finetune` options)."""

    model: str | None = opt(None, "HF or sentence-transformers folder (default: the packaged all-MiniLM-L6-v2)")
    task: str = opt("MR", f"SentEval transfer task: {', '.join(FEWSHOT_TASKS)} (any case)")
    shots: int | None = opt(16, "examples per class, or 'all'", min=1, none_words=("all",))
    loss: str = opt("cce", _LOSS_HELP)
    loss_weights: dict[str, float] = opt(default_factory=dict, help="weight of a term, TERM=W (default 1; repeatable)",
                                         parse=parse_weights, format=format_weights, metavar="TERM=W",
                                         aliases=("--loss-weight",))
    loss_params: dict[str, dict[str, Any]] = opt(
        default_factory=dict, help="argument of a term (pml class or objective), e.g. softtriple.la=8, "
        "scal.epsilon=1.0, moscl.method=linear (repeatable)",
        parse=parse_params, format=format_params, metavar="TERM.ARG=V", aliases=("--loss-param",))
    inference: str = opt("classifier", "predict with the classification head, or the nearest proxy of the "
                         "(first) proxy term (proxy losses, jcc's prototypes)", choices=INFERENCE)
    seeds: int = opt(5, "number of seeds (episodes) to average over", min=1)
    first_seed: int = opt(0, "seed of the first episode")
    pooler: str | None = opt(None, "pooling (default: the folder's own, else [CLS])",
                             choices=("avg", "cls_before_pooler", "cls"))
    lr: float = opt(2e-5, "encoder learning rate", min=0.0)
    head_lr: float = opt(1e-2, "classification head learning rate", min=0.0)
    proxy_lr: float = opt(1e-1, "learning rate of the DML losses' proxies/centers", min=0.0)
    weight_decay: float = opt(0.01, "AdamW weight decay", min=0.0)
    epochs: int = opt(10, "passes over the few-shot training set", min=1)
    max_steps: int | None = opt(None, "optimiser steps (overrides --epochs)", min=1)
    batch_size: int = opt(16, "examples per step", min=1)
    max_seq_length: int = opt(64, "tokens per sentence", min=3)
    warmup_ratio: float = opt(0.1, "share of the steps spent warming the learning rate up", min=0.0, max=1.0)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = none)", min=0.0)
    train_layers: int | None = opt(None, "fine-tune only the top N transformer layers; the frozen rest is run "
                                   "once and cached (default: all)", min=0)
    test_fraction: float = opt(0.2, "held-out share for MR/CR/SUBJ/MPQA", min=0.0, max=1.0)
    max_test: int | None = opt(None, "cap the test set (stratified, per seed)", min=1)
    senteval_data: str | None = opt(None, "folder holding downstream/ (default: $DIFFCSE_DATA_DIR/senteval)")
    output_dir: str = opt("runs/fs", "results go to OUTPUT_DIR/<task>-<shots>shot-<loss>-<inference>/")
    export: bool = opt(False, "export each seed's fine-tuned encoder to <run>/seed<N>/model")
    device: str | None = opt(None, "device (default: cuda if available, else cpu)")
    threads: int | None = opt(None, "torch CPU threads", min=1)

    def validate(self) -> object:
        """Check the fields against each other; return the parsed loss spec."""
        from diffcse.finetune.losses import parse_loss_spec

        check_fields(self)
        self.task = self.task.upper()
        if self.task not in FEWSHOT_TASKS:
            raise InputError(f"task: unknown task {self.task!r}; choose from {', '.join(FEWSHOT_TASKS)}")
        spec = parse_loss_spec(self.loss, self.loss_weights, self.loss_params)
        if self.inference not in INFERENCE:
            raise InputError(f"inference: unknown {self.inference!r}; choose from {', '.join(INFERENCE)}")
        if self.inference == "proxy" and not spec.proxy_terms:
            raise InputError(
                f"inference: 'proxy' needs a proxy loss (proxyanchor, softtriple, proxynca, jcc, or an ensemble "
                f"with a proxy member); loss {self.loss!r} has none"
            )
        for name in ("seeds", "epochs", "batch_size", "max_seq_length"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if self.shots is not None and self.shots < 1:
            raise InputError(f"shots: must be >= 1 or 'all' (got {self.shots})")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"max_steps: must be >= 1 (got {self.max_steps})")
        for name in ("lr", "head_lr", "proxy_lr"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name}: must be > 0 (got {getattr(self, name)})")
        return spec
