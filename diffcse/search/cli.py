"""`diffcse index build|add|delete|info`, `diffcse search` and `diffcse serve`."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from diffcse.search.manifest import KINDS, MANIFEST_NAME, Manifest

if TYPE_CHECKING:
    from diffcse.encoder import Encoder


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `index`, `search` and `serve` subcommands to the diffcse parser."""
    p_index = subparsers.add_parser("index", help="build or change a search index (faiss + SQLite)")
    sub = p_index.add_subparsers(dest="index_command", required=True)

    p = sub.add_parser("build", help="encode a text file and write a new index directory")
    _model_args(p)
    p.add_argument("--input", required=True, help="one text per line (.txt), or JSON lines {\"text\": ..., \"metadata\": {...}} (.jsonl)")
    p.add_argument("--index-dir", required=True, help="output index directory")
    p.add_argument("--type", dest="kind", default="flat", choices=KINDS, help="index kind (default: flat, exact)")
    p.add_argument("--nlist", type=int, help="ivf/ivfpq: inverted lists (default: ~4*sqrt(N))")
    p.add_argument("--nprobe", type=int, help="ivf/ivfpq: lists searched by default (settable per query)")
    p.add_argument("--M", dest="M", type=int, help="hnsw: links per node (default 32)")
    p.add_argument("--ef-construction", type=int, help="hnsw: build-time beam (default 80)")
    p.add_argument("--ef-search", type=int, help="hnsw: default query-time beam (default 128)")
    p.add_argument("--pq-m", dest="m", type=int, help="ivfpq: sub-quantizers, must divide the dimension")
    p.add_argument("--nbits", type=int, help="ivfpq: bits per sub-quantizer code (default 8)")
    p.add_argument("--train-size", type=int, help="ivf/ivfpq: training sample size (default 100000)")
    p.add_argument("--chunk-size", type=int, default=8192, help="texts encoded and added per step (bounds memory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index (atomically)")
    p.add_argument("--seed", type=int, default=0)
    _common_args(p)
    p.set_defaults(func=run_build)

    p = sub.add_parser("add", help="encode more texts into an existing index")
    _model_args(p, default_help="the model the index records")
    p.add_argument("--input", required=True, help="one text per line (.txt) or JSON lines (.jsonl)")
    p.add_argument("--index-dir", required=True)
    p.add_argument("--chunk-size", type=int, default=8192)
    _common_args(p)
    p.set_defaults(func=run_add)

    p = sub.add_parser("delete", help="remove items by id")
    p.add_argument("--index-dir", required=True)
    p.add_argument("--ids", type=int, nargs="+", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run_delete)

    p = sub.add_parser("info", help="print an index's manifest facts as JSON")
    p.add_argument("--index-dir", required=True)
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    p.set_defaults(func=run_info)

    p = subparsers.add_parser("search", help="query an index with one or more sentences")
    p.add_argument("--index-dir", required=True)
    p.add_argument("--query", action="append", default=[], help="a query sentence (repeatable)")
    p.add_argument("--queries-file", help="one query per line")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threshold", type=float, default=None, help="drop hits with cosine below this")
    p.add_argument("--nprobe", type=int, default=None, help="ivf/ivfpq: lists to search")
    p.add_argument("--ef-search", type=int, default=None, help="hnsw: search beam")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _model_args(p, default_help="the model the index records")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification on load")
    p.set_defaults(func=run_search)

    p = subparsers.add_parser("serve", help="serve an index over HTTP (OpenAPI docs at /docs)")
    p.add_argument("--index-dir", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _model_args(p, default_help="the model the index records")
    p.add_argument("--persist", default="add", choices=["add", "shutdown", "never"],
                   help="when /add and /delete reach disk: after each request, at shutdown, or never")
    p.add_argument("--max-batch", type=int, default=256, help="texts per request")
    p.add_argument("--max-text-chars", type=int, default=2000)
    p.add_argument("--max-top-k", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run_serve)


def _model_args(p: argparse.ArgumentParser, default_help: str = "the packaged all-MiniLM-L6-v2") -> None:
    p.add_argument("--model", default=None, help=f"model folder (default: {default_help})")
    p.add_argument("--pooler", default=None, help="override the folder's pooling (st, cls, cls_before_pooler, avg, ...)")
    p.add_argument("--max-seq-length", type=int, default=None)


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch/faiss threads")
    p.add_argument("--encoding-errors", default="strict", choices=["strict", "replace"])


def _quiet_openmp() -> None:
    """Let idle OpenMP threads sleep; must run before torch/faiss load their OpenMP runtimes.

    With spinning threads (the default), faiss k-means (IVF/PQ training) was 5-20x slower on a
    busy 2-core machine in our tests; a user's explicit OMP_WAIT_POLICY wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _set_threads(n: int | None) -> None:
    """Cap torch and faiss threads (shared machines)."""
    if not n:
        return
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def iter_input(path: str | Path, encoding_errors: str = "strict") -> Iterator[tuple[str, dict | None]]:
    """Stream (text, metadata) from a .txt (one per line) or .jsonl file; errors name file:line."""
    from diffcse.data import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8", errors=encoding_errors).strip()
            except UnicodeDecodeError as err:
                raise InputError(f"{path}:{lineno}: invalid UTF-8 at byte {err.start} (or pass --encoding-errors replace)") from None
            if not line:
                continue
            if not jsonl:
                yield line, None
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise InputError(f"{path}:{lineno}: expected an object with a non-empty string field 'text'")
            extra = set(obj) - {"text", "metadata"}
            if extra:
                raise InputError(f"{path}:{lineno}: unknown field(s) {', '.join(sorted(extra))}; put them under 'metadata'")
            meta = obj.get("metadata")
            if meta is not None and not isinstance(meta, dict):
                raise InputError(f"{path}:{lineno}: field 'metadata' must be an object")
            yield obj["text"].strip(), meta


def _first_pass(path: str, encoding_errors: str, sample_size: int, seed: int) -> tuple[int, list[str]]:
    """Count the texts and reservoir-sample sample_size of them (for IVF training) in one pass."""
    rng = random.Random(seed)
    sample: list[str] = []
    n = 0
    for n, (text, _) in enumerate(iter_input(path, encoding_errors), start=1):
        if len(sample) < sample_size:
            sample.append(text)
        else:
            j = rng.randrange(n)
            if j < sample_size:
                sample[j] = text
    return n, sample


def _load_encoder(args: argparse.Namespace, manifest: Manifest | None = None) -> Encoder:
    """The --model/--pooler encoder, else the model the index records (with its pooling)."""
    from diffcse.encoder import Encoder
    from diffcse.search.index import load_recorded_encoder

    if manifest is None:
        return Encoder.load(args.model, pooler=args.pooler, max_seq_length=args.max_seq_length)
    if args.model is None and args.pooler is None and args.max_seq_length is None:
        return load_recorded_encoder(manifest, args.index_dir)
    recorded = manifest.model or {}
    return Encoder.load(
        args.model or recorded.get("name_or_path"),
        pooler=args.pooler or recorded.get("pooler"),
        max_seq_length=args.max_seq_length or recorded.get("max_seq_length"),
    )


def run_build(args: argparse.Namespace) -> int:
    """Entry point of `diffcse index build`."""
    _quiet_openmp()
    from diffcse.data import InputError
    from diffcse.search.index import DEFAULT_PARAMS, IVF_KINDS, SearchIndex

    _set_threads(args.threads)
    out = Path(args.index_dir)
    if (out / MANIFEST_NAME).exists() and not args.overwrite:
        raise InputError(f"{out} already holds an index: pass --overwrite to replace it, or use `diffcse index add`")
    params = {k: getattr(args, k) for k in DEFAULT_PARAMS[args.kind] if getattr(args, k, None) is not None}
    t0 = time.perf_counter()
    train_texts = None
    expected = None
    if args.kind in IVF_KINDS:
        size = params.get("train_size") or DEFAULT_PARAMS[args.kind]["train_size"]
        expected, train_texts = _first_pass(args.input, args.encoding_errors, size, args.seed)
        if not expected:
            raise InputError(f"input file {args.input} has no texts")
    encoder = _load_encoder(args)
    # tee: build() zips texts and metadata in lockstep, so the buffer between them stays one item.
    pairs_a, pairs_b = itertools.tee(iter_input(args.input, args.encoding_errors))
    index = SearchIndex.build(
        encoder, (t for t, _ in pairs_a), kind=args.kind, metadata=(m for _, m in pairs_b), params=params,
        chunk_size=args.chunk_size, batch_size=args.batch_size, train_texts=train_texts,
        expected_count=expected, seed=args.seed, show_progress=sys.stderr.isatty(),
    )
    if len(index) == 0:
        raise InputError(f"input file {args.input} has no texts")
    index.save(out)
    print(f"indexed {len(index)} texts ({args.kind}, dim {index.dim}) into {out} in {time.perf_counter() - t0:.1f}s")
    index.close()
    return 0


def run_add(args: argparse.Namespace) -> int:
    """Entry point of `diffcse index add`: stream the file in chunks, then save atomically."""
    _quiet_openmp()
    from diffcse.data import InputError
    from diffcse.search.index import SearchIndex
    from diffcse.search.manifest import read_manifest

    _set_threads(args.threads)
    t0 = time.perf_counter()
    encoder = _load_encoder(args, read_manifest(args.index_dir))
    index = SearchIndex.load(args.index_dir, encoder=encoder)
    stream = iter_input(args.input, args.encoding_errors)
    ids: list[int] = []
    while chunk := list(itertools.islice(stream, args.chunk_size)):
        ids += index.add([t for t, _ in chunk], [m for _, m in chunk], batch_size=args.batch_size, chunk_size=args.chunk_size)
    if not ids:
        raise InputError(f"input file {args.input} has no texts")
    index.save()
    print(f"added {len(ids)} texts (ids {ids[0]}..{ids[-1]}) to {args.index_dir}: {len(index)} in all, "
          f"{time.perf_counter() - t0:.1f}s")
    index.close()
    return 0


def run_delete(args: argparse.Namespace) -> int:
    """Entry point of `diffcse index delete`."""
    _quiet_openmp()
    from diffcse.search.index import SearchIndex

    _set_threads(args.threads)
    index = SearchIndex.load(args.index_dir)
    n = index.delete(args.ids)
    if n:
        index.save()
    print(f"deleted {n} of {len(set(args.ids))} ids; {len(index)} left in {args.index_dir}")
    index.close()
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Entry point of `diffcse index info`."""
    _quiet_openmp()
    from diffcse.search.index import SearchIndex

    index = SearchIndex.load(args.index_dir, verify=not args.no_verify)
    print(json.dumps(index.stats(), indent=2))
    index.close()
    return 0


def run_search(args: argparse.Namespace) -> int:
    """Entry point of `diffcse search`: a table per query, or JSON with --json."""
    _quiet_openmp()
    from diffcse.search.errors import EmptyQueryError
    from diffcse.search.index import SearchIndex
    from diffcse.search.manifest import read_manifest

    _set_threads(args.threads)
    queries = list(args.query)
    if args.queries_file:
        queries += [t for t, _ in iter_input(args.queries_file)]
    if not queries:
        raise EmptyQueryError("no query given: pass --query TEXT (repeatable) or --queries-file")
    encoder = _load_encoder(args, read_manifest(args.index_dir))
    index = SearchIndex.load(args.index_dir, encoder=encoder, verify=not args.no_verify)
    results = index.search(queries, top_k=args.top_k, threshold=args.threshold, nprobe=args.nprobe, ef_search=args.ef_search)
    if args.json:
        out = [{"query": q, "results": [h._asdict() for h in hits]} for q, hits in zip(queries, results, strict=True)]
        print(json.dumps(out, ensure_ascii=False, indent=2))
    else:
        for q, hits in zip(queries, results, strict=True):
            print(f"query: {q}")
            if not hits:
                print("   (no hits" + (f" with score >= {args.threshold})" if args.threshold is not None else ")"))
            for rank, h in enumerate(hits, start=1):
                meta = f"  {json.dumps(h.metadata, ensure_ascii=False)}" if h.metadata else ""
                print(f"  {rank:>3}  {h.score:.4f}  [{h.id}]  {h.text}{meta}")
    index.close()
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of `diffcse serve`: one uvicorn worker (the index lives in its memory)."""
    _quiet_openmp()
    import uvicorn

    from diffcse.search.index import SearchIndex
    from diffcse.search.manifest import read_manifest
    from diffcse.search.service import ServiceLimits, create_app

    _set_threads(args.threads or min(2, os.cpu_count() or 1))
    encoder = _load_encoder(args, read_manifest(args.index_dir))
    index = SearchIndex.load(args.index_dir, encoder=encoder)
    limits = ServiceLimits(max_batch=args.max_batch, max_text_chars=args.max_text_chars, max_top_k=args.max_top_k)
    app = create_app(index, limits=limits, persist=args.persist)
    print(f"serving {args.index_dir} ({index.kind}, {len(index)} texts) on http://{args.host}:{args.port} (docs: /docs)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, workers=1)
    index.close()
    return 0
