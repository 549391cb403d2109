"""Training on the HF Trainer: data, model, STS-B dev evaluation, best-model export, resume."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from diffcse.config import TrainConfig, resolve_precision
from diffcse.data import (
    InputError,
    ViewCollator,
    default_corpus,
    read_sentences,
    read_triples,
    tokenize_columns,
)
from diffcse.distributed import convert_batchnorm
from diffcse.encoder import encode_tokenized, read_folder_pooling, resolve_model_path
from diffcse.export import export_model
from diffcse.modeling import SentenceEncoder
from diffcse.objectives.contrastive import ContrastiveModel
from diffcse.objectives.infonce import InfoNCE
from senteval_runner.report import write_json_atomic  # one atomic JSON writer for the project

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def resolve_pooler(config: TrainConfig, model_path: str) -> str:
    """'auto' means the folder's own pooling (a sentence-transformers folder's), else [CLS]."""
    if config.pooler != "auto":
        return "cls" if config.pooler == "cls_before_pooler" else config.pooler
    declared = read_folder_pooling(model_path)["pooler"] if Path(model_path).is_dir() else None
    return "cls" if declared in (None, "cls_before_pooler") else declared


def build_model(config: TrainConfig, model_path: str, tokenizer: object) -> ContrastiveModel:
    """The training module for the configured objective."""
    encoder = SentenceEncoder.from_pretrained(
        model_path,
        pooler=resolve_pooler(config, model_path),
        head=config.head,
        mlp_only_train=config.mlp_only_train,
    )
    encoder.speed_up(config.packing, config.fast_dropout)
    if config.sync_batchnorm:
        convert_batchnorm(encoder)
    # The backbone's own pooler layer is never used in training; frozen, DDP need not track it.
    if getattr(encoder.backbone, "pooler", None) is not None:
        encoder.backbone.pooler.requires_grad_(False)
    loss = InfoNCE(config.temperature, config.hard_negative_weight)
    if config.objective == "diffcse":
        from diffcse.objectives.diffcse import DiffCSEModel

        model = DiffCSEModel.from_config(config, encoder, loss, tokenizer, model_path)
    else:
        model = ContrastiveModel(encoder, loss)
    model.gather_negatives = config.gather_negatives
    return model


def load_dataset(config: TrainConfig, tokenizer: object) -> tuple[object, dict]:
    """Read and tokenise the training file; return the dataset and counts for the log."""
    path = Path(config.train_file) if config.train_file else default_corpus()
    if config.objective == "sup-simcse":
        rows = read_triples(path, config.encoding_errors)
        columns = [list(col) for col in zip(*rows, strict=True)] if rows else [[]]
        info = {"examples": len(rows), "columns": len(columns)}
    else:
        sf = read_sentences(path, config.encoding_errors)
        columns = [sf.sentences]
        info = {"examples": len(sf.sentences), "empty_lines": sf.empty_lines, "replaced_lines": sf.replaced_lines}
    n = len(columns[0])
    if n < config.batch_size:
        raise InputError(
            f"{path}: {n} usable examples, fewer than one batch ({config.batch_size}); "
            "add data or lower --batch-size"
        )
    dataset, truncated = tokenize_columns(tokenizer, columns, config.max_seq_length)
    info["truncated"] = truncated
    info["train_file"] = str(path)
    return dataset, info


class StsbDevScorer:
    """STS-B dev Spearman of the encoder's inference embedding, with tokenisation cached."""

    def __init__(self, tokenizer: object, max_seq_length: int, data_dir: str | None) -> None:
        from senteval_runner import StsbDevEvaluator

        self.evaluator = StsbDevEvaluator(data_dir, split="dev")
        self.tokenizer = tokenizer
        sents = self.evaluator.sentences
        self.index = {s: i for i, s in enumerate(sents)}
        self.encoded = tokenizer(sents, truncation=True, max_length=max_seq_length)

    def __call__(self, encoder: SentenceEncoder, batch_size: int = 128) -> float:
        """Return Spearman (raw correlation) on STS-B dev."""
        device = next(encoder.parameters()).device
        emb = encode_tokenized(encoder, self.tokenizer, self.encoded, batch_size, False, device)

        def encode(batch: list[str]) -> np.ndarray:
            return emb[[self.index[s] for s in batch]]

        return float(self.evaluator(encode)["spearman"])


class JsonlLogger(TrainerCallback):
    """Append every log record (with the step) to metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        """Write one line per log call on the main process."""
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


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
    """HF Trainer that logs the objective's parts and evaluates STS-B dev, exporting the best."""

    def __init__(self, *args, scorer: StsbDevScorer | None, config: TrainConfig, tokenizer_for_export, **kwargs):  # noqa: ANN001, ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.scorer = scorer
        self.run_config = config
        self.export_tokenizer = tokenizer_for_export
        self.best_score = -math.inf
        self._last_eval: tuple[int, dict] | None = None
        state_file = Path(config.output_dir) / "best.json"
        if config.resume and state_file.exists():
            self.best_score = json.loads(state_file.read_text())["stsb_dev_spearman"]

    def log(self, logs: dict, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        """Add the objective's averaged parts to each training log line."""
        if "loss" in logs:
            logs.update(self.model.pop_stats())
            logs["effective_batch_size"] = (
                self.run_config.batch_size * self.args.world_size * self.args.gradient_accumulation_steps
            )
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:  # noqa: ANN001
        """STS-B dev Spearman; export the encoder to output_dir when it beats the best so far."""
        if self.scorer is None or not self.args.should_save:
            return {}  # rank 0 alone evaluates and saves
        if self._last_eval is not None and self._last_eval[0] == self.state.global_step:
            return self._last_eval[1]  # the Trainer may ask again at the same step (epoch/training end)
        start = time.perf_counter()
        score = self.scorer(self.model.encoder)
        metrics = {f"{metric_key_prefix}_stsb_spearman": score, f"{metric_key_prefix}_seconds": time.perf_counter() - start}
        if score > self.best_score and self.args.should_save:
            self.best_score = score
            self.export(step=self.state.global_step, score=score)
        metrics[f"{metric_key_prefix}_best_stsb_spearman"] = self.best_score
        self.log(metrics)
        self._last_eval = (self.state.global_step, metrics)
        return metrics

    def export(self, step: int, score: float | None) -> None:
        """Write the inference model to output_dir and remember which step it came from (rank 0)."""
        if not self.args.should_save:
            return
        out = Path(self.run_config.output_dir)
        export_model(self.model.encoder, self.export_tokenizer, out, self.run_config.max_seq_length)
        write_json_atomic(out / "best.json", {"step": step, "stsb_dev_spearman": score})


def training_arguments(config: TrainConfig, steps_per_epoch: int) -> TrainingArguments:
    """Map our config onto the HF TrainingArguments."""
    report_to = []
    try:
        import tensorboard  # noqa: F401

        report_to = ["tensorboard"]
    except ImportError:
        pass
    return TrainingArguments(
        output_dir=str(Path(config.output_dir) / CHECKPOINTS),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        # The fused kernel (the Trainer's own default) updates each tensor in one pass; the
        # foreach one cost ~5% of a MiniLM step on CPU.
        optim="adamw_torch_fused",
        bf16=resolve_precision(config.precision) == "bf16",
        fp16=resolve_precision(config.precision) == "fp16",
        seed=config.seed,
        # Our evaluation needs no eval_dataset, which the Trainer's own "steps" strategy demands;
        # EvalEvery triggers it instead.
        eval_strategy="no",
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        report_to=report_to,
        remove_unused_columns=False,
        dataloader_num_workers=config.dataloader_workers,
        dataloader_drop_last=True,
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )


def train(config: TrainConfig) -> dict:
    """Run one training job end to end; return a summary (also written to output_dir/summary.json)."""
    config.validate()
    model_path = resolve_model_path(config.model)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset, data_info = load_dataset(config, tokenizer)
    log.info("training data: %s", data_info)
    model = build_model(config, model_path, tokenizer)
    packed = {"encoder": model.encoder.packing}
    if hasattr(model, "discriminator"):
        packed["discriminator"] = model.discriminator.packing
    log.info("packing (real tokens only): %s; fast dropout: %s", packed, config.fast_dropout)
    main_process = int(os.environ.get("RANK", "0")) == 0
    scorer = None
    if config.do_eval and main_process:
        scorer = StsbDevScorer(tokenizer, config.max_seq_length, config.senteval_data)
    if main_process:
        config.save(out / "train_config.yaml")
    steps_per_epoch = len(dataset) // config.batch_size
    args = training_arguments(config, steps_per_epoch)
    trainer = ContrastiveTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=ViewCollator(tokenizer.pad_token_id),
        callbacks=[JsonlLogger(out / METRICS_FILE)] + ([EvalEvery(config.eval_steps)] if scorer else []),
        scorer=scorer,
        config=config,
        tokenizer_for_export=tokenizer,
    )
    resume_from = None
    if config.resume:
        resume_from = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {args.output_dir}")
    initial = None
    if scorer is not None and resume_from is None:
        initial = scorer(model.encoder)
        trainer.log({"eval_stsb_spearman": initial, "eval_best_stsb_spearman": initial})
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    final = None
    if scorer is not None:
        final = trainer.evaluate()["eval_stsb_spearman"]
    elif not config.do_eval:
        trainer.export(step=trainer.state.global_step, score=None)
    summary = {
        "model": model_path,
        "objective": config.objective,
        "head": config.head,
        "packing": packed,
        "fast_dropout": config.fast_dropout,
        "steps": trainer.state.global_step,
        "train_seconds": seconds,
        "train_loss": result.training_loss,
        "stsb_dev_spearman_before": initial,
        "stsb_dev_spearman_final": final,
        "stsb_dev_spearman_best": trainer.best_score if scorer is not None else None,
        "data": data_info,
    }
    if main_process:
        write_json_atomic(out / "summary.json", summary)
    return summary
