"""Inference: load any HF or sentence-transformers folder and turn sentences into vectors."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from diffcse.core.errors import InputError
from diffcse.core.folder import (
    POOLERS,
    load_tokenizer,
    read_folder_pooling,
    resolve_max_length,
    resolve_model_path,
    resolve_pooler,
)
from diffcse.core.modeling import SentenceEncoder
from diffcse.core.runtime import BACKENDS, bf16_supported, resolve_device

# Encoding precisions: fp32 is the reference; bf16 autocast is the named faster mode.
ENCODE_PRECISIONS = ("fp32", "bf16")


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
        # The transformer forward in ONNX Runtime (Encoder.load(backend='onnx')); None = torch.
        self.onnx: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None

    @classmethod
    def load(
        cls,
        path: str | None = None,
        pooler: str | None = None,
        max_seq_length: int | None = None,
        device: str | None = None,
        precision: str = "fp32",
        backend: str = "torch",
    ) -> Encoder:
        """Load a folder; pooler None = its own pooling (ST config, else [CLS]), 'st' = via SentenceTransformer.

        precision 'bf16' runs the transformer under bf16 autocast: faster on CPUs with bf16 units and
        on GPUs, embeddings differ from fp32 in about the third decimal (outputs stay float32).
        backend 'onnx' runs the transformer in ONNX Runtime (CPU, BERT family; diffcse.core.onnx),
        checked against torch to 1e-5 in cosine when loaded.
        """
        if backend not in BACKENDS:
            raise InputError(f"--backend: unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if backend == "onnx" and precision != "fp32":
            raise InputError("--backend onnx runs in fp32; drop --precision bf16 or use --backend torch")
        path = resolve_model_path(path)
        if pooler is not None and pooler != "st" and pooler not in POOLERS:
            raise InputError(f"--pooler: unknown pooler {pooler!r}; choose from st, {', '.join(POOLERS)}")
        info = read_folder_pooling(path)
        device = resolve_device(device)
        if pooler == "st" or (pooler is None and not info.native):
            from sentence_transformers import SentenceTransformer

            if backend == "onnx":
                raise InputError(f"--backend onnx: {path} runs through SentenceTransformer (pooler 'st' or a "
                                 "pipeline we do not read); use --backend torch")
            st = SentenceTransformer(path, device=device)
            if max_seq_length:
                st.max_seq_length = max_seq_length
            return cls(None, None, st.max_seq_length or 512, False, path, st_model=st, device=device, precision=precision)
        chosen = resolve_pooler(pooler, path, info)
        module = SentenceEncoder.from_pretrained(path, pooler=chosen, head="none", use_backbone_pooler=True)
        module.eval()
        tokenizer = load_tokenizer(path)
        limit = resolve_max_length(max_seq_length, info.max_seq_length, tokenizer, module.backbone.config, path)
        # An ST folder's Normalize module only applies when its own pooling is used.
        normalize = info.normalize and pooler is None
        encoder = cls(module, tokenizer, limit, normalize, path, device=device, precision=precision)
        if backend == "onnx":
            from diffcse.core.onnx import onnx_forward

            encoder.onnx = onnx_forward(module, tokenizer, encoder.fingerprint, encoder.device, limit)
        return encoder

    @property
    def backend(self) -> str:
        """'onnx' when ONNX Runtime runs the transformer, else 'torch'."""
        return "torch" if self.onnx is None else "onnx"

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
        return encode_tokenized(self.module, self.tokenizer, encoded, batch_size, normalize, self.device, self.precision,
                                forward=self.onnx)


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
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> np.ndarray:
    """Encode pre-tokenised sentences in batches sorted by length; the result is in input order.

    `forward` (a padded batch to embeddings) replaces the module's own, e.g. ONNX Runtime's.
    """
    ids = encoded["input_ids"]
    n = len(ids)
    out = np.empty((n, module.hidden_size), dtype=np.float32)
    was_training = module.training
    module.eval()
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    try:
        for idx in length_sorted_batches([len(x) for x in ids], batch_size):
            batch = tokenizer.pad({k: [encoded[k][i] for i in idx] for k in keys}, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, precision):
                emb = (forward(batch) if forward is not None else module(**batch).embedding).float()
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[idx] = emb.cpu().numpy()
    finally:
        module.train(was_training)
    return out


def length_sorted_batches(lengths: list[int] | np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Index batches, longest inputs first, so each padded batch wastes little; callers restore order."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
