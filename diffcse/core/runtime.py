"""Where and how computation runs: device, CPU threads, precision. One place for every command."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# What runs an Encoder's transformer: torch, or ONNX Runtime (diffcse.core.onnx).
BACKENDS = ("torch", "onnx")


def quiet_openmp() -> None:
    """Let idle OpenMP threads sleep; takes effect only before torch/faiss load their runtimes.

    With spinning threads (the default), faiss k-means was 5-20x slower on a busy 2-core machine in
    our tests; a user's explicit OMP_WAIT_POLICY wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_threads(n: int | None) -> None:
    """Cap torch's and faiss's CPU threads (None = leave the libraries' defaults)."""
    if not n:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(n)


def resolve_device(device: str | None = None) -> str:
    """The device to run on: the one asked for (checked), else cuda when present, else cpu."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu")
    try:
        torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device ({err})") from None
    return device


def setup(threads: int | None = None, device: str | None = None) -> str:
    """Apply the common runtime options of a command; return the resolved device."""
    set_threads(threads)
    return resolve_device(device)


def bf16_supported() -> bool:
    """Whether bf16 autocast runs on native bf16 units here (CUDA, or x86 with AVX512-BF16/AMX)."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """Turn 'auto' into the precision this machine runs fastest without fp16's loss scaling; check the rest.

    fp16 needs a CUDA GPU (on CPU the Trainer would silently run fp32), so asking for it elsewhere
    is an error; bf16 without native units works but is emulated and slow, so it warns.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if precision == "fp16" and not str(device).startswith("cuda"):
        raise ValueError("precision: fp16 needs a CUDA GPU; on this device use fp32, bf16 or auto")
    if precision == "bf16" and not bf16_supported():
        warnings.warn(
            "precision bf16: this machine has no native bf16 units (no AVX512-BF16/AMX), so bf16 is emulated "
            "and much slower than fp32 here; use fp32 or auto",
            stacklevel=2,
        )
    return precision
