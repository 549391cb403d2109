"""HTTP service over a SearchIndex (FastAPI): /encode, /search, /similarity, /add, /delete, /health, /stats.

Sync endpoints run in FastAPI's thread pool, so searches proceed in parallel under the index's
shared lock while add/delete take it exclusively. Encoding is serialised by its own mutex: torch
already spreads one forward pass over the cores, and the encoder is not documented as thread-safe.
"""

# No `from __future__ import annotations`: FastAPI must resolve the request models, which are
# defined inside create_app (their limits are per-app), from real annotations, not strings.
import logging
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from diffcse.search.errors import SearchIndexError
from diffcse.search.index import SearchIndex

if TYPE_CHECKING:
    from diffcse.core.encoder import Encoder

log = logging.getLogger(__name__)
PERSIST_MODES = ("add", "shutdown", "never")


@dataclass(frozen=True)
class ServiceLimits:
    """Per-request limits; requests over them get a 413 or 422 naming the limit."""

    max_batch: int = 256
    max_text_chars: int = 2000
    max_top_k: int = 1000
    max_body_bytes: int = 4 * 1024 * 1024


def _not_blank(text: str) -> str:
    """Reject empty / whitespace-only texts (an empty query has no meaning)."""
    if not text.strip():
        raise ValueError("text is empty or whitespace only")
    return text


class Hit(BaseModel):
    """One search result."""

    id: int
    text: str
    score: float
    metadata: dict[str, Any] | None = None


class SearchResponse(BaseModel):
    """Hits per query, in query order."""

    results: list[list[Hit]]


class EncodeResponse(BaseModel):
    """One vector per text."""

    dim: int
    embeddings: list[list[float]]


class SimilarityResponse(BaseModel):
    """Cosine matrix: scores[i][j] = cos(a[i], b[j])."""

    scores: list[list[float]]


class AddResponse(BaseModel):
    """Ids given to the added texts, and the new total."""

    ids: list[int]
    count: int
    saved: bool


class DeleteResponse(BaseModel):
    """How many of the ids existed and were removed, and the new total."""

    deleted: int
    count: int
    saved: bool


class Health(BaseModel):
    """Liveness plus the index's size."""

    status: str
    count: int
    kind: str
    dim: int


def create_app(
    index: SearchIndex,
    encoder: "Encoder | None" = None,
    limits: ServiceLimits | None = None,
    persist: str = "add",
) -> FastAPI:
    """A FastAPI app serving index; persist='add' saves after every add/delete (needs index.path)."""
    limits = limits or ServiceLimits()
    if persist not in PERSIST_MODES:
        raise ValueError(f"persist must be one of {', '.join(PERSIST_MODES)}, got {persist!r}")
    if encoder is not None:
        index.attach_encoder(encoder)
    enc = index.encoder
    if persist != "never" and index.path is None:
        raise ValueError(f"persist={persist!r} needs an index that was loaded from or saved to a directory")
    encode_lock = threading.Lock()
    counters: Counter[str] = Counter()
    started = time.time()

    Text = Annotated[str, StringConstraints(max_length=limits.max_text_chars), AfterValidator(_not_blank)]
    Texts = Annotated[list[Text], Field(min_length=1, max_length=limits.max_batch)]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class EncodeRequest(Strict):
        texts: Texts
        normalize: bool = True

    class SearchRequest(Strict):
        queries: Texts
        top_k: int = Field(10, ge=1, le=limits.max_top_k)
        threshold: float | None = Field(None, ge=-1.0, le=1.0)
        nprobe: int | None = Field(None, ge=1, le=1 << 20)
        ef_search: int | None = Field(None, ge=1, le=1 << 20)

    class SimilarityRequest(Strict):
        a: Texts
        b: Texts

    class AddRequest(Strict):
        texts: Texts
        metadata: list[dict[str, Any] | None] | None = None

    class DeleteRequest(Strict):
        ids: Annotated[list[int], Field(min_length=1, max_length=limits.max_batch * 16)]

    def encode(texts: list[str]) -> np.ndarray:
        with encode_lock:
            return enc.encode(texts, normalize=True)

    def save_if(mode: str) -> bool:
        if persist != mode:
            return False
        index.save()
        return True

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if persist == "shutdown":
            log.info("saving index to %s", index.path)
            index.save()

    app = FastAPI(
        title="diffcse search",
        description="Sentence-embedding search over a diffcse index (cosine similarity).",
        lifespan=lifespan,
    )
    app.state.index = index
    app.state.limits = limits

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        counters[request.url.path] += 1
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            return JSONResponse(
                status_code=413,
                content={"detail": f"request body is {length} bytes; the limit is {limits.max_body_bytes}"},
            )
        return await call_next(request)

    @app.exception_handler(SearchIndexError)
    async def index_error(request: Request, err: SearchIndexError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(err)})

    @app.get("/health", response_model=Health)
    def health() -> Health:
        """Liveness and the index's size."""
        return Health(status="ok", count=len(index), kind=index.kind, dim=index.dim)

    @app.get("/stats")
    def stats() -> dict:
        """Index facts, limits, request counts and uptime."""
        return {
            **index.stats(),
            "limits": asdict(limits),
            "persist": persist,
            "requests": dict(counters),
            "uptime_s": round(time.time() - started, 1),
        }

    @app.post("/encode", response_model=EncodeResponse)
    def encode_texts(req: EncodeRequest) -> EncodeResponse:
        """Sentence vectors (L2-normalised unless normalize=false)."""
        with encode_lock:
            vecs = enc.encode(req.texts, normalize=req.normalize)
        return EncodeResponse(dim=int(vecs.shape[1]), embeddings=vecs.tolist())

    @app.post("/search", response_model=SearchResponse)
    def search(req: SearchRequest) -> SearchResponse:
        """Top-k stored texts per query, each with score >= threshold when one is given."""
        hits = index.search_vectors(
            encode(req.queries), top_k=req.top_k, threshold=req.threshold, nprobe=req.nprobe, ef_search=req.ef_search
        )
        return SearchResponse(results=[[Hit(**h._asdict()) for h in row] for row in hits])

    @app.post("/similarity", response_model=SimilarityResponse)
    def similarity(req: SimilarityRequest) -> SimilarityResponse:
        """Cosine similarity matrix between two lists of texts."""
        both = encode(req.a + req.b)
        a, b = both[: len(req.a)], both[len(req.a) :]
        return SimilarityResponse(scores=(a @ b.T).tolist())

    @app.post("/add", response_model=AddResponse)
    def add(req: AddRequest) -> AddResponse:
        """Encode and add texts (with optional metadata); saved before answering when persist='add'."""
        if req.metadata is not None and len(req.metadata) != len(req.texts):
            raise SearchIndexError(f"metadata has {len(req.metadata)} entries for {len(req.texts)} texts")
        ids = index.add_vectors(encode(req.texts), req.texts, req.metadata)
        return AddResponse(ids=ids, count=len(index), saved=save_if("add"))

    @app.post("/delete", response_model=DeleteResponse)
    def delete(req: DeleteRequest) -> DeleteResponse:
        """Remove items by id; unknown ids are ignored."""
        n = index.delete(req.ids)
        return DeleteResponse(deleted=n, count=len(index), saved=save_if("add") if n else False)

    return app
