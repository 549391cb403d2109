"""diffcse: train, evaluate and search SimCSE/DiffCSE sentence embeddings.

Layout (arrows point one way: features -> core; senteval_runner imports nothing from diffcse):
    diffcse.core        the encoder model, poolers and heads, model folders, Encoder, io, runtime, options
    diffcse.training    configs, data, the trainer, DDP, packing-aware objectives; `diffcse train`
    diffcse.evaluation  `diffcse eval`: senteval_runner on a model folder
    diffcse.search      encode, FAISS + SQLite index, CLI and HTTP service
    diffcse.finetune    few-shot fine-tuning with CCE and DML losses
"""

from __future__ import annotations

__version__ = "0.2.0"
__all__ = ["Encoder", "SearchIndex", "TrainConfig", "train"]


def __getattr__(name: str) -> object:
    # Lazy, so `import diffcse` stays cheap and the search extra stays optional.
    if name == "Encoder":
        from diffcse.core.encoder import Encoder

        return Encoder
    if name == "SearchIndex":
        from diffcse.search import SearchIndex

        return SearchIndex
    if name == "TrainConfig":
        from diffcse.training.config import TrainConfig

        return TrainConfig
    if name == "train":
        from diffcse.training.trainer import train

        return train
    raise AttributeError(name)
