"""The fine-tuning loop: one run per (episode, loss, seed), and the multi-seed driver behind the CLI."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffcse.core.encoder import length_sorted_batches
from diffcse.core.folder import model_name
from diffcse.core.io import write_json_atomic
from diffcse.finetune.config import FinetuneConfig
from diffcse.finetune.data import Episode, Examples, LoadedTask, load_fewshot_task, make_episode
from diffcse.finetune.losses import (
    CombinedLoss,
    LossContext,
    LossSpec,
    check_spec_classes,
    predict_nearest_proxy,
)
from diffcse.finetune.model import Featurizer, FineTuneModel, Prepared

log = logging.getLogger(__name__)
HEAD_FILE = "finetune_head.safetensors"

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
    # Per step, the loss weights learned by the terms (ensemble), e.g. {"ensemble.supcon": 0.93}.
    learned_weights: list[dict[str, float]] = field(default_factory=list)


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
        from diffcse.core.folder import load_tokenizer, resolve_model_path, resolve_pooler
        from diffcse.core.modeling import SentenceEncoder
        from diffcse.core.runtime import resolve_device

        self.model_path = resolve_model_path(model_path)
        self.pooler = resolve_pooler(pooler, self.model_path)
        self.device = torch.device(resolve_device(device))
        self.tokenizer = load_tokenizer(self.model_path)
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
        learned: list[dict[str, float]] = []
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        order = np.empty(0, dtype=np.int64)
        model.train()
        t0 = time.perf_counter()
        for step in range(steps):
            if len(order) < bs:
                order = np.concatenate([order, rng.permutation(n)])
            idx, order = order[:bs], order[bs:]
            if loss_fn.needs_inputs:
                inputs = model.inputs(train_a, idx, train_b)
                features = model.features_from(inputs)
                context = LossContext(
                    head=model.head, inputs=[i.embeds for i in inputs], masks=[i.mask for i in inputs],
                    encode=lambda xs, inputs=inputs: model.features_from(inputs, xs),
                    params=feat.trainable_parameters(), input_kind=inputs[0].kind,
                )
            else:
                features = model.features(train_a, idx, train_b)
                context = LossContext(head=model.head, params=feat.trainable_parameters())
            logits = model.head(features if spec.has_cce else features.detach())
            out = loss_fn(logits, features, y[idx], context)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            params = [p for g in groups for p in g["params"]]
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            history.append(float(out.total.detach()))
            weights_now = loss_fn.learned_weights()
            if weights_now:
                learned.append(weights_now)
                log.debug("step %d learned loss weights %s", step, weights_now)
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
            loss_first=first, loss_last=last, loss_history=history, learned_weights=learned,
        )

    def export(self, feat: Featurizer, model: FineTuneModel, loss_fn: CombinedLoss, out_dir: Path) -> None:
        """Export the fine-tuned encoder (as any diffcse model) plus the head and proxies (safetensors)."""
        from safetensors.torch import save_file

        from diffcse.core.folder import export_model
        from diffcse.core.io import atomic_path

        export_model(feat.encoder, self.tokenizer, out_dir, self.max_seq_length)
        tensors = {f"head.{k}": v for k, v in model.head.state_dict().items()}
        tensors.update({f"loss.{k}": v for k, v in loss_fn.state_dict().items()})
        with atomic_path(Path(out_dir) / HEAD_FILE) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"pair": str(model.pair).lower()})


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
        feats = torch.empty(len(test), model.feature_dim, device=tuner.device)
        for idx in length_sorted_batches(a.lengths, batch_size):
            feats[torch.as_tensor(idx, device=tuner.device)] = model.features(a, idx, b).float()
        y = torch.as_tensor(test.y, device=tuner.device)
        acc_cls = float((model.head(feats).argmax(1) == y).float().mean())
        acc_proxy = None
        if spec.proxy_terms:
            pred = predict_nearest_proxy(loss_fn.proxy_module(), feats)
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
    loaded = loaded or load_fewshot_task(cfg.task, cfg.senteval_data)
    check_spec_classes(spec, loaded.nclasses)
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
        "model": model_name(tuner.model_path),
        "pooler": tuner.pooler,
        "protocol": protocol,
        "accuracy": summarize(runs),
        "accuracy_classifier": summarize(runs, "accuracy_classifier"),
        "accuracy_proxy": summarize(runs, "accuracy_proxy"),
        "config": {k: (model_name(v) if k == "model" and v else v) for k, v in asdict(cfg).items()},
        "runs": [asdict(r) for r in runs],
    }
    finals = [r.learned_weights[-1] for r in runs if r.learned_weights]
    if finals:
        # Mean over seeds of each learned weight at the last step (per-step values are in runs).
        summary["learned_loss_weights"] = {k: float(np.mean([f[k] for f in finals])) for k in finals[0]}
    write_json_atomic(out / "results.json", summary)
    return summary
