"""Encoder adapters: turn a model folder into ``encode(list[str]) -> np.ndarray``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class FolderEncoder:
    """A model folder (HF or sentence-transformers) loaded through ``diffcse.encoder.Encoder``."""

    # The Encoder sorts and batches by token length itself, so hand it big chunks.
    preferred_chunk_size = 8192

    def __init__(self, model: str | None, pooler: str | None = None, max_seq_length: int | None = None,
                 device: str | None = None, batch_size: int = 64, precision: str = "fp32") -> None:
        """Load ``model`` with ``pooler`` (None = the folder's own pooling, 'st' = SentenceTransformer)."""
        # Imported here so senteval_runner's core does not depend on the training package.
        from diffcse.encoder import Encoder

        self.encoder = Encoder.load(model, pooler=pooler, max_seq_length=max_seq_length, device=device,
                                    precision=precision)
        self.batch_size = batch_size
        self.description = {
            "model": str(getattr(self.encoder, "name_or_path", model)),
            "pooler": pooler or "folder default",
            "max_seq_length": int(self.encoder.max_seq_length),
            "normalize": bool(getattr(self.encoder, "normalize_default", False)),
            "device": str(self.encoder.device),
            "precision": precision,
        }

    def __call__(self, sentences: list[str]) -> np.ndarray:
        """Embeddings in input order, float32."""
        return self.encoder.encode(sentences, batch_size=self.batch_size)


def load_encoder(model: str | None, pooler: str | None = None, max_seq_length: int | None = None,
                 device: str | None = None, batch_size: int = 64,
                 precision: str = "fp32") -> Callable[[list[str]], np.ndarray]:
    """Adapter for a model folder; see FolderEncoder."""
    return FolderEncoder(model, pooler, max_seq_length, device, batch_size, precision)
