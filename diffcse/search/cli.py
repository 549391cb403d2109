"""`diffcse encode`, `diffcse index build|add|upsert|delete|info|upgrade`, `diffcse search` and `diffcse serve`."""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diffcse.core.errors import InputError
from diffcse.core.options import add_command, opt
from diffcse.core.runtime import BACKENDS
from diffcse.search.manifest import KINDS, MANIFEST_NAME, Manifest

if TYPE_CHECKING:
    from diffcse.core.encoder import Encoder
    from diffcse.search.index import SearchIndex

POOLER_CHOICES = ("st", "cls", "cls_before_pooler", "avg", "avg_first_last", "avg_top2")
ENCODING_ERRORS = ("strict", "replace")
SEARCH_MODES = ("dense", "lexical", "hybrid")


def parse_where(values: list[str]) -> dict | None:
    """--where JSON (repeatable): JSON objects of field: condition, merged (all must hold); null = no filter."""
    from diffcse.search.filters import compile_where

    merged: dict = {}
    for text in values:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"--where {text!r}: not valid JSON ({err.msg})") from None
        if obj is None:
            continue
        if not isinstance(obj, dict):
            raise InputError(f"--where {text!r}: expected a JSON object of field: condition, got {type(obj).__name__}")
        twice = sorted(set(merged) & set(obj))
        if twice:
            raise InputError(f"--where: field(s) {', '.join(twice)} given twice; put both conditions in one object")
        merged.update(obj)
    compile_where(merged)  # a bad condition is an error naming it before any model loads
    return merged or None


def format_where(where: dict | None) -> list[str]:
    """The --where value that parse_where reads back as where."""
    return [json.dumps(where, ensure_ascii=False)]


@dataclass(kw_only=True)
class RuntimeOptions:
    """Where the command computes."""

    threads: int | None = opt(None, "torch/faiss CPU threads (default: the libraries')", min=1)
    device: str | None = opt(None, "encoder device (default: cuda if available, else cpu)")


@dataclass(kw_only=True)
class ModelOptions(RuntimeOptions):
    """Which model encodes, and how."""

    model: str | None = opt(None, "model folder (default: the packaged all-MiniLM-L6-v2, or the model the index records)")
    pooler: str | None = opt(None, "override the folder's pooling", choices=POOLER_CHOICES)
    max_seq_length: int | None = opt(None, "truncate inputs to this many tokens (default: the model's)", min=3)
    batch_size: int = opt(64, "sentences per forward pass", min=1)
    backend: str = opt("torch", "the transformer's runtime: torch, or onnx (ONNX Runtime with BERT fusions; "
                       "CPU, BERT family, fp32; checked against torch when loaded; pip install 'diffcse[onnx]')",
                       choices=BACKENDS)


@dataclass(kw_only=True)
class EncodeConfig(ModelOptions):
    """Options of `diffcse encode`."""

    input: str = opt(help="text file, one sentence per line")
    output: str = opt(help="output .npy file (written atomically)")
    normalize: bool = opt(False, "L2-normalise the vectors")
    encoding_errors: str = opt("strict", "invalid UTF-8 in the input: an error, or replaced", choices=ENCODING_ERRORS)


@dataclass(kw_only=True)
class BuildConfig(ModelOptions):
    """Options of `diffcse index build`."""

    input: str = opt(help="one text per line (.txt), or JSON lines {\"text\": ..., \"metadata\": {...}} (.jsonl)")
    index_dir: str = opt(help="output index directory")
    kind: str = opt("flat", "index kind (flat = exact)", choices=KINDS, aliases=("--type",))
    nlist: int | None = opt(None, "ivf/ivfpq: inverted lists (default: ~4*sqrt(N))", min=1)
    nprobe: int | None = opt(None, "ivf/ivfpq: lists searched by default (settable per query)", min=1)
    M: int | None = opt(None, "hnsw: links per node (default 32)", min=1)
    ef_construction: int | None = opt(None, "hnsw: build-time beam (default 80)", min=1)
    ef_search: int | None = opt(None, "hnsw: default query-time beam (default 128)", min=1)
    compact_threshold: float | None = opt(None, "hnsw: rebuild the graph at a save once deleted vectors pass this "
                                          "share of it (default 0.2)", min=0.0, max=1.0)
    pq_m: int | None = opt(None, "ivfpq: sub-quantizers, must divide the dimension", min=1)
    nbits: int | None = opt(None, "ivfpq: bits per sub-quantizer code (default 8)", min=1)
    train_size: int | None = opt(None, "ivf/ivfpq: training sample size (default 100000)", min=1)
    rescore: int | None = opt(None, "ivfpq/ivfsq8: keep the exact vectors on disk and re-score this many times "
                              "top_k candidates with them (default 0: off)", min=0)
    vectors: str | None = opt(None, "the texts' vectors from `diffcse encode` (.npy, row i = line i): added from disk "
                              "in chunks instead of encoding; checked against the model on the first rows")
    chunk_size: int = opt(8192, "texts encoded and added per step (bounds memory)", min=1)
    overwrite: bool = opt(False, "replace an existing index (atomically)")
    seed: int = opt(0, "seed of the IVF training sample")
    encoding_errors: str = opt("strict", "invalid UTF-8 in the input: an error, or replaced", choices=ENCODING_ERRORS)

    def params(self) -> dict:
        """The index parameters given (faiss names)."""
        names = {"nlist": "nlist", "nprobe": "nprobe", "M": "M", "ef_construction": "ef_construction",
                 "ef_search": "ef_search", "pq_m": "m", "nbits": "nbits", "train_size": "train_size",
                 "compact_threshold": "compact_threshold", "rescore": "rescore"}
        from diffcse.search.index import DEFAULT_PARAMS

        given = {faiss_name: getattr(self, ours) for ours, faiss_name in names.items() if getattr(self, ours) is not None}
        wrong = sorted(k for k in given if k not in DEFAULT_PARAMS[self.kind])
        if wrong:
            flags = ", ".join("--" + next(o for o, f in names.items() if f == k).replace("_", "-") for k in wrong)
            raise InputError(f"{flags}: not a parameter of index kind {self.kind!r}")
        return given


@dataclass(kw_only=True)
class AddConfig(ModelOptions):
    """Options of `diffcse index add`."""

    input: str = opt(help="one text per line (.txt) or JSON lines (.jsonl)")
    index_dir: str = opt(help="the index directory")
    chunk_size: int = opt(8192, "texts encoded and added per step (bounds memory)", min=1)
    encoding_errors: str = opt("strict", "invalid UTF-8 in the input: an error, or replaced", choices=ENCODING_ERRORS)
    lock_timeout: float = opt(60.0, "seconds to wait while another process writes the index, then fail naming it", min=0)


@dataclass(kw_only=True)
class UpsertConfig(ModelOptions):
    """Options of `diffcse index upsert`."""

    input: str = opt(help='JSON lines {"id": ..., "text": ..., "metadata": {...}}: new ids are added, known ids replaced')
    index_dir: str = opt(help="the index directory")
    chunk_size: int = opt(8192, "documents encoded and upserted per step (bounds memory)", min=1)
    encoding_errors: str = opt("strict", "invalid UTF-8 in the input: an error, or replaced", choices=ENCODING_ERRORS)
    lock_timeout: float = opt(60.0, "seconds to wait while another process writes the index, then fail naming it", min=0)


@dataclass(kw_only=True)
class DeleteConfig(RuntimeOptions):
    """Options of `diffcse index delete`."""

    index_dir: str = opt(help="the index directory")
    ids: list[int] = opt(default_factory=list, help="internal ids to remove", min=0, max=2**63 - 1)
    doc_ids: list[str] = opt(default_factory=list, help="document ids (given at upsert) to remove")
    lock_timeout: float = opt(60.0, "seconds to wait while another process writes the index, then fail naming it", min=0)

    def validate(self) -> None:
        """Something to delete."""
        if not self.ids and not self.doc_ids:
            raise InputError("give --ids and/or --doc-ids")


@dataclass(kw_only=True)
class UpgradeConfig:
    """Options of `diffcse index upgrade`."""

    index_dir: str = opt(help="the index directory")
    lock_timeout: float = opt(60.0, "seconds to wait while another process writes the index, then fail naming it", min=0)


@dataclass(kw_only=True)
class InfoConfig:
    """Options of `diffcse index info`."""

    index_dir: str = opt(help="the index directory")
    verify: bool = opt(True, "check the files' sha256 against the manifest")


@dataclass(kw_only=True)
class SearchConfig(ModelOptions):
    """Options of `diffcse search`."""

    index_dir: str = opt(help="the index directory")
    query: list[str] = opt(default_factory=list, help="query sentences (repeatable)")
    queries_file: str | None = opt(None, "one query per line")
    top_k: int = opt(5, "hits per query", min=1)
    threshold: float | None = opt(None, "drop hits with cosine below this", min=-1.0, max=1.0)
    nprobe: int | None = opt(None, "ivf/ivfpq: lists to search", min=1)
    ef_search: int | None = opt(None, "hnsw: search beam", min=1)
    where: dict | None = opt(None, 'metadata filter, a JSON object: {"lang": "en"}, {"lang": {"in": ["en", "de"]}}, '
                             '{"year": {"gte": 2000, "lt": 2010}} (ops eq ne in gt gte lt lte; fields AND-ed; repeatable)',
                             parse=parse_where, format=format_where, metavar="JSON")
    mode: str = opt("dense", "rank by embeddings, by BM25 over the words (needs no model), or both fused (RRF)",
                    choices=SEARCH_MODES)
    json: bool = opt(False, "print JSON instead of a table")
    verify: bool = opt(True, "check the files' sha256 when loading")


@dataclass(kw_only=True)
class ServeConfig(ModelOptions):
    """Options of `diffcse serve`."""

    index_dir: str = opt(help="the index directory")
    host: str = opt("127.0.0.1", "address to bind")
    port: int = opt(8000, "TCP port", min=1, max=65535)
    persist: str = opt("add", "when /add and /delete reach disk: after each request, at shutdown, or never",
                       choices=("add", "shutdown", "never"))
    max_batch: int = opt(256, "texts per request", min=1)
    max_text_chars: int = opt(2000, "characters per text", min=1)
    max_top_k: int = opt(1000, "largest top_k a request may ask for", min=1)
    api_key: str | None = opt(None, "key that /add and /delete require (Authorization: Bearer KEY or X-API-Key); "
                              "default $DIFFCSE_API_KEY, which keeps it out of `ps`; none: the server is read-only")
    allowed_host: list[str] = opt(default_factory=list, help="Host header value to accept besides localhost and "
                                  "--host, e.g. the server's DNS name (repeatable; '*.example.com' allowed)")
    lock_timeout: float = opt(60.0, "seconds a write waits while another process writes the index (then 503; "
                              "with --persist shutdown: at startup, then fail)", min=0)
    log_level: str = opt("info", "uvicorn log level", choices=("critical", "error", "warning", "info", "debug", "trace"))


@dataclass(kw_only=True)
class MineConfig(ModelOptions):
    """Options of `diffcse mine`."""

    pairs: str = opt(help="CSV with a header naming sent0 (anchor) and sent1 (positive)")
    output: str = opt(help="the sent0,sent1,hard_neg CSV to write (atomically), as sup-simcse reads it")
    corpus: str | None = opt(None, "texts to mine from, one per line (.txt) or JSON lines (.jsonl)")
    index_dir: str | None = opt(None, "or an existing diffcse index to mine from (its model encodes the pairs)")
    skip_top: int = opt(10, "skip the top N candidates of each anchor (too often paraphrases)", min=0)
    depth: int = opt(50, "look at candidates up to this rank", min=1)
    margin: float = opt(0.95, "drop candidates scoring above MARGIN x the positive's score (likely false "
                        "negatives)", min=0.0)
    encoding_errors: str = opt("strict", "invalid UTF-8 in the inputs: an error, or replaced", choices=ENCODING_ERRORS)

    def validate(self) -> None:
        """One source of candidates, and a window that holds some."""
        if (self.corpus is None) == (self.index_dir is None):
            raise InputError("give exactly one of --corpus and --index-dir")
        if self.skip_top >= self.depth:
            raise InputError(f"--skip-top {self.skip_top} must be below --depth {self.depth}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `encode`, `index`, `search`, `serve` and `mine` to the diffcse parser."""
    add_command(subparsers, "encode", EncodeConfig, run_encode, help="encode a text file (one sentence a line) to .npy")
    p_index = subparsers.add_parser("index", help="build or change a search index (faiss + SQLite)")
    sub = p_index.add_subparsers(dest="index_command", required=True)
    add_command(sub, "build", BuildConfig, run_build, help="encode a text file and write a new index directory")
    add_command(sub, "add", AddConfig, run_add, help="encode more texts into an existing index")
    add_command(sub, "upsert", UpsertConfig, run_upsert,
                help="add or replace documents under your own ids, from JSON lines with id, text and metadata")
    add_command(sub, "delete", DeleteConfig, run_delete, help="remove items by id or by document id")
    add_command(sub, "info", InfoConfig, run_info, help="print an index's manifest facts as JSON")
    add_command(sub, "upgrade", UpgradeConfig, run_upgrade,
                help="rewrite an index of an older format in the current one (document ids, full-text index)")
    add_command(subparsers, "search", SearchConfig, run_search, help="query an index with one or more sentences")
    add_command(subparsers, "serve", ServeConfig, run_serve, help="serve an index over HTTP (OpenAPI docs at /docs)")
    add_command(subparsers, "mine", MineConfig, run_mine,
                help="mine hard negatives for (anchor, positive) pairs into a sup-simcse CSV")


def _setup(cfg: RuntimeOptions) -> str:
    """Thread and device setup shared by every search command; returns the device."""
    from diffcse.core import runtime

    runtime.quiet_openmp()
    return runtime.setup(cfg.threads, cfg.device)


def _json_record(text: str, where: str, fields: tuple[str, ...]) -> dict:
    """One JSON-lines record: an object with a non-empty 'text', an object (or no) 'metadata', no unknown fields."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
        raise InputError(f"{where}: expected an object with a non-empty string field 'text'")
    extra = set(obj) - set(fields)
    if extra:
        raise InputError(f"{where}: unknown field(s) {', '.join(sorted(extra))}; put them under 'metadata'")
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise InputError(f"{where}: field 'metadata' must be an object")
    return obj


def iter_input(path: str | Path, encoding_errors: str = "strict") -> Iterator[tuple[str, dict | None]]:
    """Stream (text, metadata) from a .txt (one per line) or .jsonl file; errors name file:line."""
    from diffcse.core.io import iter_lines

    jsonl = Path(path).suffix.lower() in (".jsonl", ".ndjson")
    for line in iter_lines(path, "input file", encoding_errors):
        if not jsonl:
            yield line.text, None
            continue
        obj = _json_record(line.text, f"{path}:{line.lineno}", ("text", "metadata"))
        yield obj["text"].strip(), obj.get("metadata")


def iter_documents(path: str | Path, encoding_errors: str = "strict") -> Iterator[tuple[str, str, dict | None]]:
    """Stream (doc id, text, metadata) from JSON lines {"id", "text", "metadata"}; an integer id is taken as its digits."""
    from diffcse.core.io import iter_lines
    from diffcse.search.errors import SearchIndexError
    from diffcse.search.index import check_doc_ids

    for line in iter_lines(path, "input file", encoding_errors):
        where = f"{path}:{line.lineno}"
        obj = _json_record(line.text, where, ("id", "text", "metadata"))
        doc = obj.get("id")
        if isinstance(doc, int) and not isinstance(doc, bool):
            doc = str(doc)
        if not isinstance(doc, str) or not doc.strip():
            raise InputError(f"{where}: field 'id' must be a non-empty string (or an integer)")
        try:
            check_doc_ids([doc])
        except SearchIndexError as err:
            raise InputError(f"{where}: field 'id': {str(err).removeprefix('doc id #0 ')}") from None
        yield doc, obj["text"].strip(), obj.get("metadata")


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


def _load_encoder(cfg: ModelOptions, device: str, manifest: Manifest | None = None, index_dir: str = "") -> Encoder:
    """The --model/--pooler encoder, else the model the index records (with its pooling)."""
    from diffcse.core.encoder import Encoder
    from diffcse.search.index import load_recorded_encoder

    if manifest is None:
        return Encoder.load(cfg.model, pooler=cfg.pooler, max_seq_length=cfg.max_seq_length, device=device,
                            backend=cfg.backend)
    if cfg.model is None and cfg.pooler is None and cfg.max_seq_length is None:
        return load_recorded_encoder(manifest, index_dir, device=device, backend=cfg.backend)
    recorded = manifest.model or {}
    return Encoder.load(
        cfg.model or recorded.get("name_or_path"),
        pooler=cfg.pooler or recorded.get("pooler"),
        max_seq_length=cfg.max_seq_length or recorded.get("max_seq_length"),
        device=device,
        backend=cfg.backend,
    )


def run_encode(cfg: EncodeConfig) -> int:
    """Entry point of `diffcse encode`: streams the file, refuses non-finite vectors, writes the array atomically."""
    import numpy as np

    from diffcse.core.io import atomic_path, iter_lines

    device = _setup(cfg)
    lines = list(iter_lines(cfg.input, "input file", cfg.encoding_errors))
    if not lines:
        raise InputError(f"input file {cfg.input} has no sentences")
    out = Path(cfg.output)
    if out.is_dir():
        raise InputError(f"--output {out} is a folder; name the .npy file to write")
    encoder = _load_encoder(cfg, device)
    n = len(lines)
    with atomic_path(out, suffix=".npy") as tmp:
        # Preallocated on disk and filled chunk by chunk, so memory stays bounded by one chunk.
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, encoder.dim))
        row = 0
        for chunk in encoder.iter_encode((line.text for line in lines), batch_size=cfg.batch_size, normalize=cfg.normalize,
                                         show_progress=sys.stderr.isatty()):
            finite = np.isfinite(chunk).all(axis=1)
            if not finite.all():
                bad = row + int(np.argmin(finite))
                raise InputError(
                    f"{cfg.input}:{lines[bad].lineno}: the model gives NaN or infinity for this sentence "
                    f"(are its weights finite?); {out} was not written"
                )
            array[row : row + len(chunk)] = chunk
            row += len(chunk)
        array.flush()
        del array
    print(f"wrote {n} x {encoder.dim} to {out}")
    return 0


def run_build(cfg: BuildConfig) -> int:
    """Entry point of `diffcse index build`."""
    from diffcse.search.index import DEFAULT_PARAMS, IVF_KINDS, SearchIndex, check_index_dir

    device = _setup(cfg)
    out = Path(cfg.index_dir)
    check_index_dir(out, must_exist=False)
    if (out / MANIFEST_NAME).exists() and not cfg.overwrite:
        raise InputError(f"{out} already holds an index: pass --overwrite to replace it, or use `diffcse index add`")
    params = cfg.params()
    t0 = time.perf_counter()
    train_texts = None
    expected = None
    if cfg.kind in IVF_KINDS and cfg.vectors is None:
        size = params.get("train_size") or DEFAULT_PARAMS[cfg.kind]["train_size"]
        expected, train_texts = _first_pass(cfg.input, cfg.encoding_errors, size, cfg.seed)
        if not expected:
            raise InputError(f"input file {cfg.input} has no texts")
    encoder = _load_encoder(cfg, device)
    if cfg.vectors is not None:
        index = _build_from_vectors(cfg, encoder, params)
    else:
        # tee: build() zips texts and metadata in lockstep, so the buffer between them stays one item.
        pairs_a, pairs_b = itertools.tee(iter_input(cfg.input, cfg.encoding_errors))
        index = SearchIndex.build(
            encoder, (t for t, _ in pairs_a), kind=cfg.kind, metadata=(m for _, m in pairs_b), params=params,
            chunk_size=cfg.chunk_size, batch_size=cfg.batch_size, train_texts=train_texts,
            expected_count=expected, seed=cfg.seed, show_progress=sys.stderr.isatty(),
        )
    if len(index) == 0:
        raise InputError(f"input file {cfg.input} has no texts")
    index.save(out)
    print(f"indexed {len(index)} texts ({cfg.kind}, dim {index.dim}) into {out} in {time.perf_counter() - t0:.1f}s")
    index.close()
    return 0


# Rows of a --vectors file re-encoded to check they come from the model given.
_VECTORS_CHECK_ROWS = 8


def _build_from_vectors(cfg: BuildConfig, encoder: Encoder, params: dict) -> SearchIndex:
    """`index build --vectors`: the .npy memory-mapped, checked against the texts and the model, added chunk by chunk."""
    import numpy as np

    from diffcse.search.index import IVF_KINDS, SearchIndex  # noqa: F811 - the runtime import of the annotation's class

    try:
        array = np.load(cfg.vectors, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise InputError(f"--vectors {cfg.vectors}: not a readable .npy file ({err})") from None
    if array.ndim != 2 or array.shape[1] != encoder.dim:
        raise InputError(f"--vectors {cfg.vectors} has shape {array.shape}; the model gives [n, {encoder.dim}]")
    n = sum(1 for _ in iter_input(cfg.input, cfg.encoding_errors))
    if n != len(array):
        raise InputError(f"--vectors {cfg.vectors} has {len(array)} rows but input file {cfg.input} has {n} texts")
    if n == 0:
        raise InputError(f"input file {cfg.input} has no texts")
    head = [t for t, _ in itertools.islice(iter_input(cfg.input, cfg.encoding_errors), _VECTORS_CHECK_ROWS)]
    mine = encoder.encode(head, normalize=True)
    given = np.asarray(array[: len(head)], dtype=np.float32)
    given = given / np.maximum(np.linalg.norm(given, axis=1, keepdims=True), 1e-12)
    cos = np.nan_to_num((mine * given).sum(axis=1), nan=-1.0)  # a NaN row is no match either
    if (cos < 0.999).any():
        bad = int(np.argmin(cos))
        raise InputError(
            f"--vectors {cfg.vectors} row {bad} has cosine {cos[bad]:.3f} with what {encoder.name_or_path} gives for "
            f"line {bad + 1} of {cfg.input}: the vectors come from another model or another file"
        )
    index = SearchIndex.create(encoder.dim, cfg.kind, params, encoder=encoder)
    if cfg.kind in IVF_KINDS:
        size = min(params.get("train_size") or index.manifest.params["train_size"], n)
        rows = np.sort(np.random.default_rng(cfg.seed).choice(n, size, replace=False))
        index.train_vectors(np.asarray(array[rows]), expected_count=n, seed=cfg.seed)
    stream = iter_input(cfg.input, cfg.encoding_errors)
    start = 0
    while chunk := list(itertools.islice(stream, cfg.chunk_size)):
        stop = start + len(chunk)
        index.add_vectors(np.asarray(array[start:stop]), [t for t, _ in chunk], [m for _, m in chunk])
        start = stop
    return index


def run_add(cfg: AddConfig) -> int:
    """Entry point of `diffcse index add`: as the index's one writer, stream the file in chunks, then save atomically."""
    from diffcse.core.io import check_input_file
    from diffcse.search.index import SearchIndex, check_index_dir
    from diffcse.search.manifest import read_manifest

    device = _setup(cfg)
    index_dir = check_index_dir(cfg.index_dir)
    check_input_file(cfg.input)
    t0 = time.perf_counter()
    encoder = _load_encoder(cfg, device, read_manifest(index_dir), cfg.index_dir)
    index = SearchIndex.load(index_dir, encoder=encoder)
    ids: list[int] = []
    try:
        # Locked from the first id to the save: ids continue from the index on disk (reloaded if
        # another writer saved meanwhile), and no other writer can save in between.
        with index.writer(timeout=cfg.lock_timeout, command=f"diffcse index add --input {cfg.input}"):
            stream = iter_input(cfg.input, cfg.encoding_errors)
            while chunk := list(itertools.islice(stream, cfg.chunk_size)):
                ids += index.add([t for t, _ in chunk], [m for _, m in chunk], batch_size=cfg.batch_size,
                                 chunk_size=cfg.chunk_size)
            if not ids:
                raise InputError(f"input file {cfg.input} has no texts")
        print(f"added {len(ids)} texts (ids {ids[0]}..{ids[-1]}) to {cfg.index_dir}: {len(index)} in all, "
              f"{time.perf_counter() - t0:.1f}s")
    finally:
        index.close()
    return 0


def run_upsert(cfg: UpsertConfig) -> int:
    """Entry point of `diffcse index upsert`: as the index's one writer, stream the documents in chunks, then save."""
    from diffcse.core.io import check_input_file
    from diffcse.search.index import SearchIndex, check_index_dir
    from diffcse.search.manifest import read_manifest

    device = _setup(cfg)
    index_dir = check_index_dir(cfg.index_dir)
    check_input_file(cfg.input)
    t0 = time.perf_counter()
    encoder = _load_encoder(cfg, device, read_manifest(index_dir), cfg.index_dir)
    index = SearchIndex.load(index_dir, encoder=encoder)
    n = added = replaced = 0
    try:
        with index.writer(timeout=cfg.lock_timeout, command=f"diffcse index upsert --input {cfg.input}"):
            stream = iter_documents(cfg.input, cfg.encoding_errors)
            # Chunk by chunk, in file order: an id repeated later in the file replaces its earlier line.
            while chunk := list(itertools.islice(stream, cfg.chunk_size)):
                res = index.upsert([d for d, _, _ in chunk], [t for _, t, _ in chunk], [m for _, _, m in chunk],
                                   batch_size=cfg.batch_size, chunk_size=cfg.chunk_size)
                n, added, replaced = n + len(chunk), added + res.added, replaced + res.replaced
            if not n:
                raise InputError(f"input file {cfg.input} has no documents")
        print(f"upserted {n} documents ({added} new, {replaced} replaced) into {cfg.index_dir}: {len(index)} in all, "
              f"{time.perf_counter() - t0:.1f}s")
    finally:
        index.close()
    return 0


def run_delete(cfg: DeleteConfig) -> int:
    """Entry point of `diffcse index delete`: as the index's one writer, on the index as it is on disk."""
    from diffcse.search.index import SearchIndex, check_index_dir

    _setup(cfg)
    index_dir = check_index_dir(cfg.index_dir)
    index = SearchIndex.load(index_dir)
    try:
        what = f"{len(cfg.ids)} ids, {len(cfg.doc_ids)} doc ids"
        with index.writer(timeout=cfg.lock_timeout, command=f"diffcse index delete ({what})"):
            n = index.delete(cfg.ids) if cfg.ids else 0
            m = index.delete_ids(cfg.doc_ids) if cfg.doc_ids else 0
        parts = [f"{n} of {len(set(cfg.ids))} ids"] if cfg.ids else []
        parts += [f"{m} of {len(set(cfg.doc_ids))} doc ids"] if cfg.doc_ids else []
        print(f"deleted {' and '.join(parts)}; {len(index)} left in {cfg.index_dir}")
    finally:
        index.close()
    return 0


def run_upgrade(cfg: UpgradeConfig) -> int:
    """Entry point of `diffcse index upgrade`: load (which upgrades in memory) and save as the one writer."""
    from diffcse.core import runtime
    from diffcse.search.index import SearchIndex, check_index_dir
    from diffcse.search.manifest import FORMAT_VERSION

    runtime.quiet_openmp()
    index_dir = check_index_dir(cfg.index_dir)
    index = SearchIndex.load(index_dir)
    try:
        with index.writer(timeout=cfg.lock_timeout, command="diffcse index upgrade"):
            before = index.manifest.format_version
        if before < FORMAT_VERSION:
            print(f"upgraded {cfg.index_dir} from format {before} to {FORMAT_VERSION} ({len(index)} texts)")
        else:
            print(f"{cfg.index_dir} is already format {FORMAT_VERSION}")
    finally:
        index.close()
    return 0


def run_info(cfg: InfoConfig) -> int:
    """Entry point of `diffcse index info`."""
    from diffcse.core import runtime
    from diffcse.search.index import SearchIndex

    runtime.quiet_openmp()
    index = SearchIndex.load(cfg.index_dir, verify=cfg.verify)
    print(json.dumps(index.stats(), indent=2))
    index.close()
    return 0


def run_search(cfg: SearchConfig) -> int:
    """Entry point of `diffcse search`: a table per query, or JSON with --json."""
    from diffcse.search.errors import EmptyQueryError
    from diffcse.search.index import SearchIndex
    from diffcse.search.manifest import read_manifest

    device = _setup(cfg)
    queries = list(cfg.query)
    if cfg.queries_file:
        queries += [t for t, _ in iter_input(cfg.queries_file)]
    if not queries:
        raise EmptyQueryError("no query given: pass --query TEXT (repeatable) or --queries-file")
    # BM25 alone needs no model: none is loaded for it.
    encoder = None if cfg.mode == "lexical" else _load_encoder(cfg, device, read_manifest(cfg.index_dir), cfg.index_dir)
    index = SearchIndex.load(cfg.index_dir, encoder=encoder, verify=cfg.verify)
    try:
        results = index.search(queries, top_k=cfg.top_k, threshold=cfg.threshold, nprobe=cfg.nprobe,
                               ef_search=cfg.ef_search, where=cfg.where, mode=cfg.mode)
    finally:
        index.close()
    if cfg.json:
        out = [{"query": q, "results": [h._asdict() for h in hits]} for q, hits in zip(queries, results, strict=True)]
        print(json.dumps(out, ensure_ascii=False, indent=2))
    else:
        for q, hits in zip(queries, results, strict=True):
            print(f"query: {q}")
            if not hits:
                print("   (no hits" + (f" with score >= {cfg.threshold})" if cfg.threshold is not None else ")"))
            for rank, h in enumerate(hits, start=1):
                meta = f"  {json.dumps(h.metadata, ensure_ascii=False)}" if h.metadata else ""
                doc = f" {h.doc_id}" if h.doc_id is not None else ""
                print(f"  {rank:>3}  {h.score:.4f}  [{h.id}{doc}]  {h.text}{meta}")
    return 0


def run_serve(cfg: ServeConfig) -> int:
    """Entry point of `diffcse serve`: one uvicorn worker (the index lives in its memory)."""
    import contextlib
    import os

    import uvicorn

    from diffcse.search.index import SearchIndex, check_index_dir
    from diffcse.search.manifest import read_manifest
    from diffcse.search.service import API_KEY_ENV, ServiceLimits, create_app, exposure_warnings

    if cfg.threads is None:
        cfg.threads = min(2, os.cpu_count() or 1)
    device = _setup(cfg)
    index_dir = check_index_dir(cfg.index_dir)
    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV)
    api_key = api_key if api_key and api_key.strip() else None
    encoder = _load_encoder(cfg, device, read_manifest(index_dir), cfg.index_dir)
    index = SearchIndex.load(index_dir, encoder=encoder)
    limits = ServiceLimits(max_batch=cfg.max_batch, max_text_chars=cfg.max_text_chars, max_top_k=cfg.max_top_k)
    try:
        app = create_app(index, limits=limits, persist=cfg.persist, api_key=api_key, host=cfg.host,
                         allowed_hosts=cfg.allowed_host, lock_timeout=cfg.lock_timeout)
        # --persist shutdown holds the writer lock for the server's life; taken here so that a held
        # lock is a one-line error, not a failed uvicorn startup (the app's lifespan re-enters it).
        holder = (index.writer(timeout=cfg.lock_timeout, command=f"diffcse serve on {cfg.host}:{cfg.port} --persist shutdown")
                  if cfg.persist == "shutdown" else contextlib.nullcontext())
        with holder:
            for warning in exposure_warnings(cfg.host, api_key):
                print(f"diffcse serve: warning: {warning}", file=sys.stderr, flush=True)
            writes = "writes need the API key" if api_key else "read-only: no API key"
            print(f"serving {cfg.index_dir} ({index.kind}, {len(index)} texts) on http://{cfg.host}:{cfg.port} "
                  f"({writes}; docs: /docs)", flush=True)
            uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, workers=1)
    finally:
        index.close()
    return 0


def run_mine(cfg: MineConfig) -> int:
    """Entry point of `diffcse mine`: search each anchor, keep the first candidate past the window and the margin."""
    from diffcse.search.index import SearchIndex, check_index_dir
    from diffcse.search.manifest import read_manifest
    from diffcse.search.mine import mine, read_pairs, stats_dict, write_triples

    device = _setup(cfg)
    pairs = read_pairs(cfg.pairs, cfg.encoding_errors)
    if cfg.index_dir is not None:
        check_index_dir(cfg.index_dir)
        encoder = _load_encoder(cfg, device, read_manifest(cfg.index_dir), cfg.index_dir)
        index = SearchIndex.load(cfg.index_dir, encoder=encoder)
    else:
        encoder = _load_encoder(cfg, device)
        texts = [t for t, _ in iter_input(cfg.corpus, cfg.encoding_errors)]
        if not texts:
            raise InputError(f"corpus {cfg.corpus} has no texts")
        index = SearchIndex.build(encoder, texts, batch_size=cfg.batch_size)
    rows, stats = mine(encoder, index, pairs, cfg.skip_top, cfg.depth, cfg.margin, cfg.batch_size)
    index.close()
    if not rows:
        raise InputError(f"no pair of {cfg.pairs} got a hard negative ({stats_dict(stats)}); "
                         "lower --skip-top, raise --depth or --margin")
    write_triples(cfg.output, rows)
    print(f"wrote {len(rows)} triples to {cfg.output}: " + ", ".join(f"{k} {v}" for k, v in stats_dict(stats).items()))
    return 0
