"""ONNX Runtime as the transformer forward of an Encoder (`--backend onnx`), for BERT-family encoders on CPU.

Measured in benchmarks/bench_onnx.py (results/bench_onnx.json): ONNX Runtime is only faster than
torch here with its BERT fusions (one Attention op per layer, fused embedding/skip LayerNorms,
BiasGelu), which match the graph of eager attention exported by the TorchScript exporter; the
default (dynamo) export of the SDPA graph was 0.91x torch. So this module exports that one way,
runs the `onnxruntime.transformers` BERT optimizer, and refuses other model families. Tokenising,
padding, pooling, the head and normalisation stay the Encoder's own: ONNX replaces the
transformer's forward only. Every session is checked against torch on probe sentences before it is
used (1 - cos <= 1e-5), so an export that drifts is an error, never silently different vectors.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from diffcse.core.errors import InputError
from diffcse.core.io import atomic_path
from diffcse.core.modeling import SentenceEncoder, pool

# Model families the ORT BERT optimizer fuses (its model_type "bert" covers their graphs).
FUSABLE = ("bert", "roberta", "xlm-roberta", "distilbert")
POOLERS = ("cls", "cls_before_pooler", "avg")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
TOLERANCE = 1e-5
PROBES = (
    "a",
    "The cat sat on the mat.",
    "Two men are playing chess in a park while a small crowd watches them closely.",
    "Stock markets fell sharply on Monday after the central bank raised interest rates again, "
    "surprising analysts who had expected a pause.",
)


def cache_dir() -> Path:
    """Where exported models are kept: $DIFFCSE_CACHE_DIR/onnx, else ~/.cache/diffcse/onnx."""
    root = os.environ.get("DIFFCSE_CACHE_DIR") or Path.home() / ".cache" / "diffcse"
    return Path(root) / "onnx"


def _require_onnxruntime() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise InputError("--backend onnx needs onnxruntime and onnx: pip install 'diffcse[onnx]'") from None


def check_supported(module: SentenceEncoder) -> None:
    """Refuse what the ONNX path does not cover (other model families, poolers needing per-layer states)."""
    kind = module.backbone.config.model_type
    if kind not in FUSABLE:
        raise InputError(f"--backend onnx: model type {kind!r} is not supported (only {', '.join(FUSABLE)}: "
                         "ONNX Runtime is faster than torch here only with its BERT fusions); use --backend torch")
    if module.pooler not in POOLERS:
        raise InputError(f"--backend onnx: pooler {module.pooler!r} needs every layer's states; "
                         f"use one of {', '.join(POOLERS)} or --backend torch")


class _Backbone(torch.nn.Module):
    """The transformer with tensor inputs and its token states (and pooler output) as outputs, for export."""

    def __init__(self, backbone: torch.nn.Module, with_pooler: bool, with_types: bool) -> None:
        super().__init__()
        self.backbone, self.with_pooler, self.with_types = backbone, with_pooler, with_types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """last_hidden_state, and pooler_output when the [CLS] pooler uses the backbone's pooler layer."""
        extra = {"token_type_ids": token_type_ids} if self.with_types else {}
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra)
        return (out.last_hidden_state, out.pooler_output) if self.with_pooler else (out.last_hidden_state,)


def _uses_pooler_layer(module: SentenceEncoder) -> bool:
    return module.pooler == "cls" and module.use_backbone_pooler


def _input_names(module: SentenceEncoder, tokenizer: object) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names and module.backbone.config.model_type != "distilbert":
        names.append("token_type_ids")
    return names


def export(module: SentenceEncoder, tokenizer: object, path: Path) -> Path:
    """Export the backbone (eager attention, TorchScript exporter) and fuse it with ORT's BERT optimizer, atomically."""
    import warnings

    from onnxruntime.transformers import optimizer

    config = module.backbone.config
    inputs = _input_names(module, tokenizer)
    outputs = ["last_hidden_state", "pooler_output"] if _uses_pooler_layer(module) else ["last_hidden_state"]
    batch = tokenizer(list(PROBES[:2]), padding=True, return_tensors="pt")
    wrapper = _Backbone(module.backbone, _uses_pooler_layer(module), "token_type_ids" in inputs).eval()
    previous = config._attn_implementation
    module.backbone.set_attn_implementation("eager")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The raw export is an intermediate: it lives in a temp folder beside the target and goes with it.
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp, \
                atomic_path(path, suffix=".onnx") as fused:
            raw = Path(tmp) / "raw.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
                torch.onnx.export(wrapper, tuple(batch[k].cpu() for k in inputs), str(raw), dynamo=False,
                                  input_names=inputs, output_names=outputs, opset_version=OPSET,
                                  dynamic_axes={name: {0: "batch", 1: "seq"} for name in inputs + outputs[:1]}
                                  | ({"pooler_output": {0: "batch"}} if len(outputs) > 1 else {}))
            model = optimizer.optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                                             hidden_size=config.hidden_size, opt_level=0)
            model.save_model_to_file(str(fused))
    finally:
        module.backbone.set_attn_implementation(previous)
    return path


class OnnxForward:
    """The Encoder's forward with an ORT session as the transformer: padded batch in, embeddings out."""

    def __init__(self, module: SentenceEncoder, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle threads sleep, as torch's do under OMP_WAIT_POLICY=PASSIVE (a shared machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.module = module
        self.path = path
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings of one padded batch (pooled, the module's head when it applies at inference)."""
        feed = {k: batch[k].cpu().numpy().astype(np.int64, copy=False) for k in self.inputs}
        got = dict(zip(self.outputs, self.session.run(None, feed), strict=True))
        out = BaseModelOutputWithPooling(last_hidden_state=torch.from_numpy(got["last_hidden_state"]),
                                         pooler_output=torch.from_numpy(got["pooler_output"])
                                         if "pooler_output" in got else None)
        pooled = pool(out, batch["attention_mask"].cpu(), self.module.pooler, self.module.use_backbone_pooler)
        return self.module.project(pooled)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(fingerprint: str, module: SentenceEncoder) -> str:
    """What an exported file depends on: the weights, the outputs exported, and the exporting libraries."""
    parts = [fingerprint, module.backbone.config.model_type, str(_uses_pooler_layer(module)), str(OPSET),
             *(f"{n}={_version(n)}" for n in ("torch", "transformers", "onnxruntime", "onnx"))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def onnx_forward(module: SentenceEncoder, tokenizer: object, fingerprint: str, device: torch.device,
                 max_length: int, threads: int | None = None) -> OnnxForward:
    """A checked ORT forward for the module: exported once into the cache, then reused."""
    _require_onnxruntime()
    if device.type != "cpu":
        raise InputError(f"--backend onnx runs on the CPU; got --device {device} (use --backend torch on a GPU)")
    check_supported(module)
    path = cache_dir() / f"{cache_key(fingerprint, module)}.onnx"
    if not path.is_file():
        export(module, tokenizer, path)
    forward = OnnxForward(module, path, threads)
    check_agreement(module, tokenizer, forward, max_length)
    return forward


@torch.inference_mode()
def check_agreement(module: SentenceEncoder, tokenizer: object, forward: OnnxForward, max_length: int) -> float:
    """Largest 1 - cos between torch's and ORT's embeddings of the probe sentences; an error above TOLERANCE."""
    was_training = module.training
    module.eval()
    try:
        batch = dict(tokenizer(list(PROBES), padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt"))
        batch = {k: v for k, v in batch.items() if k in INPUTS}
        ref = module(**{k: v.to(next(module.parameters()).device) for k, v in batch.items()}).embedding.cpu()
        got = forward(batch)
    finally:
        module.train(was_training)
    gap = float((1 - torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=-1)).max())
    if not gap <= TOLERANCE:
        raise RuntimeError(f"--backend onnx: the exported model {forward.path} differs from torch by 1 - cos = "
                           f"{gap:.2e} (> {TOLERANCE:g}) on the probe sentences; delete it to re-export, or use "
                           "--backend torch")
    return gap
