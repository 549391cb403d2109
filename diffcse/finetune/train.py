"""The fine-tuning loop: one run per (episode, loss, seed), and the multi-seed driver behind the CLI."""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcse.finetune.data import Episode, Examples, LoadedTask, load_fewshot_task, make_episode
from diffcse.finetune.losses import CombinedLoss, LossSpec, parse_loss_spec, proxy_scores
from diffcse.finetune.model import Featurizer, FineTuneModel, Prepared
from senteval_runner.report import write_json_atomic  # one atomic JSON writer for the project

log = logging.getLogger(__name__)

INFERENCE = ("classifier", "proxy")


@dataclass
class FinetuneConfig:
    """Every knob of a few-shot fine-tuning run (the CLI's options)."""

    model: str | None = None
    task: str = "MR"
    shots: int | None = 16  # per class; None = the whole training pool
    loss: str = "cce"
    loss_weights: dict[str, float] = field(default_factory=dict)
    loss_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    inference: str = "classifier"
    seeds: int = 5
    first_seed: int = 0
    pooler: str | None = None  # None = the folder's own pooling, else avg
    lr: float = 2e-5
    head_lr: float = 1e-2
    proxy_lr: float = 1e-1
    weight_decay: float = 0.01
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 16
    max_seq_length: int = 64
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    train_layers: int | None = None  # None = all layers
    test_fraction: float = 0.2
    max_test: int | None = None
    data_dir: str | None = None
    output_dir: str = "runs/fs"
    export: bool = False
    device: str | None = None

    def validate(self) -> LossSpec:
        """Check the fields against each other; return the parsed loss spec."""
        spec = parse_loss_spec(self.loss, self.loss_weights, self.loss_params)
        if self.inference not in INFERENCE:
            raise ValueError(f"inference: unknown {self.inference!r}; choose from {', '.join(INFERENCE)}")
        if self.inference == "proxy" and not spec.proxy_terms:
            raise ValueError(
                f"inference: 'proxy' needs a proxy loss (proxyanchor, softtriple, proxynca); loss {self.loss!r} has none"
            )
        for name in ("seeds", "epochs", "batch_size", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if self.shots is not None and self.shots < 1:
            raise ValueError(f"shots: must be >= 1 or 'all' (got {self.shots})")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1 (got {self.max_steps})")
        for name in ("lr", "head_lr", "proxy_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0 (got {getattr(self, name)})")
        return spec


@dataclass
class RunResult:
    """One seed's outcome."""

    seed: int
    n_train: int
    n_test: int
    steps: int
    accuracy: float  # with the configured inference
    accuracy_classifier: float
    accuracy_proxy: float | None
    train_seconds: float
    loss_first: dict[str, float]
    loss_last: dict[str, float]
    loss_history: list[float]


def _resolve_pooler(model_path: str, pooler: str | None) -> str:
    """The folder's own pooling when it declares one we can run, else mean pooling."""
    if pooler is not None:
        return pooler
    from diffcse.encoder import read_folder_pooling

    if Path(model_path).is_dir():
        own = read_folder_pooling(model_path).get("pooler")
        if own in ("avg", "cls_before_pooler"):
            return own
    return "avg"


class Finetuner:
    """Holds one pretrained encoder (and the frozen layers' cache) and fine-tunes copies of it."""

    def __init__(
        self,
        model_path: str | None,
        pooler: str | None = None,
        max_seq_length: int = 64,
        train_layers: int | None = None,
        device: str | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        from diffcse.encoder import resolve_model_path
        from diffcse.modeling import SentenceEncoder

        self.model_path = resolve_model_path(model_path)
        self.pooler = _resolve_pooler(self.model_path, pooler)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.max_seq_length = int(max_seq_length)
        self.train_layers = train_layers
        self.pristine = SentenceEncoder.from_pretrained(self.model_path, pooler=self.pooler, head="none").to(self.device)
        self.pristine.eval()
        # The frozen layers are shared by every copy, so their cache is too.
        self.base = Featurizer(self.pristine, self.tokenizer, self.max_seq_length, train_layers, self.device)

    def fresh(self) -> Featurizer:
        """A featurizer over a fresh copy of the pretrained encoder, sharing the frozen-layer cache."""
        encoder = copy.deepcopy(self.pristine)
        feat = Featurizer(encoder, self.tokenizer, self.max_seq_length, self.train_layers, self.device)
        feat._cache = self.base._cache
        return feat

    def clear_cache(self) -> None:
        """Forget the cached frozen-layer states (e.g. between tasks that share no sentences)."""
        self.base._cache.clear()

    def prepare(self, feat: Featurizer, ex: Examples) -> tuple[Prepared, Prepared | None]:
        """Prepare both sides of the examples for the featurizer."""
        return feat.prepare(ex.x), (feat.prepare(ex.x2) if ex.x2 is not None else None)

    def run(self, episode: Episode, cfg: FinetuneConfig, export_dir: Path | None = None) -> RunResult:
        """Fine-tune a fresh copy on the episode's training set (cfg's loss and optimiser) and score it on its test set."""
        spec = cfg.validate()
        seed = episode.seed
        feat = self.fresh()
        # Same seed → same head init for every loss; the proxies draw from a separate stream.
        torch.manual_seed(seed)
        model = FineTuneModel(feat, episode.nclasses, pair=episode.train.x2 is not None).to(self.device)
        torch.manual_seed(seed + 10_000)
        loss_fn = CombinedLoss(spec, episode.nclasses, model.feature_dim).to(self.device)
        torch.manual_seed(seed + 20_000)

        train_a, train_b = self.prepare(feat, episode.train)
        y = torch.as_tensor(episode.train.y, dtype=torch.long, device=self.device)
        n = len(episode.train)
        bs = min(cfg.batch_size, n)
        per_epoch = math.ceil(n / bs)
        steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch
        groups = [
            {"params": feat.trainable_parameters(), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": list(model.head.parameters()), "lr": cfg.head_lr, "weight_decay": 0.0},
        ]
        if loss_fn.proxy_parameters():
            groups.append({"params": loss_fn.proxy_parameters(), "lr": cfg.proxy_lr, "weight_decay": 0.0})
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups)
        from transformers import get_linear_schedule_with_warmup

        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), steps)
        rng = np.random.default_rng(seed)
        history: list[float] = []
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        order = np.empty(0, dtype=np.int64)
        model.train()
        t0 = time.perf_counter()
        for step in range(steps):
            if len(order) < bs:
                order = np.concatenate([order, rng.permutation(n)])
            idx, order = order[:bs], order[bs:]
            features = model.features(train_a, idx, train_b)
            logits = model.head(features if spec.has_cce else features.detach())
            out = loss_fn(logits, features, y[idx])
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            params = [p for g in groups for p in g["params"]]
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            history.append(float(out.total.detach()))
            if step == 0:
                first = out.parts
            last = out.parts
        train_seconds = time.perf_counter() - t0
        acc_cls, acc_proxy = evaluate(self, feat, model, loss_fn, spec, episode.test)
        if export_dir is not None:
            self.export(feat, model, loss_fn, export_dir)
        acc = acc_proxy if cfg.inference == "proxy" else acc_cls
        return RunResult(
            seed=seed, n_train=n, n_test=len(episode.test), steps=steps, accuracy=float(acc),
            accuracy_classifier=acc_cls, accuracy_proxy=acc_proxy, train_seconds=train_seconds,
            loss_first=first, loss_last=last, loss_history=history,
        )

    def export(self, feat: Featurizer, model: FineTuneModel, loss_fn: CombinedLoss, out_dir: Path) -> None:
        """Export the fine-tuned encoder (as any diffcse model) plus the head and proxies."""
        from diffcse.export import export_model

        export_model(feat.encoder, self.tokenizer, out_dir, self.max_seq_length)
        state = {"head": model.head.state_dict(), "loss": loss_fn.state_dict(), "pair": model.pair}
        fd, tmp = tempfile.mkstemp(suffix=".pt", dir=out_dir)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, Path(out_dir) / "finetune_head.pt")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@torch.inference_mode()
def evaluate(
    tuner: Finetuner,
    feat: Featurizer,
    model: FineTuneModel,
    loss_fn: CombinedLoss,
    spec: LossSpec,
    test: Examples,
    batch_size: int = 64,
) -> tuple[float, float | None]:
    """Test accuracy through the classifier, and through the nearest proxy when a proxy loss is used."""
    was = model.training
    model.eval()
    try:
        a, b = tuner.prepare(feat, test)
        # Length-sorted batches pad less; results go back to input order.
        order = np.argsort(-a.lengths, kind="stable")
        feats = torch.empty(len(test), model.feature_dim, device=tuner.device)
        for s in range(0, len(test), batch_size):
            idx = order[s : s + batch_size]
            feats[torch.as_tensor(idx, device=tuner.device)] = model.features(a, idx, b).float()
        y = torch.as_tensor(test.y, device=tuner.device)
        acc_cls = float((model.head(feats).argmax(1) == y).float().mean())
        acc_proxy = None
        if spec.proxy_terms:
            pred = proxy_scores(loss_fn.dml[spec.proxy_terms[0]], feats).argmax(1)
            acc_proxy = float((pred == y).float().mean())
    finally:
        model.train(was)
    return acc_cls, acc_proxy


def summarize(runs: list[RunResult], key: str = "accuracy") -> dict[str, float | None]:
    """Mean and sample std (ddof=1) over seeds, in percent."""
    vals = [getattr(r, key) for r in runs]
    if any(v is None for v in vals) or not vals:
        return {"mean": None, "std": None}
    arr = 100.0 * np.asarray(vals, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def run_name(cfg: FinetuneConfig) -> str:
    """Folder name of a configuration's results under output_dir."""
    shots = "all" if cfg.shots is None else str(cfg.shots)
    return f"{cfg.task.upper()}-{shots}shot-{cfg.loss.replace('+', '_')}-{cfg.inference}"


def run_finetune(cfg: FinetuneConfig, loaded: LoadedTask | None = None, tuner: Finetuner | None = None) -> dict:
    """Fine-tune over cfg.seeds seeds; write <output_dir>/<run>/results.json and return the summary."""
    spec = cfg.validate()
    loaded = loaded or load_fewshot_task(cfg.task, cfg.data_dir)
    # Draw every episode before loading the model, so bad shots fail fast.
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    episodes = [make_episode(loaded, cfg.shots, seed, cfg.test_fraction, cfg.max_test) for seed in seeds]
    tuner = tuner or Finetuner(cfg.model, cfg.pooler, cfg.max_seq_length, cfg.train_layers, cfg.device)
    out = Path(cfg.output_dir) / run_name(cfg)
    runs: list[RunResult] = []
    protocol = episodes[0].protocol.replace(f"random_state={cfg.first_seed}", "random_state=seed")
    for seed, episode in zip(seeds, episodes, strict=True):
        export_dir = out / f"seed{seed}" / "model" if cfg.export else None
        res = tuner.run(episode, cfg, export_dir)
        log.info("seed %d: accuracy %.2f", seed, 100 * res.accuracy)
        runs.append(res)
    summary = {
        "task": loaded.name,
        "shots": cfg.shots,
        "loss": spec.name,
        "loss_weights": spec.weights,
        "loss_params": spec.params,
        "inference": cfg.inference,
        "model": tuner.model_path,
        "pooler": tuner.pooler,
        "protocol": protocol,
        "accuracy": summarize(runs),
        "accuracy_classifier": summarize(runs, "accuracy_classifier"),
        "accuracy_proxy": summarize(runs, "accuracy_proxy"),
        "config": {k: v for k, v in asdict(cfg).items()},
        "runs": [asdict(r) for r in runs],
    }
    write_json_atomic(out / "results.json", summary)
    return summary
