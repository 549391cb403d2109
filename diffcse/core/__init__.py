"""The shared core: encoder model, poolers and heads, model folders, Encoder, io, runtime, CLI options.

Nothing here imports a feature package (training, evaluation, search, finetune).
"""
