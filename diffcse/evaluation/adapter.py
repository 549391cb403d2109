"""The bridge from a model folder to senteval_runner: ``encode(list[str]) -> np.ndarray``.

senteval_runner knows nothing of diffcse; it takes any encode function. This adapter loads a
folder with diffcse's Encoder and describes it for the report.
"""

from __future__ import annotations

import numpy as np

from diffcse.core.encoder import Encoder
from diffcse.core.folder import model_name


class FolderEncoder:
    """A model folder (HF or sentence-transformers) loaded through diffcse's Encoder."""

    # The Encoder sorts and batches by token length itself, so hand it big chunks.
    preferred_chunk_size = 8192

    def __init__(self, model: str | None, pooler: str | None = None, max_seq_length: int | None = None,
                 device: str | None = None, batch_size: int = 64, precision: str = "fp32") -> None:
        """Load ``model`` with ``pooler`` (None = the folder's own pooling, 'st' = SentenceTransformer)."""
        self.encoder = Encoder.load(model, pooler=pooler, max_seq_length=max_seq_length, device=device,
                                    precision=precision)
        self.batch_size = batch_size
        module = self.encoder.module
        self.description = {
            "model": model_name(str(self.encoder.name_or_path)),
            "pooler": module.pooler if module is not None else "st",
            "max_seq_length": int(self.encoder.max_seq_length),
            "normalize": bool(self.encoder.normalize_default),
            "device": str(self.encoder.device),
            "precision": precision,
        }

    def __call__(self, sentences: list[str]) -> np.ndarray:
        """Embeddings in input order, float32."""
        return self.encoder.encode(sentences, batch_size=self.batch_size)
