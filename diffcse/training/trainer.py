"""Training on the HF Trainer: data, model, STS-B dev evaluation, best-model export, resume.

What a run guarantees (tests/test_training_reliability.py): the same seed gives the same run bit
for bit on CPU; a NaN/inf loss or gradient stops the run at that step (or skips it, on request)
with a message naming the last complete checkpoint, and non-finite weights are never exported;
a checkpoint is used only if it is complete, and --resume falls back to the newest complete one;
every report is strict JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from diffcse.core.encoder import encode_tokenized
from diffcse.core.errors import InputError
from diffcse.core.folder import (
    export_masked_lm,
    export_model,
    load_tokenizer,
    model_name,
    read_folder_pooling,
    resolve_max_length,
    resolve_model_path,
    resolve_pooler,
)
from diffcse.core.io import (
    default_corpus,
    dumps_json,
    read_json,
    read_scored_pairs,
    write_json_atomic,
    write_text_atomic,
)
from diffcse.core.metrics import POSITIVE_THRESHOLD, alignment, uniformity
from diffcse.core.modeling import SentenceEncoder
from diffcse.core.runtime import resolve_device, resolve_precision, set_threads
from diffcse.training.checkpoints import CheckpointManifest, RunTotals, resumable_checkpoint
from diffcse.training.config import PAIR_OBJECTIVES, TrainConfig
from diffcse.training.data import (
    ViewCollator,
    read_labelled_pairs,
    read_sentences,
    read_triples,
    tokenize_columns,
)
from diffcse.training.distributed import convert_batchnorm
from diffcse.training.gradcache import all_reduce_gradients, cached_step
from diffcse.training.guard import GuardedAdamW, NonFiniteGuard, TrainingDiverged
from diffcse.training.objectives.adversarial import AdversarialContrastiveModel
from diffcse.training.objectives.contrastive import ContrastiveModel
from diffcse.training.objectives.infonce import InfoNCE
from diffcse.training.objectives.mlm import (
    AuxiliaryMLM,
    MaskedLMModel,
    load_masked_lm,
    mlm_masker,
)
from diffcse.training.objectives.sbert import (
    CosineRegressionLoss,
    PairObjectiveModel,
    SoftmaxPairLoss,
)
from diffcse.training.sampling import DistinctBatchSampler, LineCorpus, ids_key

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def training_pooler(config: TrainConfig, model_path: str) -> str:
    """The pooler to train with (core.folder's policy); the [CLS] token is 'cls' here, the head being separate."""
    pooler = resolve_pooler(None if config.pooler == "auto" else config.pooler, model_path, read_folder_pooling(model_path))
    return "cls" if pooler == "cls_before_pooler" else pooler


def build_model(config: TrainConfig, model_path: str, tokenizer: object, num_labels: int = 0) -> torch.nn.Module:
    """The training module for the configured objective (num_labels: the classes of sbert-softmax)."""
    mlm = None
    if config.objective == "mlm" or config.mlm_weight:
        # The encoder is the masked LM's own transformer, so the MLM term trains the same weights.
        mlm = load_masked_lm(model_path)
        encoder = SentenceEncoder(mlm.base_model, pooler=training_pooler(config, model_path), head=config.head,
                                  mlp_only_train=config.mlp_only_train)
    else:
        encoder = SentenceEncoder.from_pretrained(
            model_path,
            pooler=training_pooler(config, model_path),
            head=config.head,
            mlp_only_train=config.mlp_only_train,
        )
    encoder.speed_up(config.packing, config.fast_dropout)
    if config.objective == "mlm":
        return MaskedLMModel(mlm, encoder, mlm_masker(tokenizer, config.mlm_probability))
    if config.objective in PAIR_OBJECTIVES:
        if config.objective == "sbert-softmax":
            loss_fn: torch.nn.Module = SoftmaxPairLoss(encoder.hidden_size, num_labels)
        else:
            loss_fn = CosineRegressionLoss(config.score_scale)
        return PairObjectiveModel(encoder, loss_fn)
    if config.sync_batchnorm:
        convert_batchnorm(encoder)
    # The backbone's own pooler layer is never used in training; frozen, DDP need not track it.
    if getattr(encoder.backbone, "pooler", None) is not None:
        encoder.backbone.pooler.requires_grad_(False)
    loss = InfoNCE(config.temperature, config.hard_negative_weight)
    if config.objective == "diffcse":
        from diffcse.training.objectives.diffcse import DiffCSEModel

        model = DiffCSEModel.from_config(config, encoder, loss, tokenizer, model_path)
    elif config.objective == "uscal":
        model = AdversarialContrastiveModel(encoder, loss, config.adv_epsilon, config.adv_norm, config.adv_steps,
                                            config.adv_weight)
    else:
        model = ContrastiveModel(encoder, loss)
    model.gather_negatives = config.gather_negatives
    if mlm is not None:
        model.aux_mlm = AuxiliaryMLM(mlm, mlm_masker(tokenizer, config.mlm_probability), config.mlm_weight)
    return model


DISK_CORPUS_BYTES = 1 << 30  # corpus_loading auto: files above this are read from disk per batch


def load_dataset(config: TrainConfig, tokenizer: object, out: Path) -> tuple[object, np.ndarray, dict]:
    """Read the training file (into memory, or as a line index on disk); the dataset, its text keys, counts."""
    path = Path(config.train_file) if config.train_file else default_corpus()
    disk = config.corpus_loading == "disk" or (
        config.corpus_loading == "auto" and config.objective != "sup-simcse" and path.is_file()
        and path.stat().st_size > DISK_CORPUS_BYTES
    )
    if config.objective in PAIR_OBJECTIVES:
        columns, targets, names = read_labelled_pairs(path, PAIR_OBJECTIVES[config.objective], config.encoding_errors)
        dataset, truncated = tokenize_columns(tokenizer, columns, config.max_seq_length)
        dataset.labels = targets
        info = {"examples": len(dataset), "loading": "memory", "truncated": truncated, "train_file": path.name}
        if names is not None:
            info["labels"] = names
        keys = np.fromiter((ids_key(ids) for ids in dataset.columns[0]), dtype=np.int64, count=len(dataset))
    elif disk:
        dataset = LineCorpus(path, tokenizer, config.max_seq_length, out / "corpus-index", config.encoding_errors)
        info = {"examples": len(dataset), "loading": "disk", "train_file": path.name}
        keys = np.asarray(dataset.keys)
    else:
        if config.objective == "sup-simcse":
            rows = read_triples(path, config.encoding_errors)
            columns = [list(col) for col in zip(*rows, strict=True)] if rows else [[]]
            info = {"examples": len(rows), "columns": len(columns)}
        else:
            sf = read_sentences(path, config.encoding_errors)
            columns = [sf.sentences]
            info = {"examples": len(sf.sentences), "empty_lines": sf.empty_lines, "replaced_lines": sf.replaced_lines}
        dataset, truncated = tokenize_columns(tokenizer, columns, config.max_seq_length)
        info.update(loading="memory", truncated=truncated, train_file=path.name)
        keys = np.fromiter((ids_key(ids) for ids in dataset.columns[0]), dtype=np.int64, count=len(dataset))
    if len(dataset) < config.batch_size:
        raise InputError(
            f"{path}: {len(dataset)} usable examples, fewer than one batch ({config.batch_size}); "
            "add data or lower --batch-size"
        )
    return dataset, keys, info


class DevScorer:
    """Dev Spearman of the encoder's inference embedding (STS-B dev, or the user's --dev-file), with
    tokenisation cached; also alignment (STS-B dev pairs scored above 4) and uniformity (all dev
    sentences), as the SimCSE paper reports them, so a run's trajectory can be plotted."""

    def __init__(self, tokenizer: object, max_seq_length: int, data_dir: str | None, dev_file: str | None = None) -> None:
        from senteval_runner.data import PairSplit
        from senteval_runner.sts import PairEvaluator, StsbDevEvaluator

        if dev_file is not None:
            a, b, gold = read_scored_pairs(dev_file, "dev file")
            self.evaluator = PairEvaluator(PairSplit(a, b, np.asarray(gold, dtype=np.float64)))
            # A user's score scale is unknown, so which pairs count as positives for alignment is too.
            self.name, self.summary_key, positives = "dev_file_spearman", "dev_file_spearman", None
        else:
            self.evaluator = StsbDevEvaluator(data_dir, split="dev")
            self.name, self.summary_key = "stsb_spearman", "stsb_dev_spearman"
            positives = self.evaluator.pairs.gold > POSITIVE_THRESHOLD
        index = {s: i for i, s in enumerate(self.evaluator.sentences)}
        self.positive_rows = None
        if positives is not None:
            pairs = self.evaluator.pairs
            self.positive_rows = (
                np.asarray([index[s] for s, keep in zip(pairs.a, positives, strict=True) if keep]),
                np.asarray([index[s] for s, keep in zip(pairs.b, positives, strict=True) if keep]),
            )
        self.tokenizer = tokenizer
        self.encoded = tokenizer(self.evaluator.sentences, truncation=True, max_length=max_seq_length)

    def __call__(self, encoder: SentenceEncoder, batch_size: int = 128) -> dict[str, float]:
        """Dev Spearman (raw) under `self.name`, uniformity, alignment on STS-B; NaN when the embeddings are not finite."""
        device = next(encoder.parameters()).device
        emb = encode_tokenized(encoder, self.tokenizer, self.encoded, batch_size, False, device)
        if not np.isfinite(emb).all():
            return {self.name: math.nan}
        scores = {self.name: float(self.evaluator.score(emb)["spearman"]), "uniformity": uniformity(emb)}
        if self.positive_rows is not None:
            scores["alignment"] = alignment(emb[self.positive_rows[0]], emb[self.positive_rows[1]])
        return scores


class JsonlLogger(TrainerCallback):
    """Append every log record (with the step) to metrics.jsonl as strict JSON (NaN/inf as null)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        """Write one line per log call on the main process."""
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(dumps_json({"step": state.global_step, "epoch": state.epoch, **logs}, indent=None) + "\n")


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metrics lines logged after `step` (a resumed run logs those steps again); return how many."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record_step = json.loads(line).get("step", 0)
        except ValueError:
            dropped += 1  # a line cut by the kill
            continue
        if record_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


class EvalEvery(TrainerCallback):
    """Ask the Trainer to evaluate every n optimiser steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """Flag an evaluation on multiples of `steps`."""
        if state.global_step % self.steps == 0:
            control.should_evaluate = True
        return control


class ContrastiveTrainer(Trainer):
    """HF Trainer that logs the objective's parts, guards against divergence and exports the best model."""

    def __init__(  # noqa: ANN204
        self, *args, scorer: DevScorer | None, config: TrainConfig, tokenizer_for_export, guard: NonFiniteGuard,
        totals: RunTotals, train_sampler: DistinctBatchSampler | None = None, **kwargs,  # noqa: ANN001, ANN002, ANN003
    ):
        self.train_sampler = train_sampler
        super().__init__(*args, **kwargs)
        self.scorer = scorer
        self.run_config = config
        self.export_tokenizer = tokenizer_for_export
        self.guard = guard
        self.totals = totals
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self.best_score = -math.inf
        self._last_eval: tuple[int, dict] | None = None
        state_file = Path(config.output_dir) / "best.json"
        if config.resume and scorer is not None:
            best = (read_json(state_file) or {}).get(scorer.summary_key)
            self.best_score = best if best is not None else -math.inf

    def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001, ANN201
        """One forward/backward (gradient-cached with grad_cache_chunk); keeps the running loss sum."""
        chunk = self.run_config.grad_cache_chunk
        if chunk:
            # Outside DDP's hooks (several backward passes per step), so gradients are averaged by hand.
            self.model.train()
            inputs = self._prepare_inputs(inputs)
            loss = cached_step(self.model, inputs["input_ids"], inputs["attention_mask"], chunk,
                               1.0 / self.current_gradient_accumulation_steps, self.accelerator.autocast)
            if self.accelerator.sync_gradients:
                all_reduce_gradients(list(self.model.parameters()))
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._loss_sum = self._loss_sum + loss.detach().to("cpu", torch.float64)
        return loss

    def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202
        """Our duplicate-free order when distinct_batches is on, else the Trainer's own."""
        return self.train_sampler if self.train_sampler is not None else super()._get_train_sampler(train_dataset)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoint weights with each shared tensor once (see shared_tensor_names)."""
        state = state_dict if state_dict is not None else self.model.state_dict()
        drop = set(self.model._keys_to_ignore_on_save or ())
        super()._save(output_dir, state_dict={k: v for k, v in state.items() if k not in drop})

    def current_totals(self) -> RunTotals:
        """Loss sum over every step so far (resumed runs included) and the steps skipped."""
        return RunTotals(self.totals.loss_sum + float(self._loss_sum), self.guard.skipped)

    def log(self, logs: dict, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        """Add the objective's averaged parts to each training log line."""
        if "loss" in logs:
            logs.update(self.model.pop_stats())
            logs["effective_batch_size"] = (
                self.run_config.batch_size * self.args.world_size * self.args.gradient_accumulation_steps
            )
            if self.guard.skipped:
                logs["skipped_steps"] = self.guard.skipped
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:  # noqa: ANN001
        """STS-B dev Spearman; export the encoder to output_dir when it beats the best so far."""
        if self.scorer is None or not self.args.should_save:
            return {}  # rank 0 alone evaluates and saves
        if self._last_eval is not None and self._last_eval[0] == self.state.global_step:
            return self._last_eval[1]  # the Trainer may ask again at the same step (epoch/training end)
        start = time.perf_counter()
        scores = self.scorer(self.model.encoder)
        score = scores[self.scorer.name]
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
        metrics[f"{metric_key_prefix}_seconds"] = time.perf_counter() - start
        if math.isfinite(score) and score > self.best_score and self.args.should_save:
            self.best_score = score
            if self.run_config.objective != "mlm":  # masked-LM adaptation keeps its last model, not its best dev
                self.export(step=self.state.global_step, score=score)
        metrics[f"{metric_key_prefix}_best_{self.scorer.name}"] = self.best_score
        self.log(metrics)
        self._last_eval = (self.state.global_step, metrics)
        return metrics

    def export(self, step: int, score: float | None) -> None:
        """Write the inference model to output_dir and remember which step it came from (rank 0)."""
        if not self.args.should_save:
            return
        out = Path(self.run_config.output_dir)
        if isinstance(self.model, MaskedLMModel):
            export_masked_lm(self.model.mlm, self.export_tokenizer, out, self.model.encoder.pooler,
                             self.run_config.max_seq_length)
        else:
            export_model(self.model.encoder, self.export_tokenizer, out, self.run_config.max_seq_length)
        key = self.scorer.summary_key if self.scorer is not None else "stsb_dev_spearman"
        write_json_atomic(out / "best.json", {"step": step, key: score})


def shared_tensor_names(module: torch.nn.Module) -> list[str]:
    """State-dict names whose tensor an earlier name already holds (tied MLM decoders, a transformer held twice).

    Checkpoints leave them out (safetensors refuses shared tensors); the Trainer reloads non-strictly
    and, when the missing names are exactly these, calls tie_weights(): they are the same Parameters,
    so nothing is lost.
    """
    seen: set[tuple[int, tuple[int, ...]]] = set()
    names = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            names.append(name)
        seen.add(key)
    return names


def training_arguments(config: TrainConfig, device: str) -> TrainingArguments:
    """Map our config onto the HF TrainingArguments."""
    report_to = []
    try:
        import tensorboard  # noqa: F401

        report_to = ["tensorboard"]
    except ImportError:
        pass
    precision = resolve_precision(config.precision, device)
    return TrainingArguments(
        output_dir=str(Path(config.output_dir) / CHECKPOINTS),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="linear",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=config.seed,
        # Our evaluation needs no eval_dataset, which the Trainer's own "steps" strategy demands;
        # EvalEvery triggers it instead.
        eval_strategy="no",
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        # A NaN loss must show as NaN (null in metrics.jsonl), not as the average of earlier ones.
        logging_nan_inf_filter=False,
        report_to=report_to,
        remove_unused_columns=False,
        dataloader_num_workers=config.dataloader_workers,
        dataloader_drop_last=True,
        disable_tqdm=False,
        use_cpu=not device.startswith("cuda"),
    )


def guarded_optimizer(args: TrainingArguments, guard: NonFiniteGuard) -> tuple[type, dict]:
    """The Trainer's default AdamW (fused: one pass per tensor; foreach cost ~5% of a MiniLM step on CPU), guarded."""
    return GuardedAdamW, {
        "lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
        "fused": True, "guard": guard,
    }


def _describe_checkpoint(out: Path) -> str:
    """The newest complete checkpoint under out/checkpoints, for messages."""
    try:
        return str(resumable_checkpoint(out / CHECKPOINTS).path)
    except InputError:
        return "none (no checkpoint was completed)"


def _close_progress_bars(trainer: Trainer) -> None:
    """End the Trainer's progress bar line, so the error that follows starts on a line of its own."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


def _describe_export(out: Path) -> str:
    """What a stopped run left in output_dir, for messages."""
    best = read_json(out / "best.json")
    if best is None:
        return f"nothing was exported to {out}"
    return f"the model exported to {out} (step {best.get('step')}) was left as it was"


def train(config: TrainConfig) -> dict:
    """Run one training job end to end; return a summary (also written to output_dir/summary.json).

    Raises TrainingDiverged (after writing summary.json with status 'diverged') when the loss or
    gradients become non-finite; the exported model from the last good evaluation stays as it was.
    """
    config.validate()
    set_threads(config.threads)
    device = resolve_device(None)
    resolve_precision(config.precision, device)  # fp16 without a GPU fails here, before any work
    model_path = resolve_model_path(config.model)
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output-dir {out} is a file, not a folder")
    created = not out.exists()
    try:
        return _train(config, model_path, out, device)
    except BaseException:
        # A run that failed before writing anything leaves no empty folder behind.
        if created and out.is_dir() and not any(out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(config: TrainConfig, model_path: str, out: Path, device: str) -> dict:
    tokenizer = load_tokenizer(model_path)
    from transformers import AutoConfig

    resolve_max_length(config.max_seq_length, None, tokenizer, AutoConfig.from_pretrained(model_path), model_path)
    dataset, keys, data_info = load_dataset(config, tokenizer, out)
    log.info("training data: %s", data_info)
    resume = resumable_checkpoint(out / CHECKPOINTS) if config.resume else None
    # Everything random from here on (heads, discriminator, data order, dropout, masking) follows the seed.
    set_seed(config.seed)
    model = build_model(config, model_path, tokenizer, len(data_info.get("labels", ())))
    model._keys_to_ignore_on_save = shared_tensor_names(model)
    packed = {"encoder": model.encoder.packing}
    if hasattr(model, "discriminator"):
        packed["discriminator"] = model.discriminator.packing
    log.info("packing (real tokens only): %s; fast dropout: %s", packed, config.fast_dropout)
    main_process = int(os.environ.get("RANK", "0")) == 0
    scorer = None
    if config.do_eval and main_process:
        scorer = DevScorer(tokenizer, config.max_seq_length, config.senteval_data, config.dev_file)
    out.mkdir(parents=True, exist_ok=True)
    if main_process:
        config.save(out / "train_config.yaml")
    if resume is not None and main_process:
        truncate_metrics(out / METRICS_FILE, resume.step)
    args = training_arguments(config, device)
    totals = resume.totals if resume is not None else RunTotals()
    guard = NonFiniteGuard(config.on_nonfinite, config.max_skipped_steps, totals.skipped_steps)
    sampler = None
    if config.distinct_batches and config.objective not in ("mlm", *PAIR_OBJECTIVES):  # no negatives there
        # The loss sees one batch per step from every process: that is the group kept duplicate-free.
        sampler = DistinctBatchSampler(keys, config.batch_size * args.world_size, args.data_seed or config.seed)
    trainer = ContrastiveTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=ViewCollator(tokenizer.pad_token_id),
        callbacks=[JsonlLogger(out / METRICS_FILE), guard] + ([EvalEvery(config.eval_steps)] if scorer else []),
        optimizer_cls_and_kwargs=guarded_optimizer(args, guard),
        scorer=scorer,
        config=config,
        tokenizer_for_export=tokenizer,
        guard=guard,
        totals=totals,
        train_sampler=sampler,
    )
    trainer.add_callback(CheckpointManifest(Path(args.output_dir), trainer.current_totals))
    initial = None
    dev = scorer.summary_key if scorer is not None else "stsb_dev_spearman"
    if scorer is not None and resume is None:
        scores = scorer(model.encoder)
        initial = scores[scorer.name]
        trainer.log({**{f"eval_{k}": v for k, v in scores.items()}, f"eval_best_{scorer.name}": initial})
    summary = {
        "status": "finished",
        "model": model_name(model_path),
        "objective": config.objective,
        "head": config.head,
        "packing": packed,
        "fast_dropout": config.fast_dropout,
        "grad_cache_chunk": config.grad_cache_chunk,
        "resumed_from_step": resume.step if resume is not None else None,
        "dev_metric": dev,
        f"{dev}_before": initial,
        "data": data_info,
    }
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume.path) if resume is not None else None)
    except TrainingDiverged as err:
        _close_progress_bars(trainer)
        message = f"{err}. Last complete checkpoint: {_describe_checkpoint(out)}; {_describe_export(out)}"
        summary.update({"status": "diverged", "error": message, "steps": err.step,
                        "train_seconds": time.perf_counter() - start,
                        f"{dev}_best": trainer.best_score if scorer is not None else None})
        if main_process:
            write_json_atomic(out / "summary.json", summary)
        raise TrainingDiverged(message, err.step) from None
    seconds = time.perf_counter() - start
    final = None
    if scorer is not None:
        final = trainer.evaluate()[f"eval_{scorer.name}"]
    if not config.do_eval or config.objective == "mlm":
        trainer.export(step=trainer.state.global_step, score=final)
    steps = trainer.state.global_step
    totals_now = trainer.current_totals()
    summary.update(
        steps=steps,
        train_seconds=seconds,
        train_loss=totals_now.loss_sum / steps if steps else None,
        skipped_steps=totals_now.skipped_steps,
        duplicates_moved=sampler.moved if sampler is not None else None,
        **{f"{dev}_final": final, f"{dev}_best": trainer.best_score if scorer is not None else None},
    )
    if main_process:
        write_json_atomic(out / "summary.json", summary)
    return summary
