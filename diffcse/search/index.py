"""SearchIndex: a faiss index (cosine = inner product on L2-normalised vectors) plus a SQLite store.

Layout of an index directory (a crash at any point leaves the previous index usable, because
the manifest, written last by temp file + rename, is what names the live generation):

    idx/manifest.json              model, dim, metric, kind, params, count, files + checksums
    idx/gen-000003-1a2b3c4d/index.faiss
    idx/gen-000003-1a2b3c4d/store.sqlite   texts, metadata, document ids, tombstones, FTS5 index
    idx/.lock                      the writer lock (flock), naming the process that holds it

One writer per directory: every write to disk (save(), and writer() around a whole update) holds
the lock, and first catches up with what another process saved meanwhile, so no writer overwrites
another's rows and ids are always allocated from the state on disk. Readers take no lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import faiss
import numpy as np

from diffcse.core.io import fsync_dir, sha256_file, write_json_atomic
from diffcse.search.errors import (
    CorruptIndexError,
    EmptyQueryError,
    IndexConflictError,
    IndexMismatchError,
    SearchIndexError,
)
from diffcse.search.filters import Where, compile_where
from diffcse.search.manifest import (
    FORMAT_VERSION,
    GENERATION_RE,
    INDEX_FILE,
    KINDS,
    MANIFEST_NAME,
    STORE_FILE,
    Manifest,
    check_file,
    read_manifest,
)
from diffcse.search.rwlock import RWLock, index_lock
from diffcse.search.store import TextStore, fts_query
from diffcse.search.vectors import ExactVectors

if TYPE_CHECKING:
    from diffcse.core.encoder import Encoder

log = logging.getLogger(__name__)

IVF_KINDS = ("ivf", "ivfpq", "ivfsq8")
MODES = ("dense", "lexical", "hybrid")
DEFAULT_COMPACT_THRESHOLD = 0.2
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 80, "ef_search": 128, "compact_threshold": DEFAULT_COMPACT_THRESHOLD},
    "ivf": {"nlist": None, "nprobe": None, "train_size": 100_000},
    "ivfpq": {"nlist": None, "nprobe": None, "m": None, "nbits": 8, "train_size": 100_000, "rescore": 0},
    "ivfsq8": {"nlist": None, "nprobe": None, "train_size": 100_000, "rescore": 0},
}
DEFAULT_LOCK_TIMEOUT = 60.0
# Parameters that are fractions in [0, 1], not counts.
FRACTION_PARAMS = ("compact_threshold",)
# Counts for which 0 means off (rescore: re-score rescore * top_k candidates with the exact vectors).
ZERO_OK_PARAMS = ("rescore",)
DEFAULT_RRF_K = 60
# Hybrid search fuses each list down to this depth at least (top_k when larger).
DEFAULT_FUSION_DEPTH = 50
MAX_DOC_ID_CHARS = 256
# A reader whose generation a writer swept between manifest read and file open retries this often.
_OPEN_ATTEMPTS = 4
# Vectors read back per step when an HNSW graph is rebuilt without its tombstones.
_REBUILD_CHUNK = 65536
# A filter matching under 1/100 of an HNSW index is searched exactly over the graph's flat storage:
# the beam would have to cross ~ef/selectivity nodes to meet top_k matches in the graph.
_HNSW_EXACT_SHARE = 100
# Memory for the id arrays (and ID selectors) of recent filters (a 10% filter over 10^7 rows is 8 MB).
_FILTER_CACHE_BYTES = 64 << 20
# Estimated bytes per id of a faiss IDSelectorBatch (its hash set), for the cache's budget.
_BATCH_SELECTOR_BYTES_PER_ID = 48


class Allowed(NamedTuple):
    """The ids a filter lets through and the faiss ID selector over them (built once, reused while cached)."""

    ids: np.ndarray
    selector: faiss.IDSelector
    # The bitmap an IDSelectorBitmap reads (faiss keeps a pointer, not a copy); None for a batch selector.
    bitmap: np.ndarray | None
    nbytes: int


def id_selector(ids: np.ndarray) -> Allowed:
    """A faiss selector for sorted non-negative ids: a bitmap when it is small, else a hash set.

    Building an IDSelectorBatch hashes every id (0.4 s for 10^6 ids, at every call when not
    reused); a bitmap of the id range is built by numpy in milliseconds and tested with one shift.
    """
    top = int(ids[-1]) if len(ids) else 0
    bitmap_bytes = top // 8 + 1
    if (not len(ids) or ids[0] >= 0) and bitmap_bytes <= max(ids.nbytes, 1 << 22):
        bits = np.zeros(bitmap_bytes * 8, dtype=bool)
        bits[ids] = True
        bitmap = np.packbits(bits, bitorder="little")
        return Allowed(ids, faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap,
                       ids.nbytes + bitmap.nbytes)
    return Allowed(ids, faiss.IDSelectorBatch(ids), None, ids.nbytes * (1 + _BATCH_SELECTOR_BYTES_PER_ID // 8))


class SearchResult(NamedTuple):
    """One hit: the stored id and text, the score, the metadata given at add time, and the user's document id if any.

    The score is the cosine in mode 'dense', BM25 relevance (-bm25(), higher is better) in
    'lexical', and the reciprocal-rank-fusion score in 'hybrid'.
    """

    id: int
    text: str
    score: float
    metadata: dict | None
    doc_id: str | None = None


class UpsertResult(NamedTuple):
    """What an upsert did: the internal id now holding each given document id, and how many were new or replaced."""

    ids: list[int]
    added: int
    replaced: int


def resolve_params(kind: str, params: dict | None) -> dict[str, Any]:
    """The kind's defaults overlaid with params; unknown names are an error naming them."""
    if kind not in KINDS:
        raise SearchIndexError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    out = dict(DEFAULT_PARAMS[kind])
    for name, value in (params or {}).items():
        if name not in out:
            known = ", ".join(out) or "none"
            raise SearchIndexError(f"parameter {name!r} does not apply to kind {kind!r} (known: {known})")
        if name in FRACTION_PARAMS:
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1
            ):
                raise SearchIndexError(f"parameter {name!r} must be a number in [0, 1], got {value!r}")
            out[name] = DEFAULT_PARAMS[kind][name] if value is None else float(value)
            continue
        least = 0 if name in ZERO_OK_PARAMS else 1
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise SearchIndexError(
                f"parameter {name!r} must be a {'non-negative' if least == 0 else 'positive'} integer, got {value!r}"
            )
        out[name] = value
    return out


def reciprocal_rank_fusion(ranked: Sequence[Sequence[int]], k: float = DEFAULT_RRF_K) -> list[tuple[int, float]]:
    """Fuse ranked id lists (best first) by score = sum over lists of 1/(k + rank), rank from 1 (Cormack et al. 2009).

    Ties go to the id with the better single rank, then the smaller id, so the order is deterministic.
    """
    scores: dict[int, float] = {}
    best: dict[int, int] = {}
    for ids in ranked:
        for rank, doc in enumerate(ids, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
            best[doc] = min(best.get(doc, rank), rank)
    return sorted(scores.items(), key=lambda item: (-item[1], best[item[0]], item[0]))


def auto_nlist(n_expected: int, n_train: int) -> int:
    """Inverted lists: about 4*sqrt(N), but at most n_train/39 so k-means has enough points per list."""
    return max(1, min(int(round(4 * math.sqrt(max(n_expected, 1)))), n_train // 39))


def auto_pq_m(dim: int) -> int:
    """PQ sub-quantizers: the largest divisor of dim giving at least 4 dimensions each."""
    return max(m for m in range(1, max(dim // 4, 1) + 1) if dim % m == 0)


def _check_vectors(vectors: object, dim: int, what: str) -> np.ndarray:
    """A C-contiguous float32 [n, dim] copy, L2-normalised; errors name what and the bad row."""
    arr = np.asarray(vectors)
    if arr.ndim == 1 and what == "query":
        arr = arr[None, :]
    if arr.ndim != 2:
        raise SearchIndexError(f"{what} vectors must be a 2-D array [n, {dim}], got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise IndexMismatchError(f"{what} vectors have dimension {arr.shape[1]} but the index has dimension {dim}")
    if not np.issubdtype(arr.dtype, np.number):
        raise SearchIndexError(f"{what} vectors must be numeric, got dtype {arr.dtype}")
    arr = np.array(arr, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise SearchIndexError(f"{what} vector #{int(np.argmin(finite))} contains NaN or infinity")
    norms = np.linalg.norm(arr, axis=1)
    if (norms == 0).any():
        bad = int(np.argmin(norms))
        err = EmptyQueryError if what == "query" else SearchIndexError
        raise err(f"{what} vector #{bad} is all zeros: cosine similarity is undefined")
    faiss.normalize_L2(arr)
    return arr


def _check_texts(texts: Sequence[object], what: str) -> list[str]:
    """Texts as a list; a non-string or empty/whitespace-only entry is an error naming its position."""
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise SearchIndexError(f"{what} #{i} is {type(text).__name__}, not str")
        if not text.strip():
            err = EmptyQueryError if what == "query" else SearchIndexError
            raise err(f"{what} #{i} is empty")
    return out


def check_doc_ids(doc_ids: Sequence[object]) -> list[str]:
    """Document ids as a list of non-blank strings (at most MAX_DOC_ID_CHARS); errors name the position."""
    if isinstance(doc_ids, str):
        raise SearchIndexError("doc ids must be a list of strings, not one string")
    out = list(doc_ids)
    for i, doc in enumerate(out):
        if not isinstance(doc, str):
            raise SearchIndexError(f"doc id #{i} is {type(doc).__name__}, not str")
        if not doc.strip():
            raise SearchIndexError(f"doc id #{i} is empty")
        if len(doc) > MAX_DOC_ID_CHARS:
            raise SearchIndexError(f"doc id #{i} has {len(doc)} characters; at most {MAX_DOC_ID_CHARS}")
        try:
            doc.encode("utf-8")
        except UnicodeEncodeError:
            raise SearchIndexError(f"doc id #{i} is not valid Unicode (a lone surrogate)") from None
    return out


def _encode_metadata(metadata: Sequence[dict | None] | None, n: int) -> list[str | None]:
    """JSON-encode one metadata object (or None) per item; errors name the item."""
    if metadata is None:
        return [None] * n
    metadata = list(metadata)
    if len(metadata) != n:
        raise SearchIndexError(f"got {len(metadata)} metadata entries for {n} texts")
    out: list[str | None] = []
    for i, meta in enumerate(metadata):
        if meta is None:
            out.append(None)
            continue
        if not isinstance(meta, dict):
            raise SearchIndexError(f"metadata #{i} must be a JSON object (dict) or None, not {type(meta).__name__}")
        try:
            out.append(json.dumps(meta, allow_nan=False, ensure_ascii=False))
        except (TypeError, ValueError) as err:
            raise SearchIndexError(f"metadata #{i} is not JSON-serialisable: {err}") from None
    return out


def _check_mode(mode: object, threshold: object) -> None:
    """mode one of MODES; a (cosine) threshold is meaningless for BM25 alone."""
    if mode not in MODES:
        raise SearchIndexError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "lexical" and threshold is not None:
        raise SearchIndexError("threshold is a cosine similarity: it applies to modes 'dense' and 'hybrid', not 'lexical'")


def _fusion_depth(top_k: int, rrf_k: object, depth: object) -> int:
    """Check hybrid search's rrf_k and depth; the depth each list is fetched to."""
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, (int, float)) or not math.isfinite(rrf_k) or rrf_k < 0:
        raise SearchIndexError(f"rrf_k must be a finite number >= 0, got {rrf_k!r}")
    if depth is None:
        return max(top_k, DEFAULT_FUSION_DEPTH)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < top_k:
        raise SearchIndexError(f"depth must be an integer >= top_k ({top_k}), got {depth!r}")
    return depth


def _gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _model_info(encoder: Encoder) -> dict:
    """What the manifest records about an encoder, to reload it and to recognise it later."""
    name = str(encoder.name_or_path)
    if Path(name).exists():
        name = str(Path(name).resolve())
    module = getattr(encoder, "module", None)
    return {
        "name_or_path": name,
        "fingerprint": encoder.fingerprint,
        "dim": int(encoder.dim),
        "pooler": getattr(module, "pooler", None) if module is not None else "st",
        "max_seq_length": getattr(encoder, "max_seq_length", None),
    }


class EncodingWrites:
    """add() and upsert() of texts through the attached encoder, for an index with add_vectors/upsert_vectors.

    Shared by SearchIndex and the engine backend (diffcse.search.milvus.MilvusIndex).
    """

    def _check_new(self, texts: list[str], metas: list[dict | None]) -> None:
        """Refuse bad texts or metadata before any encoding (backends add their own limits)."""
        _encode_metadata(metas, len(texts))

    def add(
        self,
        texts: Sequence[str],
        metadata: Sequence[dict | None] | None = None,
        batch_size: int = 64,
        chunk_size: int = 8192,
    ) -> list[int]:
        """Encode texts with the attached encoder and add them; returns the new ids."""
        if isinstance(texts, str):
            raise SearchIndexError("add() takes a list of strings, not one string")
        texts = _check_texts(texts, "text")
        metas = list(metadata) if metadata is not None else [None] * len(texts)
        self._check_new(texts, metas)  # fail before any encoding
        ids: list[int] = []
        for start in range(0, len(texts), chunk_size):
            part = texts[start : start + chunk_size]
            vecs = self.encoder.encode(part, batch_size=batch_size, normalize=True)
            ids += self.add_vectors(vecs, part, metas[start : start + chunk_size])
        return ids

    def upsert(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        metadata: Sequence[dict | None] | None = None,
        batch_size: int = 64,
        chunk_size: int = 8192,
    ) -> UpsertResult:
        """Encode texts with the attached encoder and upsert them under the user's ids (see upsert_vectors)."""
        if isinstance(texts, str):
            raise SearchIndexError("upsert() takes a list of strings, not one string")
        doc_ids = check_doc_ids(ids)
        texts = _check_texts(texts, "text")
        if len(doc_ids) != len(texts):
            raise SearchIndexError(f"got {len(doc_ids)} doc ids for {len(texts)} texts")
        metas = list(metadata) if metadata is not None else [None] * len(texts)
        self._check_new(texts, metas)  # fail before any encoding
        # Repeats are settled before chunking, so a later chunk never replaces an earlier one.
        keep = sorted({doc: i for i, doc in enumerate(doc_ids)}.values())
        by_doc: dict[str, int] = {}
        added = replaced = 0
        for start in range(0, len(keep), chunk_size):
            rows = keep[start : start + chunk_size]
            part = [texts[i] for i in rows]
            vecs = self.encoder.encode(part, batch_size=batch_size, normalize=True)
            res = self.upsert_vectors([doc_ids[i] for i in rows], vecs, part, [metas[i] for i in rows])
            by_doc.update(zip((doc_ids[i] for i in rows), res.ids, strict=True))
            added, replaced = added + res.added, replaced + res.replaced
        return UpsertResult([by_doc[doc] for doc in doc_ids], added, replaced)


class SearchIndex(EncodingWrites):
    """Cosine-similarity search over texts: faiss vectors + SQLite texts/metadata + a manifest.

    Thread-safe: searches run in parallel (shared lock), add/delete are serialised (exclusive).
    """

    def __init__(
        self,
        manifest: Manifest,
        index: faiss.Index | None,
        store: TextStore,
        use_gpu: bool | None = None,
        vectors: ExactVectors | None = None,
    ) -> None:
        self._manifest = manifest
        self._vectors: ExactVectors | None = None
        self._index = index
        self._store = store
        self._lock = RWLock()
        self._save_lock = threading.Lock()
        self._encoder: Encoder | None = None
        self.path: Path | None = None
        # Changes in memory that are not on disk yet (add, delete, training, a new model record).
        self._dirty = False
        self._use_gpu = _gpu_available() if use_gpu is None else bool(use_gpu)
        if self._use_gpu and not _gpu_available():
            raise SearchIndexError("use_gpu=True but this faiss build has no GPU support or sees no GPU")
        self._gpu_index: faiss.Index | None = None
        self._gpu_dirty = True
        self._gpu_lock = threading.Lock()
        self._deleted_selector: faiss.IDSelector | None = None
        self._deleted_batch: faiss.IDSelector | None = None
        # Bumped by every change in memory: a compaction built outside the exclusive lock is only
        # swapped in if nothing changed meanwhile.
        self._version = 0
        self._upgrade_pending = False
        self._positions: tuple[int, np.ndarray] | None = None
        # Ids passing recent filters, valid while _version is _filter_version.
        self._filter_cache: OrderedDict[tuple[str, tuple], Allowed] = OrderedDict()
        self._filter_version = -1
        self._filter_lock = threading.Lock()
        self._adopt(manifest, index, store, vectors)

    def _adopt(
        self, manifest: Manifest, index: faiss.Index | None, store: TextStore, vectors: ExactVectors | None
    ) -> None:
        """Take a manifest, faiss index, store and exact vectors as the live state (the caller holds the write lock or owns self)."""
        if manifest.kind == "hnsw":
            # Indexes written before compaction existed record no threshold.
            manifest.params.setdefault("compact_threshold", DEFAULT_COMPACT_THRESHOLD)
        if manifest.params.get("rescore") and vectors is None:
            raise CorruptIndexError(f"a {manifest.kind} index that re-scores needs its exact vectors")
        if self._vectors is not None and self._vectors is not vectors:
            self._vectors.close()
        self._manifest, self._index, self._store, self._vectors = manifest, index, store, vectors
        # A format-1 index was upgraded in memory when it was opened; the next save writes format 2.
        self._upgrade_pending = manifest.format_version < FORMAT_VERSION
        self._set_tombstones(store.tombstones() if manifest.kind == "hnsw" else [])
        self._gpu_dirty = True
        self._version += 1

    # ----------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        dim: int,
        kind: str = "flat",
        params: dict | None = None,
        encoder: Encoder | None = None,
        use_gpu: bool | None = None,
    ) -> SearchIndex:
        """An empty index of the given kind and dimension (IVF kinds train on their first add)."""
        if not isinstance(dim, int) or dim < 1:
            raise SearchIndexError(f"dim must be a positive integer, got {dim!r}")
        resolved = resolve_params(kind, params)
        now = time.time()
        manifest = Manifest(
            dim=dim, kind=kind, params=resolved, created_at=now, updated_at=now,
            versions={"faiss": faiss.__version__, "diffcse": _diffcse_version()},
        )
        index = None if kind in IVF_KINDS else cls._new_faiss(kind, dim, resolved)
        vectors = ExactVectors(dim) if resolved.get("rescore") else None
        self = cls(manifest, index, TextStore(), use_gpu=use_gpu, vectors=vectors)
        if encoder is not None:
            self.attach_encoder(encoder)
        return self

    @staticmethod
    def _new_faiss(kind: str, dim: int, params: dict) -> faiss.Index:
        """A fresh faiss index with inner-product metric for every kind."""
        if kind == "flat":
            return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        if kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = params["ef_construction"]
            hnsw.hnsw.efSearch = params["ef_search"]
            return faiss.IndexIDMap(hnsw)
        quantizer = faiss.IndexFlatIP(dim)
        # The metric must be passed explicitly: IndexIVF* default to L2 even over an IP quantizer
        # (the bug in SimCSE's tool.py).
        if kind == "ivf":
            ivf = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        elif kind == "ivfsq8":
            ivf = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, params["nlist"], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            ivf = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = params["nprobe"]
        return ivf

    @classmethod
    def build(
        cls,
        encoder: Encoder,
        texts: Iterable[str],
        kind: str = "flat",
        metadata: Iterable[dict | None] | None = None,
        params: dict | None = None,
        chunk_size: int = 8192,
        batch_size: int = 64,
        train_texts: Sequence[str] | None = None,
        expected_count: int | None = None,
        seed: int = 0,
        use_gpu: bool | None = None,
        show_progress: bool = False,
    ) -> SearchIndex:
        """Encode texts chunk by chunk and add as it goes; memory is bounded by the chunk.

        IVF kinds train first, on train_texts if given, else on a random sample when texts is a
        sequence, else on the first train_size texts of the stream (buffered, then added).
        """
        self = cls.create(encoder.dim, kind, params, encoder=encoder, use_gpu=use_gpu)
        if isinstance(texts, str):
            raise SearchIndexError("texts must be a list or iterable of strings, not one string")
        if expected_count is None and isinstance(texts, Sequence):
            expected_count = len(texts)
        items: Iterator[tuple[str, dict | None]] = (
            zip(texts, metadata, strict=True) if metadata is not None else ((t, None) for t in texts)
        )
        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=expected_count, unit="sent", desc="indexing")
        pending: list[tuple[str, dict | None]] = []
        if kind in IVF_KINDS:
            train_size = self._manifest.params["train_size"]
            if train_texts is None and isinstance(texts, Sequence) and len(texts) > train_size:
                rng = random.Random(seed)
                picks = rng.sample(range(len(texts)), min(train_size, len(texts)))
                train_texts = [texts[i] for i in sorted(picks)]
            if train_texts is not None:
                sample = encoder.encode(_check_texts(train_texts, "training text"), batch_size=batch_size, normalize=True)
                self.train_vectors(sample, expected_count=expected_count, seed=seed)
            else:
                # A one-pass stream (or a list no longer than the sample): the first train_size
                # items are the sample, biased if the stream is sorted.
                pending = list(islice(items, train_size))
                if pending:
                    texts_p = _check_texts([t for t, _ in pending], "text")
                    vecs = encoder.encode(texts_p, batch_size=batch_size, normalize=True)
                    self.train_vectors(vecs, expected_count=expected_count or len(pending), seed=seed)
                    self.add_vectors(vecs, texts_p, [m for _, m in pending])
                    if progress is not None:
                        progress.update(len(pending))
        while True:
            chunk = list(islice(items, chunk_size))
            if not chunk:
                break
            self.add([t for t, _ in chunk], [m for _, m in chunk], batch_size=batch_size, chunk_size=chunk_size)
            if progress is not None:
                progress.update(len(chunk))
        if progress is not None:
            progress.close()
        return self

    # ----------------------------------------------------------------- persistence

    @classmethod
    def load(
        cls,
        path: str | Path,
        encoder: Encoder | str | None = None,
        verify: bool = True,
        use_gpu: bool | None = None,
    ) -> SearchIndex:
        """Open a saved index directory; encoder='auto' loads the recorded model; verify checks sha256s."""
        path = Path(path)
        manifest = read_manifest(path)
        if isinstance(encoder, str):
            if encoder != "auto":
                raise SearchIndexError(f"encoder must be an Encoder, None or 'auto', not {encoder!r}")
            encoder = load_recorded_encoder(manifest, str(path))
        manifest, index, store, vectors = _open_live(path, manifest, verify)
        if encoder is not None:
            try:
                _check_encoder(manifest, encoder, str(path))
            except SearchIndexError:
                _close(store, vectors)
                raise
        self = cls(manifest, index, store, use_gpu=use_gpu, vectors=vectors)
        self.path = path
        if encoder is not None:
            self._encoder = encoder
        return self

    def save(self, path: str | Path | None = None, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> Path:
        """Write the index to a directory atomically (new generation, then the manifest by rename).

        Holds the directory's writer lock (waiting up to lock_timeout seconds). Saving back to the
        directory this index was loaded from, after another process saved there: with no unsaved
        changes the index first reloads what is on disk; with some, IndexConflictError (they would
        overwrite the other writer's rows). Use writer() to make changes that cannot conflict.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            raise SearchIndexError("save() needs a path: this index was never saved or loaded")
        target.mkdir(parents=True, exist_ok=True)
        with index_lock(target, lock_timeout):
            self._catch_up(target)
            self._write(target)
        return target

    @contextlib.contextmanager
    def writer(self, timeout: float | None = DEFAULT_LOCK_TIMEOUT, command: str | None = None) -> Iterator[SearchIndex]:
        """Be the one writer of this index's directory for the block; changes made in it are saved at its end.

        Takes the directory's writer lock (waiting up to timeout seconds, then IndexLockedError naming
        the holder), reloads the index if another process saved since it was loaded, so new ids
        continue from the state on disk, yields, and saves if anything changed. If the block
        raises, its changes are dropped (the index reloads from disk) and nothing is written.
        command describes this writer to a waiting one (it is written into the lock file).
        """
        if self.path is None:
            raise SearchIndexError("writer() needs an index loaded from or saved to a directory: call save(path) first")
        path = self.path
        with index_lock(path, timeout, command):
            self._catch_up(path)
            try:
                yield self
            except BaseException:
                if self._dirty:
                    self._discard_changes()
                raise
            # A format-1 index opened for writing is written as format 2 even if nothing else changed.
            if self._dirty or self._upgrade_pending:
                self._write(path)

    def _catch_up(self, target: Path) -> None:
        """Under the writer lock: adopt what another process saved to target since we loaded, or refuse."""
        if self.path is None or not _same_dir(target, self.path):
            return  # a copy or replacement elsewhere, not an update of what we loaded
        try:
            on_disk = read_manifest(target).generation
        except FileNotFoundError:
            return  # nothing on disk to keep
        if on_disk == self._manifest.generation:
            return
        if self._dirty:
            raise IndexConflictError(
                f"index {target} was saved by another process ({on_disk}) after this copy was loaded "
                f"({self._manifest.generation or 'never saved'}); its unsaved changes were not written so as not to "
                "erase the other writer's: load the index again and redo them, or change it inside SearchIndex.writer()"
            )
        self.reload()

    def reload(self) -> None:
        """Replace the in-memory index by the one on disk (the attached encoder stays; unsaved changes are lost)."""
        if self.path is None:
            raise SearchIndexError("reload() needs an index loaded from or saved to a directory")
        manifest, index, store, vectors = _open_live(self.path, read_manifest(self.path), verify=True)
        try:
            if self._encoder is not None:
                _check_encoder(manifest, self._encoder, str(self.path))
        except SearchIndexError:
            _close(store, vectors)
            raise
        with self._lock.write():
            old = self._store
            self._adopt(manifest, index, store, vectors)
            self._dirty = False
        old.close()

    def _discard_changes(self) -> None:
        """After a failed update: make memory mirror the disk again (best effort)."""
        try:
            self.reload()
        except Exception as err:  # noqa: BLE001 - the caller's error matters more
            log.warning("could not reload %s after a failed update: %s", self.path, err)

    def _write(self, target: Path) -> None:
        """Write a new generation into target and publish it; the caller holds target's writer lock."""
        with self._save_lock:
            self._maybe_compact()
            # Readers may keep searching while we write; only writers (add/delete) must wait.
            with self._lock.read():
                self._write_generation(target)
            if self._vectors is not None:
                # Searches may be reading the old file under the read lock: swap it under the write lock.
                entry = self._manifest.files["vectors"]
                with self._lock.write():
                    self._vectors.adopt(target / self._manifest.generation / entry["name"], entry["rows"])

    def _write_generation(self, target: Path) -> None:
        """The files of a new generation, then the manifest naming it; under the read lock and the save lock."""
        ntotal = int(self._index.ntotal) if self._index is not None else 0
        if ntotal != self._manifest.ntotal or self._store.count() != self._manifest.count:
            # Only a failed faiss step that could not be undone leaves memory like this: never
            # publish it (the previous generation stays the live one).
            raise CorruptIndexError(
                f"not saved: faiss holds {ntotal} vectors and the store {self._store.count()} rows, but the index "
                f"expects {self._manifest.ntotal} and {self._manifest.count}; reload it"
            )
        previous = _generation_number(target)
        staging = target / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            index_file = staging / INDEX_FILE
            if self._index is not None:
                faiss.write_index(self._index, str(index_file))
            else:
                index_file.write_bytes(b"")
            with open(index_file, "rb+") as fh:
                os.fsync(fh.fileno())
            self._store.backup_to(staging / STORE_FILE)
            files = {
                key: {"name": name, "bytes": (staging / name).stat().st_size, "sha256": sha256_file(staging / name)}
                for key, name in (("index", INDEX_FILE), ("store", STORE_FILE))
            }
            if self._vectors is not None:
                # No sha256: hashing 15 GB at every save would cost more than the save; size and rows are checked.
                same = self.path is not None and _same_dir(target, self.path)
                files["vectors"] = self._vectors.write(staging, link=same)
            fsync_dir(staging)
            generation = f"gen-{previous + 1:06d}-{uuid.uuid4().hex[:8]}"
            os.replace(staging, target / generation)
            fsync_dir(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        manifest = Manifest(**{
            **self._manifest.to_dict(), "generation": generation, "files": files, "updated_at": time.time(),
            "format_version": FORMAT_VERSION,
        })
        write_json_atomic(target / MANIFEST_NAME, manifest.to_dict())
        self._manifest = manifest
        self.path = target
        self._dirty = False
        self._upgrade_pending = False
        _remove_stale(target, keep=generation)

    # ----------------------------------------------------------------- encoder

    def attach_encoder(self, encoder: Encoder) -> None:
        """Use encoder for text queries/adds; refuses one of another model or dimension."""
        if self._manifest.model is None:
            if encoder.dim != self._manifest.dim:
                raise IndexMismatchError(
                    f"encoder {encoder.name_or_path} gives dimension {encoder.dim} but the index has dimension {self._manifest.dim}"
                )
            self._manifest.model = _model_info(encoder)
            self._dirty = True
        else:
            _check_encoder(self._manifest, encoder, str(self.path or "this index"))
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        """The attached encoder; an error if the index was opened without one."""
        if self._encoder is None:
            raise SearchIndexError(
                "this index has no encoder: pass encoder= to SearchIndex.load()/build(), or call attach_encoder()"
            )
        return self._encoder

    # ----------------------------------------------------------------- writes

    @property
    def is_trained(self) -> bool:
        """Whether vectors can be added (IVF kinds need training first)."""
        return self._index is not None and bool(self._index.is_trained)

    def train_vectors(self, vectors: np.ndarray, expected_count: int | None = None, seed: int = 0) -> None:
        """Train an IVF kind on a sample (at most train_size rows are used); no-op for others."""
        self._train(vectors, expected_count, seed, strict=True)

    def _train(self, vectors: np.ndarray, expected_count: int | None, seed: int, strict: bool) -> None:
        """Train under the writer lock; strict=False lets a concurrent first add win the race quietly."""
        if self._manifest.kind not in IVF_KINDS:
            return
        with self._lock.write():
            if self.is_trained:
                if strict:
                    raise SearchIndexError("the index is already trained")
                return
            sample = _check_vectors(vectors, self._manifest.dim, "training")
            params = self._manifest.params
            if len(sample) > params["train_size"]:
                rows = np.random.default_rng(seed).choice(len(sample), params["train_size"], replace=False)
                sample = sample[np.sort(rows)]
            n = len(sample)
            if n == 0:
                raise SearchIndexError("cannot train an IVF index on zero vectors")
            resolved = dict(params)
            resolved["nlist"] = params["nlist"] or auto_nlist(expected_count or n, n)
            if resolved["nlist"] > n:
                raise SearchIndexError(f"nlist={resolved['nlist']} needs at least that many training vectors, got {n}")
            # nlist/16 lists: recall@10 ~0.95-0.97 on MiniLM vectors in bench_search (nlist/32: ~0.92).
            resolved["nprobe"] = params["nprobe"] or min(resolved["nlist"], max(16, resolved["nlist"] // 16))
            if self._manifest.kind == "ivfpq":
                resolved["m"] = params["m"] or auto_pq_m(self._manifest.dim)
                if self._manifest.dim % resolved["m"]:
                    raise SearchIndexError(f"ivfpq parameter m={resolved['m']} must divide the dimension {self._manifest.dim}")
                if n < 2 ** resolved["nbits"]:
                    raise SearchIndexError(
                        f"ivfpq with nbits={resolved['nbits']} needs at least {2 ** resolved['nbits']} training vectors, "
                        f"got {n}: add more at once, lower nbits, or use kind 'ivf' or 'flat'"
                    )
            index = self._new_faiss(self._manifest.kind, self._manifest.dim, resolved)
            if self._use_gpu:
                _gpu_clustering(index)
            index.train(sample)
            self._index = index
            self._manifest.params = resolved
            self._gpu_dirty = True
            self._dirty = True

    def add_vectors(
        self,
        vectors: np.ndarray,
        texts: Sequence[str],
        metadata: Sequence[dict | None] | None = None,
    ) -> list[int]:
        """Add vectors with their texts (and optional metadata dicts); returns the new ids."""
        texts = _check_texts(texts, "text")
        vecs = _check_vectors(vectors, self._manifest.dim, "added")
        if len(vecs) != len(texts):
            raise SearchIndexError(f"got {len(vecs)} vectors for {len(texts)} texts")
        metas = _encode_metadata(metadata, len(texts))
        if not texts:
            return []
        if not self.is_trained:
            self._train(vecs, None, 0, strict=False)
        with self._lock.write():
            return self._apply([], vecs, texts, metas, None)

    def upsert_vectors(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str],
        metadata: Sequence[dict | None] | None = None,
    ) -> UpsertResult:
        """Insert or replace documents by the user's ids: an existing id's text, vector and metadata are replaced.

        A repeated id counts once, with its last text (as if the upserts ran one after another).
        """
        doc_ids = check_doc_ids(ids)
        texts = _check_texts(texts, "text")
        vecs = _check_vectors(vectors, self._manifest.dim, "added")
        if len(doc_ids) != len(texts):
            raise SearchIndexError(f"got {len(doc_ids)} doc ids for {len(texts)} texts")
        if len(vecs) != len(texts):
            raise SearchIndexError(f"got {len(vecs)} vectors for {len(texts)} texts")
        metas = _encode_metadata(metadata, len(texts))
        if not texts:
            return UpsertResult([], 0, 0)
        keep = sorted({doc: i for i, doc in enumerate(doc_ids)}.values())
        if not self.is_trained:
            self._train(vecs, None, 0, strict=False)
        with self._lock.write():
            old = self._store.ids_for_docs(doc_ids[i] for i in keep)
            new = self._apply(
                list(old.values()), vecs[keep], [texts[i] for i in keep], [metas[i] for i in keep], [doc_ids[i] for i in keep]
            )
        by_doc = dict(zip((doc_ids[i] for i in keep), new, strict=True))
        return UpsertResult([by_doc[doc] for doc in doc_ids], len(keep) - len(old), len(old))

    def delete(self, ids: Iterable[int]) -> int:
        """Remove items by id; returns how many existed. Unknown ids are ignored."""
        wanted = [int(i) for i in ids]
        with self._lock.write():
            present = list(dict.fromkeys(self._store.existing(wanted)))
            if present:
                self._apply(present, None, [], [], None)
            return len(present)

    def delete_ids(self, ids: Sequence[str]) -> int:
        """Remove documents by the user's ids; returns how many existed. Unknown ids are ignored."""
        doc_ids = check_doc_ids(ids)
        with self._lock.write():
            found = self._store.ids_for_docs(doc_ids)
            if found:
                self._apply(sorted(found.values()), None, [], [], None)
            return len(found)

    def _apply(
        self,
        remove: list[int],
        vecs: np.ndarray | None,
        texts: Sequence[str],
        metas: Sequence[str | None],
        doc_ids: Sequence[str | None] | None,
    ) -> list[int]:
        """Under the write lock: remove ids and add rows, in the store and in faiss together; returns the new ids.

        The store changes in one transaction, rolled back if faiss fails; faiss is changed after the
        store (adds first, then removals), and an add is undone if the removal after it fails.
        """
        hnsw = self._manifest.kind == "hnsw"
        start = self._manifest.next_id
        new_ids = np.arange(start, start + len(texts), dtype=np.int64)
        added = False
        try:
            if remove:
                self._store.delete(remove, tombstone=hnsw)
            if len(texts):
                self._store.add(new_ids.tolist(), texts, metas, doc_ids)
                self._index.add_with_ids(vecs, new_ids)
                added = True
                if self._vectors is not None:
                    self._vectors.append(start, vecs)
            if remove and not hnsw:
                removed = self._index.remove_ids(np.asarray(remove, dtype=np.int64))
                if removed != len(remove):
                    raise CorruptIndexError(f"faiss removed {removed} of {len(remove)} ids present in the store")
        except BaseException:
            self._store.rollback()
            if self._vectors is not None:
                self._vectors.truncate(start)
            if added and not hnsw:
                try:
                    self._index.remove_ids(new_ids)
                except Exception as err:  # noqa: BLE001 - the first error is the one to report
                    # faiss now holds vectors the store does not: save() refuses (ntotal check).
                    log.error("could not undo a partial faiss update (%s); reload the index", err)
            raise
        self._store.commit()
        if hnsw and remove:
            self._set_tombstones(self._store.tombstones())
        self._manifest.next_id = start + len(texts)
        self._manifest.count += len(texts) - len(remove)
        self._manifest.ntotal = int(self._index.ntotal)
        self._gpu_dirty = True
        self._dirty = True
        self._version += 1
        return new_ids.tolist()

    def _set_tombstones(self, ids: list[int]) -> None:
        """HNSW cannot remove vectors: deleted ids are filtered inside the search instead."""
        if not ids:
            self._deleted_batch = self._deleted_selector = None
            return
        self._deleted_batch = faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64))
        self._deleted_selector = faiss.IDSelectorNot(self._deleted_batch)

    def compact(self) -> int:
        """HNSW: rebuild the graph from the live vectors now, dropping every tombstone; returns how many were dropped.

        Other kinds remove vectors on delete and have nothing to compact (0). save() compacts by
        itself when tombstones pass the index's compact_threshold share of the graph.
        """
        if self._manifest.kind != "hnsw" or self._index is None:
            return 0
        with self._lock.write():
            if self._manifest.ntotal == self._manifest.count:
                return 0
            fresh, dropped = self._rebuild_hnsw()
            self._swap_compacted(fresh, dropped)
            return len(dropped)

    def _maybe_compact(self) -> None:
        """Before a save: rebuild an HNSW graph whose tombstones pass compact_threshold of its vectors."""
        if self._manifest.kind != "hnsw" or self._index is None:
            return
        # Built under the shared lock, so searches go on; writers wait, and swapped in only if
        # nothing changed between the two locks (else the next save compacts).
        with self._lock.read():
            m = self._manifest
            dead = m.ntotal - m.count
            if dead <= 0 or dead / m.ntotal <= m.params.get("compact_threshold", DEFAULT_COMPACT_THRESHOLD):
                return
            version = self._version
            fresh, dropped = self._rebuild_hnsw()
        with self._lock.write():
            if self._version != version:
                log.info("index changed during HNSW compaction; compacting at the next save instead")
                return
            self._swap_compacted(fresh, dropped)
        log.info("compacted the HNSW graph: dropped %d deleted vectors, %d left", len(dropped), fresh.ntotal)

    def _rebuild_hnsw(self) -> tuple[faiss.Index, list[int]]:
        """A new HNSW index of the live vectors, read back from the current one (IndexHNSWFlat keeps them exactly)."""
        old = self._index
        inner = faiss.downcast_index(old.index)
        ids = faiss.vector_to_array(old.id_map).astype(np.int64)
        dead = np.asarray(self._store.tombstones(), dtype=np.int64)
        keep = ~np.isin(ids, dead)
        fresh = self._new_faiss("hnsw", self._manifest.dim, self._manifest.params)
        for start in range(0, len(ids), _REBUILD_CHUNK):
            stop = min(start + _REBUILD_CHUNK, len(ids))
            mask = keep[start:stop]
            if mask.any():
                fresh.add_with_ids(inner.reconstruct_n(start, stop - start)[mask], ids[start:stop][mask])
        if fresh.ntotal != self._manifest.count:
            raise CorruptIndexError(
                f"HNSW rebuild kept {fresh.ntotal} vectors but the store has {self._manifest.count} live rows"
            )
        return fresh, dead.tolist()

    def _swap_compacted(self, fresh: faiss.Index, dropped: list[int]) -> None:
        """Under the write lock: make the rebuilt graph live and forget its tombstones."""
        try:
            self._store.clear_tombstones(dropped)
        except BaseException:
            self._store.rollback()
            raise
        self._store.commit()
        self._index = fresh
        self._set_tombstones([])
        self._manifest.ntotal = int(fresh.ntotal)
        self._gpu_dirty = True
        self._dirty = True
        self._version += 1


    # ----------------------------------------------------------------- reads

    @overload
    def search(self, queries: str, top_k: int = ..., threshold: float | None = ..., nprobe: int | None = ...,
               ef_search: int | None = ..., where: dict | None = ..., mode: str = ..., rrf_k: float = ...,
               depth: int | None = ...) -> list[SearchResult]: ...
    @overload
    def search(self, queries: Sequence[str], top_k: int = ..., threshold: float | None = ..., nprobe: int | None = ...,
               ef_search: int | None = ..., where: dict | None = ..., mode: str = ..., rrf_k: float = ...,
               depth: int | None = ...) -> list[list[SearchResult]]: ...

    def search(
        self,
        queries: str | Sequence[str],
        top_k: int = 10,
        threshold: float | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        where: dict | None = None,
        mode: str = "dense",
        rrf_k: float = DEFAULT_RRF_K,
        depth: int | None = None,
    ) -> list[SearchResult] | list[list[SearchResult]]:
        """Top-k stored texts per query among those whose metadata passes `where`; one query -> one list.

        mode 'dense': by cosine (score >= threshold); 'lexical': by BM25 over the texts; 'hybrid':
        reciprocal rank fusion of both lists, each fetched to `depth` (default max(top_k, 50)).
        """
        single = isinstance(queries, str)
        batch = _check_texts([queries] if single else list(queries), "query")
        if not batch:
            raise EmptyQueryError("no queries given")
        self._check_search_args(top_k, threshold)
        _check_mode(mode, threshold)
        # Bad arguments fail before any encoding.
        compile_where(where)
        if mode == "hybrid":
            _fusion_depth(top_k, rrf_k, depth)
        if mode == "lexical":
            results = self.search_lexical(batch, top_k=top_k, where=where)
        else:
            vecs = self.encoder.encode(batch, normalize=True)
            if mode == "dense":
                results = self.search_vectors(vecs, top_k=top_k, threshold=threshold, nprobe=nprobe,
                                              ef_search=ef_search, where=where)
            else:
                results = self.search_hybrid(vecs, batch, top_k=top_k, threshold=threshold, nprobe=nprobe,
                                             ef_search=ef_search, where=where, rrf_k=rrf_k, depth=depth)
        return results[0] if single else results

    def search_vectors(
        self,
        queries: np.ndarray,
        top_k: int = 10,
        threshold: float | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        where: dict | None = None,
    ) -> list[list[SearchResult]]:
        """Top-k hits per query vector (normalised here), scores descending, each >= threshold, metadata passing `where`."""
        q = _check_vectors(queries, self._manifest.dim, "query")
        if len(q) == 0:
            raise EmptyQueryError("no query vectors given")
        self._check_search_args(top_k, threshold)
        compiled = compile_where(where)
        with self._lock.read():
            scores, labels = self._dense(q, top_k, nprobe, ef_search, self._allowed(compiled))
            found = labels[labels >= 0]
            rows = self._store.rows(found.tolist()) if found.size else {}
        out: list[list[SearchResult]] = []
        for drow, lrow in zip(scores, labels, strict=True):
            hits: list[SearchResult] = []
            for score, label in zip(drow.tolist(), lrow.tolist(), strict=True):
                # faiss pads with -1 when fewer than k hits exist (small nprobe, tiny index):
                # SimCSE's tool.py indexes sentences[-1] with it.
                if label < 0 or (threshold is not None and score < threshold):
                    continue
                row = rows.get(label)
                if row is not None:
                    hits.append(SearchResult(int(label), row[0], float(score), row[1], row[2]))
            out.append(hits)
        return out

    @overload
    def search_lexical(self, queries: str, top_k: int = ..., where: dict | None = ...) -> list[SearchResult]: ...
    @overload
    def search_lexical(self, queries: Sequence[str], top_k: int = ..., where: dict | None = ...) -> list[list[SearchResult]]: ...

    def search_lexical(
        self,
        queries: str | Sequence[str],
        top_k: int = 10,
        where: dict | None = None,
    ) -> list[SearchResult] | list[list[SearchResult]]:
        """Top-k stored texts per query by BM25 (SQLite FTS5) over their words; needs no encoder.

        Each word of a query is searched for as a quoted term (any word may match): FTS5 operators
        in a query are plain words. A query without words finds nothing.
        """
        single = isinstance(queries, str)
        batch = _check_texts([queries] if single else list(queries), "query")
        if not batch:
            raise EmptyQueryError("no queries given")
        self._check_search_args(top_k, None)
        compiled = compile_where(where)
        with self._lock.read():
            ranked = [self._lexical(text, top_k, compiled) for text in batch]
            rows = self._store.rows(i for hits in ranked for i, _ in hits)
        out = [
            [SearchResult(i, rows[i][0], score, rows[i][1], rows[i][2]) for i, score in hits if i in rows]
            for hits in ranked
        ]
        return out[0] if single else out

    def search_hybrid(
        self,
        query_vectors: np.ndarray,
        query_texts: Sequence[str],
        top_k: int = 10,
        threshold: float | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        where: dict | None = None,
        rrf_k: float = DEFAULT_RRF_K,
        depth: int | None = None,
    ) -> list[list[SearchResult]]:
        """Reciprocal rank fusion of the dense and the BM25 ranking of each query (its vector and its text).

        Both lists are fetched to `depth` (default max(top_k, 50)) among the documents passing
        `where`; dense hits below `threshold` (cosine) are left out before fusing. The score is
        sum over the lists of 1/(rrf_k + rank).
        """
        texts = _check_texts(list(query_texts), "query")
        q = _check_vectors(query_vectors, self._manifest.dim, "query")
        if len(q) == 0 or not texts:
            raise EmptyQueryError("no queries given")
        if len(q) != len(texts):
            raise SearchIndexError(f"got {len(q)} query vectors for {len(texts)} query texts")
        self._check_search_args(top_k, threshold)
        depth = _fusion_depth(top_k, rrf_k, depth)
        compiled = compile_where(where)
        with self._lock.read():
            scores, labels = self._dense(q, depth, nprobe, ef_search, self._allowed(compiled))
            fused: list[list[tuple[int, float]]] = []
            for text, drow, lrow in zip(texts, scores.tolist(), labels.tolist(), strict=True):
                dense = [label for score, label in zip(drow, lrow, strict=True)
                         if label >= 0 and (threshold is None or score >= threshold)]
                lexical = [i for i, _ in self._lexical(text, depth, compiled)]
                fused.append(reciprocal_rank_fusion([dense, lexical], rrf_k)[:top_k])
            rows = self._store.rows(i for hits in fused for i, _ in hits)
        return [
            [SearchResult(i, rows[i][0], score, rows[i][1], rows[i][2]) for i, score in hits if i in rows]
            for hits in fused
        ]

    @staticmethod
    def _check_search_args(top_k: object, threshold: object) -> None:
        """top_k a positive int, threshold None or a finite number."""
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise SearchIndexError(f"top_k must be a positive integer, got {top_k!r}")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
        ):
            raise SearchIndexError(f"threshold must be a finite number or None, got {threshold!r}")

    def _allowed(self, where: Where | None) -> Allowed | None:
        """Under the read lock: the ids passing the filter (None: no filter), from the cache while nothing changed.

        Evaluating a filter scans every row's metadata in SQLite (seconds at 10^7 rows); a server
        sees the same few filters again and again, so their id arrays and selectors are kept until
        the next write.
        """
        if where is None:
            return None
        key = (where.sql, where.params)
        with self._filter_lock:
            if self._filter_version != self._version:
                self._filter_cache.clear()
                self._filter_version = self._version
            hit = self._filter_cache.get(key)
            if hit is not None:
                self._filter_cache.move_to_end(key)
                return hit
        ids = self._store.filter_ids(where)
        ids.flags.writeable = False
        allowed = id_selector(ids)
        with self._filter_lock:
            if self._filter_version == self._version and allowed.nbytes <= _FILTER_CACHE_BYTES:
                self._filter_cache[key] = allowed
                while sum(a.nbytes for a in self._filter_cache.values()) > _FILTER_CACHE_BYTES:
                    self._filter_cache.popitem(last=False)
        return allowed

    def _lexical(self, text: str, limit: int, where: Where | None) -> list[tuple[int, float]]:
        """Under the read lock: BM25's top `limit` (id, score) for one query text."""
        match = fts_query(text)
        return self._store.lexical(match, limit, where) if match is not None else []

    def _dense(
        self, q: np.ndarray, top_k: int, nprobe: int | None, ef_search: int | None, allowed: Allowed | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Under the read lock: the top_k by cosine; an index that re-scores fetches rescore * top_k candidates first.

        The compressed codes (PQ, int8) only rank candidates; their exact vectors, read from
        disk, give the order and the scores returned.
        """
        factor = int(self._manifest.params.get("rescore") or 0)
        if not factor or self._vectors is None:
            return self._approximate(q, top_k, nprobe, ef_search, allowed)
        _, labels = self._approximate(q, top_k * factor, nprobe, ef_search, allowed)
        found = np.unique(labels[labels >= 0])
        rows = self._vectors.read(found)
        exact = np.full(labels.shape, -np.inf, dtype=np.float32)
        for i, row in enumerate(labels):
            hit = row >= 0
            exact[i, hit] = rows[np.searchsorted(found, row[hit])] @ q[i]
        order = np.argsort(-exact, axis=1, kind="stable")[:, :top_k]
        scores = np.take_along_axis(exact, order, axis=1)
        return scores, np.where(np.isfinite(scores), np.take_along_axis(labels, order, axis=1), -1)

    def _approximate(
        self, q: np.ndarray, top_k: int, nprobe: int | None, ef_search: int | None, allowed: Allowed | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Under the read lock: faiss search, restricted to the `allowed` ids inside faiss when given.

        A filter is an ID selector applied during the search, so top_k is filled from the matching
        vectors. The approximate kinds only look at part of the index (nprobe lists, an ef-wide
        beam), where fewer than top_k matches may lie: for the queries left short, the search is
        widened (nprobe, ef doubled) until they are full or it covers the whole index.
        """
        n = len(q)
        pool = int(self._index.ntotal) if self._index is not None else 0
        if allowed is not None:
            pool = min(pool, len(allowed.ids))
        if pool == 0:
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        k = min(top_k, pool)
        kind = self._manifest.kind
        params = self._manifest.params
        probe = min(int(nprobe or params["nprobe"]), params["nlist"]) if kind in IVF_KINDS else 0
        ef = max(int(ef_search or params["ef_search"]), k) if kind == "hnsw" else 0
        if kind == "hnsw" and allowed is not None and len(allowed.ids) * _HNSW_EXACT_SHARE < self._index.ntotal:
            exact = self._hnsw_exact(q, k, allowed.ids)
            if exact is not None:
                return exact
        sel = allowed.selector if allowed is not None else None
        scores, labels = self._faiss_search(q, k, probe, ef, sel)
        if sel is None or kind == "flat":
            return scores, labels
        widest = params["nlist"] if kind in IVF_KINDS else max(ef, int(self._index.ntotal))
        while True:
            short = np.flatnonzero((labels >= 0).sum(axis=1) < k)
            reach = probe if kind in IVF_KINDS else ef
            if not short.size or reach >= widest:
                return scores, labels
            if kind in IVF_KINDS:
                probe = min(probe * 2, widest)
            else:
                ef = min(ef * 2, widest)
            scores[short], labels[short] = self._faiss_search(q[short], k, probe, ef, sel)

    def _hnsw_exact(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Under the read lock: exact top-k among a few allowed ids, from the flat storage behind the HNSW graph.

        None when the ids cannot be placed in the storage (not in increasing order): the graph is searched instead.
        """
        version = self._version
        cached = self._positions
        if cached is None or cached[0] != version:
            # IDMap's ids by storage position; ids are added in increasing order (and a compaction
            # keeps that order), so a position is found by binary search.
            cached = (version, faiss.vector_to_array(self._index.id_map).astype(np.int64))
            self._positions = cached
        ids = cached[1]
        pos = np.searchsorted(ids, allowed)
        if (pos >= len(ids)).any() or (ids[np.minimum(pos, len(ids) - 1)] != allowed).any():
            return None
        storage = faiss.downcast_index(faiss.downcast_index(self._index.index).storage)
        sel = faiss.IDSelectorBatch(pos.astype(np.int64))
        scores, labels = storage.search(q, k, params=faiss.SearchParameters(sel=sel))
        return scores, np.where(labels >= 0, ids[np.maximum(labels, 0)], -1)

    def _faiss_search(
        self, q: np.ndarray, k: int, probe: int, ef: int, sel: faiss.IDSelector | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One faiss search with per-call parameters (no shared state mutated, so threads can share the index)."""
        kind = self._manifest.kind
        params: faiss.SearchParameters | None = None
        if kind in IVF_KINDS:
            params = faiss.SearchParametersIVF(nprobe=probe)
        elif kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=ef)
        elif sel is not None:
            params = faiss.SearchParameters()
        if sel is not None:
            # The filter's ids come from live store rows, so for HNSW they already exclude the
            # tombstones: no IDSelectorAnd with the tombstone selector is needed.
            params.sel = sel
        elif kind == "hnsw" and self._deleted_selector is not None:
            params.sel = self._deleted_selector
        # faiss's GPU indexes take no ID selector: filtered searches run on the CPU index.
        index = self._index if sel is not None else self._search_index()
        return index.search(q, k, params=params)


    def _search_index(self) -> faiss.Index:
        """The GPU replica when GPU is in use (re-uploaded after writes), else the CPU index."""
        if not self._use_gpu or self._manifest.kind == "hnsw":
            return self._index
        with self._gpu_lock:
            if self._gpu_dirty or self._gpu_index is None:
                try:
                    self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
                except RuntimeError as err:
                    log.warning("faiss GPU copy failed (%s); searching on CPU", err)
                    self._use_gpu = False
                    return self._index
                self._gpu_dirty = False
            return self._gpu_index

    def get(self, ids: Iterable[int]) -> dict[int, tuple[str, dict | None]]:
        """Stored (text, metadata) for the ids that exist."""
        with self._lock.read():
            return self._store.get(ids)

    def get_docs(self, ids: Sequence[str]) -> dict[str, SearchResult]:
        """The stored documents under the user's ids that exist (score 0.0: no query involved)."""
        doc_ids = check_doc_ids(ids)
        with self._lock.read():
            found = self._store.ids_for_docs(doc_ids)
            rows = self._store.rows(found.values())
        return {doc: SearchResult(i, rows[i][0], 0.0, rows[i][1], doc) for doc, i in found.items() if i in rows}

    # ----------------------------------------------------------------- info

    def __len__(self) -> int:
        """Number of live (not deleted) items."""
        return self._manifest.count

    @property
    def kind(self) -> str:
        """flat, ivf, hnsw, ivfpq or ivfsq8."""
        return self._manifest.kind

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._manifest.dim

    @property
    def manifest(self) -> Manifest:
        """A copy of the manifest as it stands in memory."""
        return Manifest(**self._manifest.to_dict())

    def stats(self) -> dict:
        """Counts, kind, parameters, model and storage facts, for /stats and `index info`."""
        with self._lock.read():
            m = self._manifest
            return {
                "kind": m.kind,
                "count": m.count,
                "ntotal": int(self._index.ntotal) if self._index is not None else 0,
                "deleted_tombstones": m.ntotal - m.count if m.kind == "hnsw" else 0,
                "doc_ids": self._store.doc_count(),
                "dim": m.dim,
                "metric": "cosine (inner product on L2-normalised vectors)",
                "params": dict(m.params),
                "trained": self.is_trained,
                "model": dict(m.model) if m.model else None,
                "path": str(self.path) if self.path else None,
                "generation": m.generation or None,
                "index_file_bytes": m.files.get("index", {}).get("bytes"),
                # Exact vectors re-scoring a compressed index are on disk, read per query, not in memory.
                "exact_vector_rows": self._vectors.rows if self._vectors is not None else 0,
                "gpu": bool(self._use_gpu and m.kind != "hnsw"),
                "format_version": m.format_version,
            }

    def close(self) -> None:
        """Release the store's private files and the exact-vector file."""
        self._store.close()
        if self._vectors is not None:
            self._vectors.close()

    def __enter__(self) -> SearchIndex:
        """Use as a context manager; close() on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the store."""
        self.close()


# --------------------------------------------------------------------- helpers


def check_index_dir(path: str | Path, must_exist: bool = True) -> Path:
    """The index directory as a Path; a file in its place, or (must_exist) a missing one, is an error."""
    from diffcse.core.errors import InputError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--index-dir {path} is a file, not an index directory")
    if must_exist and not path.exists():
        raise InputError(f"--index-dir {path} does not exist")
    return path


def _diffcse_version() -> str:
    """The package version, recorded in manifests (imported late: diffcse imports us lazily)."""
    from diffcse import __version__

    return __version__


def load_recorded_encoder(manifest: Manifest, where: str, device: str | None = None, backend: str = "torch") -> Encoder:
    """Load the model the manifest records, with the pooling and length it was built with."""
    from diffcse.core.encoder import Encoder

    model = manifest.model
    if not model or not model.get("name_or_path"):
        raise SearchIndexError(f"index {where} records no model (built from raw vectors): give an encoder / --model")
    name = model["name_or_path"]
    if name.startswith("/") and not Path(name).exists():
        raise FileNotFoundError(f"index {where} was built with model {name}, which no longer exists: pass --model")
    return Encoder.load(name, pooler=model.get("pooler"), max_seq_length=model.get("max_seq_length"), device=device,
                        backend=backend)


def _check_encoder(manifest: Manifest, encoder: Encoder, where: str) -> None:
    """Refuse an encoder of another dimension or other weights than the index was built with."""
    if encoder.dim != manifest.dim:
        raise IndexMismatchError(
            f"index {where} has dimension {manifest.dim} but encoder {encoder.name_or_path} gives {encoder.dim}"
        )
    model = manifest.model
    if model is None:
        return
    if model.get("fingerprint") != encoder.fingerprint:
        raise IndexMismatchError(
            f"index {where} was built with model {model.get('name_or_path')} (weights {model.get('fingerprint')}) "
            f"but the encoder given is {encoder.name_or_path} (weights {encoder.fingerprint}): "
            "rebuild the index or load it with its own model"
        )
    module = getattr(encoder, "module", None)
    pooler = getattr(module, "pooler", None) if module is not None else "st"
    if model.get("pooler") is not None and pooler is not None and model["pooler"] != pooler:
        raise IndexMismatchError(
            f"index {where} was built with pooler {model['pooler']!r} but the encoder uses {pooler!r}"
        )


def _check_loaded(index: faiss.Index, manifest: Manifest, index_file: Path) -> None:
    """The faiss file must agree with the manifest: dimension, count and kind."""
    if index.d != manifest.dim:
        raise CorruptIndexError(f"index file {index_file} has dimension {index.d} but the manifest says {manifest.dim}")
    if index.ntotal != manifest.ntotal:
        raise CorruptIndexError(f"index file {index_file} holds {index.ntotal} vectors but the manifest says {manifest.ntotal}")
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    expected = {
        "flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSW, "ivf": faiss.IndexIVFFlat, "ivfpq": faiss.IndexIVFPQ,
        "ivfsq8": faiss.IndexIVFScalarQuantizer,
    }[manifest.kind]
    if not isinstance(inner, expected) or inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise CorruptIndexError(
            f"index file {index_file} holds a {type(inner).__name__} (metric {inner.metric_type}), "
            f"not the inner-product {manifest.kind} index the manifest describes"
        )


def _gpu_clustering(index: faiss.Index) -> None:
    """Run IVF k-means on the GPU (the slow part of training a large IVF index)."""
    try:
        ivf = faiss.extract_index_ivf(index)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    except RuntimeError as err:  # pragma: no cover - needs a GPU build
        log.warning("GPU clustering unavailable (%s); training on CPU", err)


def _open_generation(
    path: Path, manifest: Manifest, verify: bool
) -> tuple[faiss.Index | None, TextStore, ExactVectors | None]:
    """The faiss index, the store and the exact vectors of the manifest's generation, checked against the manifest."""
    gen = path / manifest.generation
    index_file = gen / manifest.files["index"]["name"]
    store_file = gen / manifest.files["store"]["name"]
    check_file(index_file, manifest.files["index"], verify)
    check_file(store_file, manifest.files["store"], verify)
    index = None
    if manifest.files["index"]["bytes"] > 0:
        try:
            index = faiss.read_index(str(index_file))
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise CorruptIndexError(f"faiss could not read index file {index_file}: {first[-1] if first else err}") from None
        _check_loaded(index, manifest, index_file)
    elif manifest.kind not in IVF_KINDS:
        raise CorruptIndexError(f"index file {index_file} is empty but kind {manifest.kind!r} always has one")
    vectors = _open_vectors(gen, manifest)
    store = TextStore(store_file)
    try:
        _check_store(store, manifest, store_file)
    except BaseException:
        _close(store, vectors)
        raise
    return index, store, vectors


def _open_vectors(gen: Path, manifest: Manifest) -> ExactVectors | None:
    """The generation's exact vectors when the index re-scores (one row per id ever issued)."""
    entry = manifest.files.get("vectors")
    if not manifest.params.get("rescore"):
        return None
    if entry is None:
        raise CorruptIndexError(f"index {gen.parent} re-scores with exact vectors but its manifest names no vector file")
    if entry["rows"] != manifest.next_id:
        raise CorruptIndexError(
            f"manifest of {gen.parent} records {entry['rows']} exact-vector rows but has issued {manifest.next_id} ids"
        )
    file = gen / entry["name"]
    if not file.is_file():
        raise CorruptIndexError(f"exact-vector file {file} is missing")
    return ExactVectors(manifest.dim, file, entry["rows"])


def _close(store: TextStore, vectors: ExactVectors | None) -> None:
    """Release a store and exact vectors that were opened but not adopted."""
    store.close()
    if vectors is not None:
        vectors.close()


def _check_store(store: TextStore, manifest: Manifest, store_file: Path) -> None:
    """The store must agree with the manifest (rows, tombstones) and have its format's tables; format 1 is upgraded."""
    n_rows = store.count()
    if n_rows != manifest.count:
        raise CorruptIndexError(f"store file {store_file} has {n_rows} rows but the manifest says {manifest.count}")
    dead = manifest.ntotal - manifest.count if manifest.kind == "hnsw" else 0
    if manifest.kind != "hnsw" and manifest.ntotal != manifest.count:
        raise CorruptIndexError(
            f"manifest of {store_file.parent} says {manifest.ntotal} vectors but {manifest.count} rows "
            f"(only hnsw keeps deleted vectors)"
        )
    n_dead = store.tombstone_count()
    if n_dead != dead:
        raise CorruptIndexError(
            f"store file {store_file} records {n_dead} deleted vectors (tombstones) but the manifest implies {dead}"
        )
    if not store.is_current():
        if manifest.format_version >= 2:
            raise CorruptIndexError(
                f"store file {store_file} lacks the document-id column or the full-text index of format "
                f"{manifest.format_version}"
            )
        # Format 1: build them now, in the private copy (the saved generation is not touched);
        # the next save writes format 2.
        store.upgrade()
    n_fts = store.fts_count()
    if n_fts != n_rows:
        raise CorruptIndexError(f"store file {store_file}: the full-text index holds {n_fts} texts but the store {n_rows}")


def _open_live(
    path: Path, manifest: Manifest, verify: bool
) -> tuple[Manifest, faiss.Index | None, TextStore, ExactVectors | None]:
    """Open the live generation; retried when a writer published a newer one meanwhile."""
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            return (manifest, *_open_generation(path, manifest, verify))
        except CorruptIndexError:
            # Readers take no lock: between our reading the manifest and opening its files a
            # writer may have published a new generation and swept this one. Only a manifest that
            # still names the same generation means the files really are bad.
            newer = read_manifest(path)
            if newer.generation == manifest.generation or attempt == _OPEN_ATTEMPTS - 1:
                raise
            manifest = newer
    raise AssertionError("unreachable")


def _same_dir(a: Path, b: Path) -> bool:
    """Whether two paths name the same directory."""
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _generation_number(target: Path) -> int:
    """The live generation's sequence number in target (0 when there is none or it is unreadable)."""
    try:
        name = json.loads((target / MANIFEST_NAME).read_text())["generation"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return int(name.split("-")[1]) if isinstance(name, str) and GENERATION_RE.fullmatch(name) else 0


_MANIFEST_TEMP = re.compile(re.escape(f".{MANIFEST_NAME}.") + r".+\.tmp")


def _remove_stale(target: Path, keep: str) -> None:
    """Delete superseded generations, staging dirs of dead processes and orphan manifest temp files (best effort).

    Runs under the writer lock, after the new manifest is in place.
    """
    for child in target.iterdir():
        if child.name == keep:
            continue
        if _MANIFEST_TEMP.fullmatch(child.name) and child.is_file():
            # Only the lock holder writes the manifest: any other temp file is a killed writer's.
            child.unlink(missing_ok=True)
        elif not child.is_dir():
            continue
        elif child.name.startswith("gen-"):
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith(".staging-"):
            try:
                pid = int(child.name.split("-")[1])
                os.kill(pid, 0)
            except (ValueError, IndexError, ProcessLookupError):
                shutil.rmtree(child, ignore_errors=True)
            except PermissionError:
                pass
