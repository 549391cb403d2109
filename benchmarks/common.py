"""What the benchmarks share: a step timer, the machine probe, FLOP counts, process clocks, recorded paths.

Imports only the standard library at load time (torch and transformers are imported where used),
so a benchmark can still set OMP_WAIT_POLICY (diffcse.core.runtime.quiet_openmp) after importing
this module and before torch loads.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from diffcse.core.folder import is_packaged, model_name
from diffcse.core.io import display_path, write_json_atomic

# Distributions whose versions the machine probe records (name in the report -> distribution names).
VERSIONED = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "numpy": ("numpy",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
    "sentence_transformers": ("sentence-transformers",),
}


# --- timing ---------------------------------------------------------------------------------


@functools.cache
def _step_timer_class() -> type:
    """The StepTimer class, built on first use so that importing this module does not load transformers."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall and process-CPU time of each optimiser step (CPU time is less sensitive to a shared machine)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self._t = self._c = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            """Start the clocks."""
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            """Stop the clocks."""
            self.times.append(time.perf_counter() - self._t)
            self.cpu.append(time.process_time() - self._c)

    return StepTimer


def step_timer() -> Any:
    """A new Trainer callback recording each optimiser step's wall time (`.times`) and CPU time (`.cpu`)."""
    return _step_timer_class()()


def timed_training(config: Any, model: Any, tokenizer: Any, dataset: Any, device: str = "cpu") -> Any:
    """Train `model` for config.max_steps on the trainer, optimiser and guard diffcse's train() uses; return the step timer.

    No evaluation, no metrics file and no checkpoints: only the optimiser steps are timed. `config`
    must be validated (its recipe fields filled in).
    """
    from diffcse.training.checkpoints import RunTotals
    from diffcse.training.data import ViewCollator
    from diffcse.training.guard import NonFiniteGuard
    from diffcse.training.trainer import ContrastiveTrainer, guarded_optimizer, training_arguments

    args = training_arguments(config, device)
    guard = NonFiniteGuard(config.on_nonfinite, config.max_skipped_steps)
    timer = step_timer()
    trainer = ContrastiveTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=ViewCollator(tokenizer.pad_token_id),
        callbacks=[guard, timer], optimizer_cls_and_kwargs=guarded_optimizer(args, guard), scorer=None, config=config,
        tokenizer_for_export=tokenizer, guard=guard, totals=RunTotals(),
    )
    trainer.args.save_strategy = "no"
    trainer.train()
    return timer


# --- the machine ----------------------------------------------------------------------------


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """Sustained fp32 GEMM rate of this CPU with torch's current thread count."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries a benchmark's numbers depend on (None = not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in VERSIONED.items():
        found[name] = None
        for dist in dists:
            try:
                found[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def loadavg() -> list[float]:
    """1/5/15-minute load averages, rounded: how much else is running on the machine."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_probe(gflops: bool = False) -> dict:
    """What results record about the machine: CPU, cores, torch threads, bf16 units, versions, load; GEMM rate on request."""
    import torch

    from diffcse.core.runtime import bf16_supported

    info: dict = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "bf16_supported": bf16_supported(),
        "platform": platform.platform(),
        "versions": versions(),
        "loadavg": loadavg(),
    }
    if gflops:
        info["matmul_gflops"] = round(matmul_gflops(), 1)
    return info


# --- this process ---------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    # Linux's VmHWM belongs to this program's memory; ru_maxrss would also count what a forked
    # child inherited from its parent before exec.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def rss_mb() -> float:
    """Current resident memory of this process, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


# --- FLOP counts ----------------------------------------------------------------------------


def encoder_train_flops(config: Any, tokens: float, seq_len: float) -> float:
    """FLOPs of one forward+backward of a BERT-style encoder over `tokens` tokens (matmuls only)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_token_layer = 2 * (4 * h * h + 2 * h * inter)  # QKV+output projections, FFN in and out
    attention = 2 * 2 * seq_len * h  # scores and weighted sum, per token per layer
    forward = tokens * layers * (per_token_layer + attention)
    return 3.0 * forward


def diffcse_flop_floor(
    encoder_config: Any, generator_config: Any, lengths: list[int], batch_size: int, mask_ratio: float
) -> dict:
    """Matmul FLOPs of one step of each timed DiffCSE/SimCSE variant, relative to SimCSE's: a ratio no implementation beats.

    Counts what the design must compute on real tokens (packed): encoder and discriminator forward +
    backward, the frozen generator's forward, its LM head (transform + vocabulary projection) at the
    selected positions or, for the reference design, at every position. Ignores everything else.
    """
    enc, gen = encoder_config, generator_config
    mean_len = statistics.fmean(lengths)
    tokens = 2 * batch_size * mean_len  # two views of each sentence
    # Bernoulli(mask_ratio) over ordinary tokens: all but the two specials of each view.
    selected = mask_ratio * 2 * batch_size * (mean_len - 2)
    simcse = encoder_train_flops(enc, tokens, mean_len)
    generator = encoder_train_flops(gen, tokens, mean_len) / 3  # forward only
    lm_head = 2 * gen.hidden_size * (gen.hidden_size + gen.vocab_size)  # per position
    k2 = simcse * 2 / enc.num_hidden_layers
    flops = {
        "simcse": simcse,
        "diffcse-neighbours": 2 * simcse,
        "diffcse-neighbours-k2": simcse + k2,
        "diffcse-mlm-masked-only": 2 * simcse + generator + selected * lm_head,
        "diffcse-mlm-full-logits": 2 * simcse + generator + tokens * lm_head,
    }
    return {
        "ratio_to_simcse": {k: round(v / simcse, 3) for k, v in flops.items()},
        "gflop_per_step": {k: round(v / 1e9, 1) for k, v in flops.items()},
        "mean_tokens_per_sentence": round(mean_len, 2),
        "what": "matmul FLOPs on real tokens only (encoder_train_flops of benchmarks/common.py); "
                "a lower bound on any implementation's step-time ratio at equal FLOP efficiency",
    }


# --- what results record --------------------------------------------------------------------


def record_path(path: str | os.PathLike[str] | None) -> str | None:
    """A file or folder as results record it: relative to the working folder when inside it, else its name."""
    return None if path is None else display_path(path)


def record_model(path: str | os.PathLike[str] | None) -> str | None:
    """A model folder as results record it: the packaged model as 'all-MiniLM-L6-v2 (packaged)', others by folder name."""
    return None if path is None else model_name(str(path))


def record_settings(values: dict, models: tuple[str, ...] = (), paths: tuple[str, ...] = ()) -> dict:
    """A copy of settings (e.g. vars(args)) with the named model and path values as results record them."""
    out = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in values.items()}
    for key in models:
        out[key] = record_model(out.get(key))
    for key in paths:
        out[key] = record_path(out.get(key))
    return out


def _looks_absolute(value: str) -> bool:
    """Whether a result string is an absolute path (one line, rooted)."""
    return os.path.isabs(value) and "\n" not in value


def scrub_paths(obj: object, where: str = "") -> tuple[object, list[str]]:
    """A copy of obj whose absolute-path strings are recorded (the packaged model by name), and where they were."""
    if isinstance(obj, dict):
        found: list[str] = []
        out = {}
        for k, v in obj.items():
            out[k], more = scrub_paths(v, f"{where}.{k}" if where else str(k))
            found += more
        return out, found
    if isinstance(obj, (list, tuple)):
        found = []
        items = []
        for i, v in enumerate(obj):
            item, more = scrub_paths(v, f"{where}[{i}]")
            items.append(item)
            found += more
        return items, found
    if isinstance(obj, str) and _looks_absolute(obj):
        return (record_model(obj) if is_packaged(obj) else record_path(obj)), [where]
    return obj, []


def write_result(path: str | os.PathLike[str], result: dict) -> Path:
    """Write a result JSON atomically, with any absolute path left in it recorded by name (and a warning saying where)."""
    clean, found = scrub_paths(result)
    if found:
        print(f"warning: absolute paths recorded by name in {path}: {', '.join(found)}", file=sys.stderr)
    return write_json_atomic(path, clean)
