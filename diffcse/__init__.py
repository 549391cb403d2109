"""diffcse: train, evaluate and search SimCSE/DiffCSE sentence embeddings."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Encoder", "SearchIndex", "TrainConfig", "train"]


def __getattr__(name: str) -> object:
    # Lazy, so `import diffcse` stays cheap and the search extra stays optional.
    if name == "Encoder":
        from diffcse.encoder import Encoder

        return Encoder
    if name == "SearchIndex":
        from diffcse.search import SearchIndex

        return SearchIndex
    if name == "TrainConfig":
        from diffcse.config import TrainConfig

        return TrainConfig
    if name == "train":
        from diffcse.train import train

        return train
    raise AttributeError(name)
