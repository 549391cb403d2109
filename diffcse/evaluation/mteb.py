"""SentEval STS scores written in MTEB's results layout, for the tasks where the two measure the same thing.

Layout (what mteb 2.x's ResultCache reads under its `results/` folder):

    DIR/<model name>/<revision>/model_meta.json
    DIR/<model name>/<revision>/<Task>.json        one TaskResult per task

Which scores carry MTEB's task names (docs/experiments.md has the evidence): STS12-16 are the same
pairs and gold scores as MTEB's test sets (counted and compared), scored as one pooled set with
cosine Spearman, which is SentEval's 'all' aggregation. STS-B in SentEval is a tokenised copy of the
text ("her hair ." where MTEB has "her hair."), and SentEval's SICK-R test is 4,927 of MTEB's 9,927
pairs, so those two go under names of our own and are never mistaken for MTEB's. Nothing here
imports mteb: the files are written from the format, and the tests load them with mteb's loader.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from diffcse.core.folder import PACKAGED_MODEL
from diffcse.core.io import write_json_atomic

# SentEval task -> (MTEB task name, the MTEB dataset revision with the same pairs; mteb 2.x metadata).
MTEB_TASKS: dict[str, tuple[str, str]] = {
    "STS12": ("STS12", "a0d554a64d88156834ff5ae9920b964011b16384"),
    "STS13": ("STS13", "7e90230a92c190f1bf69ae9002b8cea547a64cca"),
    "STS14": ("STS14", "6031580fec1f6af667f0bd2da0a551cf4f0b2375"),
    "STS15": ("STS15", "ae752c7c21bf194d8b67fd573edf7ae58183cbe3"),
    "STS16": ("STS16", "4d8694f8f0e0100860b497b999b3dbed754a0513"),
}
# SentEval tasks that differ from MTEB's namesakes: written under these names instead.
OWN_TASKS: dict[str, str] = {
    "STSBenchmark": "SentEval-STSBenchmark",
    "SICKRelatedness": "SentEval-SICK-R",
}
# The results format written (MTEB's TaskResult of mteb >= 2); mteb reads files without this field,
# or with a version before 1.11, through its legacy converter, so it must be set.
FORMAT_VERSION = "2.0.0"
EVALUATOR = "diffcse senteval_runner (SentEval protocol)"
LANGUAGES = ["eng-Latn"]
PACKAGED_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class MtebModel:
    """What model_meta.json says about the evaluated model."""

    name: str
    revision: str
    n_parameters: int | None = None
    embed_dim: int | None = None
    max_tokens: int | None = None
    framework: list[str] = field(default_factory=lambda: ["PyTorch"])

    @property
    def folder(self) -> str:
        """The model's folder name, as mteb derives it from the name."""
        return self.name.replace("/", "__").replace(" ", "_")

    def meta(self) -> dict:
        """model_meta.json: every field mteb's ModelMeta requires (unknowns as null)."""
        return {
            "loader": None, "loader_kwargs": {}, "name": self.name, "revision": self.revision,
            "release_date": None, "languages": None, "n_parameters": self.n_parameters,
            "n_active_parameters_override": None, "n_embedding_parameters": None, "memory_usage_mb": None,
            "max_tokens": self.max_tokens, "embed_dim": self.embed_dim, "license": None, "open_weights": None,
            "public_training_code": None, "public_training_data": None, "framework": self.framework,
            "reference": None, "similarity_fn_name": "cosine", "use_instructions": False,
            "training_datasets": None, "adapted_from": None, "superseded_by": None, "modalities": ["text"],
            "model_type": ["dense"], "citation": None, "contacts": None, "experiment_kwargs": None,
        }


def default_name(folder_name: str) -> str:
    """MTEB's 'organization/model' name for a model folder: local/<folder>; the packaged model by its Hub name."""
    return PACKAGED_HUB_NAME if folder_name == PACKAGED_MODEL else f"local/{folder_name}"


def describe_model(enc: object, name: str | None = None) -> MtebModel:
    """An MtebModel for a loaded FolderEncoder; the revision is a hash of its weights."""
    encoder = enc.encoder  # type: ignore[attr-defined]
    model = encoder.st_model if encoder.st_model is not None else encoder.module
    return MtebModel(
        name=name or default_name(enc.description["model"]),  # type: ignore[attr-defined]
        revision=encoder.fingerprint,
        n_parameters=int(sum(p.numel() for p in model.parameters())),
        embed_dim=int(encoder.dim),
        max_tokens=int(encoder.max_seq_length),
        framework=["Sentence Transformers", "PyTorch"] if encoder.st_model is not None else ["PyTorch", "Transformers"],
    )


def _scores(spearman: float, pearson: float) -> dict:
    """One MTEB STS score entry (cosine only: the one similarity SentEval scores)."""
    return {
        "main_score": spearman, "cosine_spearman": spearman, "cosine_pearson": pearson,
        # A model without its own similarity function: MTEB's plain spearman/pearson are the cosine ones.
        "spearman": spearman, "pearson": pearson,
        "hf_subset": "default", "languages": LANGUAGES, "evaluator": EVALUATOR,
    }


def task_entries(report: dict) -> dict[str, tuple[str, dict[str, list[dict]]]]:
    """MTEB task name -> (dataset revision, scores by split) for every STS task the report scored."""
    results = report.get("results", {})
    out: dict[str, tuple[str, dict[str, list[dict]]]] = {}
    for task, (name, revision) in MTEB_TASKS.items():
        if task in results and "all" in results[task]:
            agg = results[task]["all"]
            out[name] = (revision, {"test": [_scores(agg["spearman"]["all"], agg["pearson"]["all"])]})
    for task, name in OWN_TASKS.items():
        splits = {s: [_scores(r["spearman"], r["pearson"])] for s, r in results.get(task, {}).items()
                  if s in ("dev", "test")}
        if splits:
            out[name] = ("senteval", splits)
    return out


def write_mteb_results(report: dict, out_dir: str | os.PathLike[str], model: MtebModel) -> list[Path]:
    """Write the report's STS scores as DIR/<model>/<revision>/<Task>.json plus model_meta.json; return the paths."""
    folder = Path(out_dir) / model.folder / model.revision
    timings = report.get("timings", {}).get("per_task", {})
    by_name = {v[0]: k for k, v in MTEB_TASKS.items()} | {v: k for k, v in OWN_TASKS.items()}
    written = []
    now = time.time()
    for name, (revision, scores) in task_entries(report).items():
        seconds = timings.get(by_name[name], {}).get("total_s")
        written.append(write_json_atomic(folder / f"{name}.json", {
            "dataset_revision": revision, "task_name": name, "mteb_version": FORMAT_VERSION,
            "scores": scores, "evaluation_time": seconds, "kg_co2_emissions": None, "date": now,
        }))
    if written:
        written.append(write_json_atomic(folder / "model_meta.json", model.meta()))
    return written
