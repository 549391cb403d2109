"""Would an ONNX Runtime backend make `Encoder` faster on these CPUs? Agreement and speed, torch vs ORT.

    python -m benchmarks.bench_onnx [--corpus PATH] [--sentences 2000] [--rounds 3] [--threads 1,2]

The model is the one `Encoder.load(None)` loads (packaged all-MiniLM-L6-v2, its own pooling,
its max length, L2-normalised output). Both sides take the same tokenisation (done once, untimed,
its time recorded), the same length-sorted batches of --batch-size (`length_sorted_batches`), the
same padding (`tokenizer.pad`) and the same pooling (`diffcse.core.modeling.pool`) and
normalisation; ONNX replaces the transformer forward only. The torch side is the project's own
`encode_tokenized`. ONNX variants:

  ort        the backbone exported by torch.onnx.export's default (dynamo) exporter, attention as
             the Encoder runs it (SDPA); ORT session at ORT_ENABLE_ALL.
  ort_fused  the backbone with eager attention exported by the TorchScript exporter (dynamo=False),
             then onnxruntime.transformers' BERT optimizer (fused Attention, EmbedLayerNormalization,
             SkipLayerNormalization, BiasGelu); ORT_ENABLE_ALL. Eager attention is exported
             because the optimizer's attention fusion matches that graph, not the SDPA one.
  ort_int8   ort_fused with dynamic int8 weight quantisation (lossy by design: its agreement is
             reported, it is not held to the tolerance).

Agreement: per-sentence cosine between torch's and each variant's normalised embeddings, over every
timed round; max(1 - cos) and the max absolute element difference. Speed: sentences/s of the
encode from token ids (pad, forward, pool, normalise) for each thread count (torch.set_num_threads /
ORT intra_op_num_threads), --rounds rounds in which every contender runs once, in an order rotated
each round, so machine noise hits all; the load average is recorded around each run. A variant
meets the requirement when it is within --cos-tolerance and its median per-round speed ratio to
torch is at least --min-speedup at every thread count. ONNX files go to runs/bench_onnx/; the
result to results/bench_onnx.json (written atomically, no absolute paths).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

from diffcse.core.runtime import quiet_openmp

# Idle OpenMP threads sleep instead of spinning (a shared machine); the tokenizer's Rust pool is
# capped too, so no part of this benchmark uses more threads than asked for.
quiet_openmp()
os.environ.setdefault("RAYON_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import loadavg, machine_probe, record_model, record_path, write_result  # noqa: E402
from diffcse.core.encoder import Encoder, encode_tokenized, length_sorted_batches  # noqa: E402
from diffcse.core.errors import InputError  # noqa: E402
from diffcse.core.io import default_corpus, iter_lines  # noqa: E402
from diffcse.core.modeling import pool  # noqa: E402

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
VARIANTS = ("ort", "ort_fused", "ort_int8")
LOSSY = ("ort_int8",)
EXTRA_VERSIONS = ("onnxruntime", "onnx", "onnxscript")

EncodeFn = Callable[[dict, int], np.ndarray]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=default_corpus(), help="one sentence per line")
    p.add_argument("--sentences", type=int, default=2000, help="the corpus's first N non-empty lines")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed runs of each contender per thread count (3 x 2,000 sentences: ~13 min at load 6 on 2 cores)")
    p.add_argument("--warmup", type=int, default=128, help="sentences of one untimed run per contender and thread count")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset of the exports (the dynamo exporter's lowest)")
    p.add_argument("--ort-spinning", action="store_true",
                   help="let ORT's idle intra-op threads spin (default off, like torch's OMP_WAIT_POLICY=PASSIVE)")
    p.add_argument("--cos-tolerance", type=float, default=1e-5, help="largest 1 - cos that counts as equal")
    p.add_argument("--min-speedup", type=float, default=1.05,
                   help="median ONNX/torch speed ratio that counts as faster (a smaller win is within this machine's noise)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_onnx"))
    p.add_argument("--output", type=Path, default=None,
                   help="default results/bench_onnx.json (results/bench_onnx_sts.json with --sts)")
    p.add_argument("--sts", action="store_true",
                   help="instead: `diffcse eval`'s STS suite (test) with --backend torch and onnx (the Encoder's "
                        "option, diffcse.core.onnx): every score and the time of each, at the first --threads count")
    args = p.parse_args(argv)
    args.output = args.output or Path("results/bench_onnx_sts.json" if args.sts else "results/bench_onnx.json")
    args.thread_counts = [int(x) for x in args.threads.split(",") if x.strip()]
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if "ort_int8" in args.variant_list and "ort_fused" not in args.variant_list:
        p.error("--variants: ort_int8 is quantised from ort_fused; list both")
    return args


def read_sentences(path: Path, n: int) -> list[str]:
    """The first n non-empty stripped lines of the corpus."""
    try:
        return [line.text for line in islice(iter_lines(path, "corpus"), n)]
    except InputError as err:
        sys.exit(f"bench_onnx: {err} (set DIFFCSE_DATA_DIR or pass --corpus)")


def dist_version(name: str) -> str | None:
    """Installed version of a distribution, None when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class Backbone(torch.nn.Module):
    """The encoder's transformer with tensor inputs and last_hidden_state as its one output (for export)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """Token states [B, L, H]."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
        return out.last_hidden_state


def example_inputs(encoder: Encoder) -> tuple[torch.Tensor, ...]:
    """A small padded batch (two lengths) to trace the export with."""
    batch = encoder.tokenizer(["a short one", "a somewhat longer example sentence to pad against"],
                              padding=True, return_tensors="pt")
    return tuple(batch[k] for k in INPUTS)


def export_dynamo(encoder: Encoder, path: Path, opset: int) -> None:
    """Export the backbone (as the Encoder runs it) with torch.onnx.export's default dynamo exporter."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    shapes = ({0: batch, 1: seq},) * len(INPUTS)
    torch.onnx.export(Backbone(encoder.module.backbone).eval(), example_inputs(encoder), str(path), dynamo=True,
                      input_names=list(INPUTS), output_names=["last_hidden_state"], dynamic_shapes=shapes,
                      opset_version=opset, external_data=False, verbose=False)


def export_torchscript_eager(encoder: Encoder, path: Path, opset: int) -> None:
    """Export the backbone with eager attention through the TorchScript exporter (dynamo=False)."""
    backbone = encoder.module.backbone
    previous = backbone.config._attn_implementation
    backbone.set_attn_implementation("eager")
    try:
        axes = {name: {0: "batch", 1: "seq"} for name in (*INPUTS, "last_hidden_state")}
        torch.onnx.export(Backbone(backbone).eval(), example_inputs(encoder), str(path), dynamo=False,
                          input_names=list(INPUTS), output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=opset)
    finally:
        backbone.set_attn_implementation(previous)
    if backbone.config._attn_implementation != previous:
        raise RuntimeError(f"attention implementation not restored ({backbone.config._attn_implementation})")


def build_models(encoder: Encoder, args: argparse.Namespace) -> dict[str, dict]:
    """Export (and optimise / quantise) each variant under the work dir; what was built, and how."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    args.work_dir.mkdir(parents=True, exist_ok=True)
    config = encoder.module.backbone.config
    built: dict[str, dict] = {}
    if "ort" in args.variant_list:
        path = args.work_dir / "minilm_dynamo.onnx"
        t0 = time.perf_counter()
        export_dynamo(encoder, path, args.opset)
        built["ort"] = {"route": "torch.onnx.export dynamo=True (default exporter; needs onnxscript)",
                        "attention": encoder.module.backbone.config._attn_implementation, "file": path,
                        "build_s": round(time.perf_counter() - t0, 1)}
    if "ort_fused" in args.variant_list:
        raw = args.work_dir / "minilm_torchscript_eager.onnx"
        path = args.work_dir / "minilm_fused.onnx"
        t0 = time.perf_counter()
        export_torchscript_eager(encoder, raw, args.opset)
        model = optimizer.optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size, opt_level=0)
        model.save_model_to_file(str(path))
        fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        built["ort_fused"] = {"route": "torch.onnx.export dynamo=False (TorchScript) + onnxruntime.transformers "
                              "optimizer (model_type bert, opt_level 0)", "attention": "eager",
                              "fused_ops": fused, "file": path, "build_s": round(time.perf_counter() - t0, 1)}
    if "ort_int8" in args.variant_list:
        path = args.work_dir / "minilm_fused_int8.onnx"
        t0 = time.perf_counter()
        # The fused contrib ops have no ONNX shape inference: tell the quantiser their tensors are float.
        quantize_dynamic(str(built["ort_fused"]["file"]), str(path), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
        built["ort_int8"] = {"route": "ort_fused + onnxruntime.quantization.quantize_dynamic (QInt8 weights)",
                             "file": path, "build_s": round(time.perf_counter() - t0, 1)}
    for info in built.values():
        info["size_mb"] = round(info["file"].stat().st_size / 2**20, 1)
    return built


def ort_session(path: Path, threads: int, spinning: bool) -> object:
    """A CPU InferenceSession at ORT_ENABLE_ALL with `threads` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_encoder(encoder: Encoder) -> EncodeFn:
    """Encode token ids with the project's own torch path (encode_tokenized), normalised."""

    def run(encoded: dict, batch_size: int) -> np.ndarray:
        """Normalised embeddings, in input order."""
        return encode_tokenized(encoder.module, encoder.tokenizer, encoded, batch_size, True, encoder.device)

    return run


def ort_encoder(encoder: Encoder, session: object) -> EncodeFn:
    """Encode token ids like encode_tokenized, with the ORT session as the transformer forward."""
    from transformers.modeling_outputs import BaseModelOutput

    module = encoder.module
    wanted = [i.name for i in session.get_inputs()]

    @torch.inference_mode()
    def run(encoded: dict, batch_size: int) -> np.ndarray:
        """Normalised embeddings, in input order."""
        ids = encoded["input_ids"]
        out = np.empty((len(ids), module.hidden_size), dtype=np.float32)
        keys = [k for k in INPUTS if k in encoded]
        for idx in length_sorted_batches([len(x) for x in ids], batch_size):
            batch = encoder.tokenizer.pad({k: [encoded[k][i] for i in idx] for k in keys}, return_tensors="np")
            feed = {k: np.asarray(batch[k], dtype=np.int64) for k in wanted}
            hidden = session.run(None, feed)[0]
            mask = torch.from_numpy(feed["attention_mask"])
            pooled = pool(BaseModelOutput(last_hidden_state=torch.from_numpy(hidden)), mask, module.pooler,
                          module.use_backbone_pooler)
            emb = torch.nn.functional.normalize(module.project(pooled).float(), dim=-1)
            out[idx] = emb.numpy()
        return out

    return run


def agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    """max and mean (1 - cos) per sentence, and the max absolute element difference, in float64."""
    a, b = reference.astype(np.float64), other.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    gap = 1.0 - cos
    return {"max_one_minus_cos": float(gap.max()), "mean_one_minus_cos": float(gap.mean()),
            "max_abs_diff": float(np.abs(a - b).max())}


def worst(records: list[dict]) -> dict:
    """The element-wise worst of several agreement records."""
    return {k: max(r[k] for r in records) for k in records[0]} if records else {}


def timed(fn: EncodeFn, encoded: dict, batch_size: int) -> tuple[np.ndarray, dict]:
    """One timed encode: its output, wall and process-CPU seconds, and the load average around it."""
    before = loadavg()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(encoded, batch_size)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(encoded["input_ids"])
    return out, {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "sent_per_s": round(n / wall, 1),
                 "loadavg_before": before, "loadavg_after": loadavg()}


def subset(encoded: dict, n: int) -> dict:
    """The first n sentences of a tokenised batch."""
    return {k: v[:n] for k, v in encoded.items()}


def bench_threads(encoder: Encoder, encoded: dict, models: dict[str, dict], threads: int,
                  args: argparse.Namespace) -> tuple[dict, dict]:
    """Rounds of every contender at one thread count: speed records and agreement with torch."""
    torch.set_num_threads(threads)
    contenders: dict[str, EncodeFn] = {"torch": torch_encoder(encoder)}
    for name, info in models.items():
        contenders[name] = ort_encoder(encoder, ort_session(info["file"], threads, args.ort_spinning))
    for fn in contenders.values():
        fn(subset(encoded, args.warmup), args.batch_size)
    names = list(contenders)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            out, record = timed(contenders[name], encoded, args.batch_size)
            record["round"], record["position"] = r, order.index(name)
            rounds[name].append(record)
            outputs[name].append(out)
            print(f"threads {threads} round {r} {name:9s} {record['sent_per_s']:7.1f} sent/s "
                  f"(load {record['loadavg_before'][0]:.2f})", flush=True)
    reference = outputs["torch"][0]
    agree = {name: worst([agreement(reference, o) for o in outputs[name]]) for name in names}
    speed: dict[str, dict] = {}
    for name in names:
        sps = [rec["sent_per_s"] for rec in rounds[name]]
        entry = {"rounds": rounds[name], "median_sent_per_s": round(statistics.median(sps), 1)}
        if name != "torch":
            ratios = [rec["sent_per_s"] / t["sent_per_s"] for rec, t in zip(rounds[name], rounds["torch"], strict=True)]
            cpu = [t["cpu_s"] / rec["cpu_s"] for rec, t in zip(rounds[name], rounds["torch"], strict=True)]
            entry.update({"ratio_to_torch_per_round": [round(x, 3) for x in ratios],
                          "median_ratio_to_torch": round(statistics.median(ratios), 3),
                          "min_ratio_to_torch": round(min(ratios), 3),
                          "median_cpu_time_ratio_torch_over_this": round(statistics.median(cpu), 3)})
        speed[name] = entry
    return speed, agree


def verdict(speed: dict, agree: dict, args: argparse.Namespace) -> dict:
    """Per fp32 variant: within tolerance at every thread count, faster at every thread count, both."""
    out: dict[str, dict] = {}
    for name in args.variant_list:
        within = all(agree[t][name]["max_one_minus_cos"] <= args.cos_tolerance for t in agree)
        ratios = {t: speed[t][name]["median_ratio_to_torch"] for t in speed}
        faster = all(r >= args.min_speedup for r in ratios.values())
        out[name] = {"within_tolerance": within, "faster": faster, "median_ratio_to_torch": ratios,
                     "meets_requirement": (within and faster) if name not in LOSSY else None}
    adopt = [n for n, v in out.items() if v["meets_requirement"]]
    out["summary"] = (f"meets the requirement: {', '.join(adopt)}" if adopt else
                      "no fp32 ONNX variant is both within tolerance and faster at every thread count")
    return out


def sts_comparison(args: argparse.Namespace) -> None:
    """The STS suite scored through Encoder(backend=torch) and Encoder(backend=onnx): scores and time."""
    from diffcse.evaluation.adapter import FolderEncoder, evaluate_folder
    from senteval_runner import STS_TASKS
    from senteval_runner.engine import headline

    threads = args.thread_counts[0]
    torch.set_num_threads(threads)
    runs: dict[str, dict] = {}
    # torch, onnx, onnx, torch: each backend once early and once late, so a drift in load hits both.
    for i, backend in enumerate(("torch", "onnx", "onnx", "torch")):
        t0 = time.perf_counter()
        enc = FolderEncoder(None, backend=backend)
        load_s = time.perf_counter() - t0
        before = loadavg()
        t0 = time.perf_counter()
        report = evaluate_folder(enc, tasks=list(STS_TASKS), mode="test", alignment_uniformity=False)
        wall = time.perf_counter() - t0
        # Unrounded headline scores (the table rounds to 2 decimals, which could hide or make a 0.01).
        sts = {task: float(headline(task, report["results"][task], "test")) for task in STS_TASKS}
        entry = runs.setdefault(backend, {"scores": sts, "eval_s": [], "load_s": [], "loadavg": []})
        if entry["scores"] != sts:
            raise RuntimeError(f"{backend}: two runs gave different scores: {entry['scores']} vs {sts}")
        entry["eval_s"].append(round(wall, 1))
        entry["load_s"].append(round(load_s, 1))
        entry["loadavg"].append([before, loadavg()])
        print(f"run {i} {backend}: STS-B {sts['STSBenchmark']:.4f} in {wall:.1f} s (load {before[0]:.2f})", flush=True)
    diffs = {task: round(abs(runs["onnx"]["scores"][task] - runs["torch"]["scores"][task]), 6)
             for task in runs["torch"]["scores"]}
    result = {
        "benchmark": "bench_onnx --sts",
        "what": "diffcse eval's STS suite (test, 7 tasks, Spearman x 100 as SimCSE reports it) through the "
                "Encoder with --backend torch and --backend onnx: every score, and the wall time of each run",
        "settings": {"model": record_model(enc.encoder.name_or_path), "tasks": list(STS_TASKS), "mode": "test",
                     "threads": threads, "order": "torch, onnx, onnx, torch", "tolerance": 0.01},
        "machine": machine_probe(),
        "runs": runs,
        "max_abs_score_difference": max(diffs.values()),
        "abs_score_difference": diffs,
        "within_tolerance": max(diffs.values()) <= 0.01,
        "time_ratio_torch_over_onnx": round(sum(runs["torch"]["eval_s"]) / sum(runs["onnx"]["eval_s"]), 3),
    }
    result["machine"]["versions"].update({name: dist_version(name) for name in EXTRA_VERSIONS})
    path = write_result(args.output, result)
    print(f"wrote {record_path(path)}: max |score difference| {result['max_abs_score_difference']}, "
          f"time ratio torch/onnx {result['time_ratio_torch_over_onnx']}")


def main(argv: list[str] | None = None) -> None:
    """Export, check, time, and write the result."""
    args = parse_args(argv)
    if args.sts:
        return sts_comparison(args)
    torch.set_num_threads(max(args.thread_counts))
    sentences = read_sentences(args.corpus, args.sentences)
    encoder = Encoder.load(None, device="cpu")
    if encoder.module is None or encoder.module.pooler in ("avg_first_last", "avg_top2"):
        sys.exit("bench_onnx: the model's pooling needs more than last_hidden_state; not covered")
    t0 = time.perf_counter()
    encoded = encoder.tokenizer(sentences, truncation=True, max_length=encoder.max_seq_length, padding=False)
    tokenize_s = time.perf_counter() - t0
    lengths = [len(x) for x in encoded["input_ids"]]
    # The torch contender is the Encoder's own path: check it reproduces Encoder.encode exactly.
    same = float(np.abs(encoder.encode(sentences, batch_size=args.batch_size, normalize=True)
                        - torch_encoder(encoder)(encoded, args.batch_size)).max())
    models = build_models(encoder, args)
    speed: dict[str, dict] = {}
    agree: dict[str, dict] = {}
    for threads in args.thread_counts:
        speed[str(threads)], agree[str(threads)] = bench_threads(encoder, encoded, models, threads, args)
    result = {
        "benchmark": "bench_onnx",
        "what": "torch vs ONNX Runtime forward of the Encoder's transformer: embedding agreement and "
                "sentences/s of the encode from token ids (pad, forward, mean pool, L2 norm)",
        "settings": {
            "model": record_model(encoder.name_or_path), "corpus": Path(args.corpus).name,
            "sentences": len(sentences), "batch_size": args.batch_size, "max_seq_length": encoder.max_seq_length,
            "pooler": encoder.module.pooler, "normalize": True, "thread_counts": args.thread_counts,
            "rounds": args.rounds, "warmup_sentences": args.warmup, "variants": args.variant_list,
            "opset": args.opset, "ort_intra_op_spinning": args.ort_spinning, "ort_inter_op_threads": 1,
            "ort_graph_optimization_level": "ORT_ENABLE_ALL", "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "cos_tolerance": args.cos_tolerance, "min_speedup": args.min_speedup,
            "round_order": "every contender once per round, order rotated by one each round",
            "work_dir": record_path(args.work_dir),
        },
        "machine": machine_probe(),
        "tokens": {"mean": round(statistics.fmean(lengths), 2), "max": max(lengths),
                   "tokenize_s_untimed": round(tokenize_s, 3)},
        "torch_path_equals_encoder_encode_max_abs_diff": same,
        "export": {name: {**info, "file": f"{record_path(args.work_dir)}/{info['file'].name}"}
                   for name, info in models.items()},
        "agreement_with_torch": agree,
        "agreement_worst_over_threads": {name: worst([agree[t][name] for t in agree]) for name in ["torch", *models]},
        "speed": speed,
        "verdict": verdict(speed, agree, args),
    }
    result["machine"]["versions"].update({name: dist_version(name) for name in EXTRA_VERSIONS})
    result["machine"]["loadavg_end"] = loadavg()
    path = write_result(args.output, result)
    print(f"wrote {record_path(path)}: {result['verdict']['summary']}")


if __name__ == "__main__":
    main()
