"""The bridge from a model folder to senteval_runner: ``encode(list[str]) -> np.ndarray``.

senteval_runner knows nothing of diffcse; it takes any encode function. This adapter loads a
folder with diffcse's Encoder and describes it for the report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from diffcse.core.encoder import Encoder
from diffcse.core.folder import model_name


class FolderEncoder:
    """A model folder (HF or sentence-transformers) loaded through diffcse's Encoder."""

    # The Encoder sorts and batches by token length itself, so hand it big chunks.
    preferred_chunk_size = 8192

    def __init__(self, model: str | None, pooler: str | None = None, max_seq_length: int | None = None,
                 device: str | None = None, batch_size: int = 64, precision: str = "fp32",
                 backend: str = "torch") -> None:
        """Load ``model`` with ``pooler`` (None = the folder's own pooling, 'st' = SentenceTransformer)."""
        self.encoder = Encoder.load(model, pooler=pooler, max_seq_length=max_seq_length, device=device,
                                    precision=precision, backend=backend)
        self.batch_size = batch_size
        module = self.encoder.module
        self.description = {
            "model": model_name(str(self.encoder.name_or_path)),
            "pooler": module.pooler if module is not None else "st",
            "max_seq_length": int(self.encoder.max_seq_length),
            "normalize": bool(self.encoder.normalize_default),
            "device": str(self.encoder.device),
            "precision": precision,
            "backend": backend,
        }

    def __call__(self, sentences: list[str]) -> np.ndarray:
        """Embeddings in input order, float32."""
        return self.encoder.encode(sentences, batch_size=self.batch_size)


class RememberingEncoder:
    """An encode function that keeps the embeddings of chosen sentences, so a second pass costs nothing.

    `diffcse eval` scores STS-B, then measures alignment and uniformity on the same sentences;
    only those are kept, so memory stays bounded however many tasks run.
    """

    def __init__(self, encode: FolderEncoder, keep: set[str]) -> None:
        """Wrap `encode`; remember the rows of the sentences in `keep`."""
        self.encode = encode
        self.keep = keep
        self.memory: dict[str, np.ndarray] = {}
        self.preferred_chunk_size = encode.preferred_chunk_size

    def __call__(self, sentences: list[str]) -> np.ndarray:
        """Embeddings in input order; remembered rows are reused, the rest encoded."""
        if not sentences:
            return self.encode(sentences)
        missing = [s for s in dict.fromkeys(sentences) if s not in self.memory]
        fresh = dict(zip(missing, self.encode(missing), strict=True)) if missing else {}
        self.memory.update((s, row) for s, row in fresh.items() if s in self.keep)
        return np.stack([fresh[s] if s in fresh else self.memory[s] for s in sentences])


def evaluate_folder(
    enc: FolderEncoder,
    tasks: list[str] | None = None,
    task_set: str | None = None,
    mode: str = "test",
    data_dir: str | None = None,
    alignment_uniformity: bool = True,
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> dict:
    """senteval_runner's report for a loaded folder, plus alignment/uniformity when STS-B is evaluated.

    `options` go to senteval_runner.engine.evaluate (batch_size, seed, batched, device, ...).
    Alignment and uniformity use STS-B test (dev in 'dev' mode, which never touches a test split).
    """
    from diffcse.core.io import display_path
    from diffcse.core.metrics import stsb_alignment_uniformity
    from senteval_runner.data import STSB_FILES, read_stsb_file, resolve_data_dir
    from senteval_runner.engine import evaluate, resolve_tasks

    root = resolve_data_dir(data_dir)
    names = resolve_tasks(tasks, task_set)
    measure = alignment_uniformity and "STSBenchmark" in names
    split = "dev" if mode == "dev" else "test"
    encode: Callable[[list[str]], np.ndarray] = enc
    if measure:
        pairs = read_stsb_file(root / "downstream" / "STS" / "STSBenchmark" / STSB_FILES[split])
        encode = RememberingEncoder(enc, set(pairs.a + pairs.b))
    report = evaluate(encode, tasks=names, mode=mode, data_dir=root, progress=progress, **options)
    if measure:
        report["alignment_uniformity"] = stsb_alignment_uniformity(encode, root, split=split)
    report["settings"]["encoder"] = enc.description
    report["settings"]["data_dir"] = display_path(report["settings"]["data_dir"])
    return report
