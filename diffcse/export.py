"""Export a trained encoder as a sentence-transformers folder that also loads with AutoModel."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from diffcse.encoder import DIFFCSE_META
from diffcse.modeling import MLPHead, SentenceEncoder

# Our pooler names → sentence-transformers pooling modes.
ST_POOLING = {"cls": "cls", "cls_before_pooler": "cls", "avg": "mean"}


def export_model(
    encoder: SentenceEncoder,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    max_seq_length: int,
) -> Path:
    """Write the encoder (with its inference pooling) into out_dir, replacing files atomically.

    Poolers sentence-transformers has no module for (avg_first_last, avg_top2) are saved as an HF
    folder plus our pooling meta file, without modules.json, so SentenceTransformer cannot silently
    fall back to mean pooling; diffcse's Encoder reads the meta file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        hf_dir = tmp / "hf"
        encoder.backbone.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        head_at_inference = encoder.head is not None and not encoder.mlp_only_train
        meta = {"pooler": encoder.pooler, "max_seq_length": max_seq_length, "head_at_inference": head_at_inference}
        if encoder.pooler in ST_POOLING and (not head_at_inference or isinstance(encoder.head, MLPHead)):
            _save_sentence_transformer(encoder, hf_dir, tmp / "st", max_seq_length, head_at_inference)
            final = tmp / "st"
        elif head_at_inference:
            raise ValueError(
                f"cannot export head {encoder.head_kind!r} at inference with pooler {encoder.pooler!r}; "
                "train with mlp_only_train: true"
            )
        else:
            final = hf_dir
        (final / DIFFCSE_META).write_text(json.dumps(meta, indent=2))
        if not (final / "modules.json").exists():
            # A folder without ST modules must not keep an older export's modules.json.
            (out_dir / "modules.json").unlink(missing_ok=True)
        _replace_contents(final, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_sentence_transformer(
    encoder: SentenceEncoder, hf_dir: Path, st_dir: Path, max_seq_length: int, with_head: bool
) -> None:
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(hf_dir), max_seq_length=max_seq_length)
    dim = encoder.hidden_size
    modules = [transformer, models.Pooling(dim, pooling_mode=ST_POOLING[encoder.pooler])]
    if with_head:
        dense = models.Dense(dim, dim, bias=True, activation_function=torch.nn.Tanh())
        dense.linear.load_state_dict(encoder.head.dense.state_dict())
        modules.append(dense)
    SentenceTransformer(modules=modules, device="cpu").save(str(st_dir))


def _replace_contents(src: Path, dst: Path) -> None:
    """Move every entry of src into dst, each with one rename (files) or swap (folders)."""
    for entry in sorted(src.iterdir(), key=lambda p: p.name == "modules.json"):
        target = dst / entry.name
        if entry.is_dir():
            old = None
            if target.exists():
                old = dst / f".old-{entry.name}-{os.getpid()}"
                os.replace(target, old)
            os.replace(entry, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(entry, target)
