"""Checkpoints that are complete or not used: a manifest written last, validation and fallback on resume.

The HF Trainer writes `checkpoint-N/` file by file, so a process killed mid-save leaves a folder
that looks like the newest checkpoint but cannot be loaded. After the Trainer has written every
file, `CheckpointManifest` (a TrainerCallback) adds `diffcse_checkpoint.json` (sizes of every file,
plus the run's running loss sum) by atomic rename. `resumable_checkpoint` picks the newest
checkpoint whose files are all present, match the manifest and load, removes the ones that do
not, and says so.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from diffcse.core.errors import InputError
from diffcse.core.io import write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "diffcse_checkpoint.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass
class RunTotals:
    """What a resumed run must carry over from the steps before it (the running loss)."""

    loss_sum: float = 0.0
    skipped_steps: int = 0


@dataclass
class Resume:
    """Where a run resumes from, and which newer checkpoints were unusable."""

    path: Path
    step: int
    totals: RunTotals
    discarded: list[tuple[Path, str]] = field(default_factory=list)


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named checkpoint-N, else None."""
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def problem(path: Path) -> str | None:
    """Why the checkpoint folder cannot be resumed from, or None if every file is there and loads."""
    import torch
    from safetensors import SafetensorError, safe_open
    from transformers.trainer_pt_utils import safe_globals

    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return f"no {MANIFEST}: the save did not finish"
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        sizes = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, the manifest says {size}: truncated or overwritten"
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE} is unreadable ({err})"
    if state.get("global_step") != checkpoint_step(path):
        return f"{TRAINER_STATE} says step {state.get('global_step')}, the folder says {checkpoint_step(path)}"
    weights = [path / w for w in _WEIGHTS if (path / w).is_file()]
    if not weights:
        return "no model weights (model.safetensors)"
    try:
        for file in [*weights, *sorted(path.glob("*.pt")), *sorted(path.glob("*.pth"))]:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as fh:
                    fh.keys()
            else:
                # What the Trainer itself allows when it resumes (numpy RNG state), and nothing more.
                with safe_globals():
                    torch.load(file, weights_only=True, mmap=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{file.name} does not load ({first})"
    return None


def totals_of(path: Path) -> RunTotals:
    """The running totals saved with a checkpoint (zeros for one saved without them)."""
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        return RunTotals(float(data.get("loss_sum", 0.0)), int(data.get("skipped_steps", 0)))
    except (OSError, ValueError, TypeError):
        return RunTotals()


def resumable_checkpoint(checkpoints: Path) -> Resume:
    """The newest complete checkpoint under `checkpoints`; incomplete newer ones are removed and reported."""
    folders = sorted(
        (p for p in checkpoints.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
        key=lambda p: checkpoint_step(p) or 0,
        reverse=True,
    ) if checkpoints.is_dir() else []
    discarded: list[tuple[Path, str]] = []
    for folder in folders:
        reason = problem(folder)
        if reason is None:
            for bad, why in discarded:
                log.warning("--resume: %s is incomplete (%s); removed it", bad, why)
                shutil.rmtree(bad, ignore_errors=True)
            if discarded:
                log.warning("--resume: falling back to %s, the newest complete checkpoint", folder)
            return Resume(folder, checkpoint_step(folder) or 0, totals_of(folder), discarded)
        discarded.append((folder, reason))
    if discarded:
        details = "; ".join(f"{p.name}: {why}" for p, why in discarded)
        raise InputError(f"--resume: no complete checkpoint under {checkpoints} ({details})")
    raise InputError(f"--resume: no checkpoint under {checkpoints}")


class CheckpointManifest(TrainerCallback):
    """After the Trainer saves checkpoint-N, write its manifest (file sizes and running totals) last."""

    def __init__(self, checkpoints: Path, totals: Callable[[], RunTotals]) -> None:
        self.checkpoints = checkpoints
        self.totals = totals

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        """Write checkpoint-N/diffcse_checkpoint.json on the main process."""
        if not state.is_world_process_zero:
            return
        folder = self.checkpoints / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
        totals = self.totals()
        write_json_atomic(folder / MANIFEST, {
            "step": state.global_step,
            "files": files,
            "loss_sum": totals.loss_sum,
            "skipped_steps": totals.skipped_steps,
        })
