"""HTTP service over a SearchIndex (FastAPI): /encode, /search, /similarity, /add, /upsert, /delete, /health, /stats.

Sync endpoints run in FastAPI's thread pool, so searches proceed in parallel under the index's
shared lock while add/delete take it exclusively. Encoding is serialised by its own mutex: torch
already spreads one forward pass over the cores, and the encoder is not documented as thread-safe.

Safety: writes need the API key (none configured: the server is read-only); the Host header must
name this server (DNS rebinding); bodies are cut off at the limit while they stream in; a request
the models refuse is a 422 whatever it holds (NaN, lone surrogates, huge ids), never a 500; and
with persist='add' each write holds the index directory's writer lock, so a CLI `index add` and
the server never overwrite each other's rows.
"""

# No `from __future__ import annotations`: FastAPI must resolve the request models, which are
# defined inside create_app (their limits are per-app), from real annotations, not strings.
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from starlette.datastructures import Headers, State
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffcse.search.errors import (
    CorruptIndexError,
    IndexConflictError,
    IndexFormatError,
    IndexLockedError,
    IndexMismatchError,
    SearchIndexError,
)
from diffcse.search.filters import (
    FIELD_PATTERN,
    FIELD_RE,
    MAX_CONDITIONS,
    MAX_FIELD_CHARS,
    MAX_IN_VALUES,
    OPERATORS,
    compile_where,
)
from diffcse.search.index import DEFAULT_LOCK_TIMEOUT, MAX_DOC_ID_CHARS, SearchIndex

if TYPE_CHECKING:
    from diffcse.core.encoder import Encoder

log = logging.getLogger(__name__)
PERSIST_MODES = ("add", "shutdown", "never")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
# The largest id a request may name: 2^53 - 1, the largest integer every JSON parser reads exactly
# (RFC 7493); ids are SQLite INTEGERs (< 2^63, the 500 this bound prevents) and are given from 0 up.
MAX_ID = 2**53 - 1
API_KEY_ENV = "DIFFCSE_API_KEY"
READ_ONLY_HINT = (
    f"this server is read-only: start it with --api-key KEY (or set {API_KEY_ENV}) to enable /add, /upsert and /delete"
)
RANGE_OPERATORS = ("gt", "gte", "lt", "lte")


@dataclass(frozen=True)
class ServiceLimits:
    """Per-request limits; requests over them get a 413 or 422 naming the limit."""

    max_batch: int = 256
    max_text_chars: int = 2000
    max_top_k: int = 1000
    max_body_bytes: int = 4 * 1024 * 1024


# Whitespace by both definitions in play: JSON Schema's (ECMAScript \s, which has U+FEFF) and
# Python's str.isspace, which the index checks texts with (it has U+001C-U+001F and U+0085). A text
# holding nothing else is blank; with one class for both the schema's pattern and the check, a text
# the schema calls valid is one the index accepts (schemathesis found "\x85" accepted by one, not the other).
_SPACE = "\\t\\n\\v\\f\\r \\x1c-\\x1f\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff"
NON_BLANK = f"[^{_SPACE}]"
_NON_BLANK_RE = re.compile(NON_BLANK)


def _check_text(text: str) -> str:
    """Reject empty / whitespace-only texts and texts that are not valid Unicode (lone surrogates)."""
    if not _NON_BLANK_RE.search(text):
        raise ValueError("text is empty or whitespace only")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text is not valid Unicode: lone surrogate at character {err.start}") from None
    return text


def _integral(value: Any) -> Any:
    """5.0 -> 5: JSON Schema counts a number with no fraction as an integer, so the server must too."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_ID:
        return int(value)
    return value


def _bounded_int(lo: int, hi: int) -> Any:
    """An int field in [lo, hi] that also takes 5.0 (the bounds first, so the schema states them)."""
    return Annotated[int, Field(ge=lo, le=hi), BeforeValidator(_integral)]


def _check_metadata(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """Metadata must round-trip as strict JSON in UTF-8 (no NaN/Infinity, no lone surrogates)."""
    if meta is not None:
        try:
            json.dumps(meta, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except (ValueError, TypeError) as err:
            reason = "holds a lone surrogate" if isinstance(err, UnicodeEncodeError) else "holds NaN or Infinity"
            raise ValueError(f"metadata {reason}, which strict JSON cannot store") from None
    return meta


def where_schema(max_chars: int) -> dict[str, Any]:
    """The JSON Schema of a `where` filter, stating exactly what check_where accepts."""
    string = {"type": "string", "maxLength": max_chars}
    number = {"type": "number", "minimum": -MAX_ID, "maximum": MAX_ID}
    scalar = {"anyOf": [string, number, {"type": "boolean"}]}
    bound = {"anyOf": [string, number]}
    ops = {
        "type": "object",
        "properties": {
            "eq": scalar, "ne": scalar,
            "in": {"type": "array", "items": scalar, "minItems": 1, "maxItems": MAX_IN_VALUES},
            **{op: bound for op in RANGE_OPERATORS},
        },
        "additionalProperties": False,
        "minProperties": 1,
    }
    return {
        "anyOf": [
            {
                "type": "object",
                "propertyNames": {"pattern": f"^{FIELD_PATTERN}$", "maxLength": MAX_FIELD_CHARS},
                "additionalProperties": {"anyOf": [string, number, {"type": "boolean"}, ops]},
                "maxProperties": MAX_CONDITIONS,
            },
            {"type": "null"},
        ],
        "description": (
            'metadata filter: {"lang": "en"}, {"lang": {"in": ["en", "de"]}}, {"year": {"gte": 2000, "lt": 2010}}; '
            "operators eq, ne, in, gt, gte, lt, lte; fields (dotted for nested) are AND-ed"
        ),
    }


def _check_where_value(field: str, op: str, value: Any, max_chars: int, allow_bool: bool = True) -> None:
    """One condition value as where_schema allows it: a short string, a bounded number, a boolean."""
    if isinstance(value, bool):
        if allow_bool:
            return
        raise ValueError(f"where condition on {field!r}: {op} needs a number or a string")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or abs(value) > MAX_ID:
            raise ValueError(f"where condition on {field!r}: {op} value must be a finite number within ±{MAX_ID}")
        return
    if isinstance(value, str):
        if len(value) > max_chars:
            raise ValueError(f"where condition on {field!r}: {op} value is over {max_chars} characters")
        return
    raise ValueError(f"where condition on {field!r}: {op} value must be a string, number or boolean")


def check_where(where: dict[str, Any] | None, max_chars: int) -> dict[str, Any] | None:
    """A request's `where`, held to where_schema (so valid by the schema = accepted), then to the index's own rules."""
    if where is None:
        return None
    if len(where) > MAX_CONDITIONS:
        raise ValueError(f"where has {len(where)} fields; at most {MAX_CONDITIONS}")
    for field, cond in where.items():
        if len(field) > MAX_FIELD_CHARS or not FIELD_RE.fullmatch(field):
            raise ValueError(f"where: field {field[:60]!r} is not a field name (letters, digits, '_', '.' between names)")
        if not isinstance(cond, dict):
            _check_where_value(field, "eq", cond, max_chars)
            continue
        if not cond:
            raise ValueError(f"where condition on {field!r}: empty operator object")
        for op, value in cond.items():
            if op not in OPERATORS:
                raise ValueError(f"where condition on {field!r}: unknown operator {op[:40]!r} (known: {', '.join(OPERATORS)})")
            if op == "in":
                if not isinstance(value, list) or not 1 <= len(value) <= MAX_IN_VALUES:
                    raise ValueError(f"where condition on {field!r}: 'in' needs a list of 1 to {MAX_IN_VALUES} values")
                for item in value:
                    _check_where_value(field, op, item, max_chars)
            else:
                _check_where_value(field, op, value, max_chars, allow_bool=op in ("eq", "ne"))
    compile_where(where)  # what the schema cannot state (lone surrogates) fails here, as a ValueError
    return where


def _check_doc_id(doc_id: str) -> str:
    """A document id: not blank, valid Unicode."""
    if not _NON_BLANK_RE.search(doc_id):
        raise ValueError("doc id is empty or whitespace only")
    try:
        doc_id.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"doc id is not valid Unicode: lone surrogate at character {err.start}") from None
    return doc_id


def json_safe(value: Any) -> Any:
    """value with everything strict UTF-8 JSON cannot hold made printable (NaN -> 'nan', '\\ud800' escaped)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return json_safe(str(value))


def is_loopback(host: str) -> bool:
    """Whether binding host keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warnings(host: str, api_key: str | None) -> list[str]:
    """What a user binding host should be told at startup (nothing on loopback)."""
    if is_loopback(host):
        return []
    if api_key is None:
        return [
            f"serving on {host}, reachable beyond this machine, with no API key: the server is read-only "
            f"(/add, /upsert and /delete answer 403); pass --api-key or set {API_KEY_ENV} to allow writes"
        ]
    return [
        f"serving on {host}, reachable beyond this machine, over plain HTTP: the API key and every text "
        "cross the network unencrypted; put a TLS-terminating proxy in front"
    ]


def allowed_host_names(host: str, extra: Sequence[str] = ()) -> list[str]:
    """Host header values accepted: the loopback names, the bound host, and extra (e.g. a public name)."""
    names = list(LOOPBACK_HOSTS) + [host] + list(extra)
    try:
        if ipaddress.ip_address(host).version == 6:
            names.append(f"[{host}]")  # Host headers bracket IPv6 literals
    except ValueError:
        pass
    out = list(dict.fromkeys(n.lower() for n in names if n))
    for name in out:
        if "*" in name[1:] or (name.startswith("*") and name != "*" and not name.startswith("*.")):
            raise ValueError(f"--allowed-host {name!r}: a wildcard must be '*' or lead a domain, like '*.example.com'")
    return out


# Closing the connection stops the upload: otherwise the server drains the rest of the body to keep
# the connection alive (a 100 MB upload read to the end, only to be thrown away).
_CLOSE = {"Connection": "close"}


class _BodyTooLarge(HTTPException):
    """Raised from receive() as soon as a streamed body passes the limit (FastAPI re-raises it as the 413)."""


class BodyLimitMiddleware:
    """Answer 413 once a request body passes max_bytes, counting bytes as they arrive.

    Content-Length over the limit is refused before anything is read; a chunked body is cut off as
    soon as the count passes the limit, without reading the rest. state.max_body_pulled records the
    most body bytes ever pulled for one request (what a client could make the server hold).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, state: State) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.state = state
        self.state.max_body_pulled = 0

    def _refusal(self, what: str) -> JSONResponse:
        return JSONResponse(status_code=413, content={"detail": f"request body {what}; the limit is {self.max_bytes} bytes"},
                            headers=_CLOSE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refusal(f"is {length} bytes")(scope, receive, send)
            return
        pulled = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal pulled
            message = await receive()
            if message["type"] == "http.request":
                pulled += len(message.get("body", b""))
                self.state.max_body_pulled = max(self.state.max_body_pulled, pulled)
                if pulled > self.max_bytes:
                    raise _BodyTooLarge(413, f"request body passed {self.max_bytes} bytes; the limit is {self.max_bytes} bytes",
                                        headers=_CLOSE)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _BodyTooLarge:
            # Read outside FastAPI's body parsing (which turns it into the 413 itself).
            if started:
                raise
            await self._refusal(f"passed {self.max_bytes} bytes")(scope, receive, send)


class RequestCounter:
    """Count requests per known route (one bucket for all other paths, so the counter stays small)."""

    def __init__(self, app: ASGIApp, counters: Counter, known: set[str]) -> None:
        self.app = app
        self.counters = counters
        self.known = known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            self.counters[path if path in self.known else "other"] += 1
        await self.app(scope, receive, send)


class Error(BaseModel):
    """An error: what went wrong, in one line."""

    detail: str


class Hit(BaseModel):
    """One search result; doc_id is the document id given at /upsert (null for texts added by /add)."""

    id: int
    text: str
    score: float
    metadata: dict[str, Any] | None = None
    doc_id: str | None = None


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


class UpsertResponse(BaseModel):
    """The internal id now holding each document, how many were new or replaced, and the new total."""

    ids: list[int]
    added: int
    replaced: int
    count: int
    saved: bool


class DeleteResponse(BaseModel):
    """How many of the ids and doc ids existed and were removed, and the new total."""

    deleted: int
    count: int
    saved: bool


class Health(BaseModel):
    """Liveness plus the index's size."""

    status: str
    count: int
    kind: str
    dim: int


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an endpoint can answer."""
    what = {
        400: "bad Host header (not this server), or a request the index refuses",
        401: "missing or wrong API key",
        403: "the server is read-only (started without an API key)",
        409: "the index changed under this write (retry)",
        413: "request body over the size limit",
        503: "another process holds the index's writer lock (retry later), or the index on disk changed so "
             "that this server cannot write it (rebuilt with another model, damaged)",
    }
    out: dict[int | str, dict[str, Any]] = {code: {"model": Error, "description": what[code]} for code in codes}
    if 400 in out:
        # The Host check (Starlette's TrustedHostMiddleware) answers in plain text.
        out[400]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    return out


READ_ERRORS = _responses(400, 413)
WRITE_ERRORS = _responses(400, 401, 403, 409, 413, 503)


def _model_label(name_or_path: str | None) -> str | None:
    """The model as /stats shows it: its folder's name, or the packaged model's name; never a path."""
    if not name_or_path:
        return name_or_path
    from diffcse.core.folder import model_name

    return model_name(name_or_path)


def create_app(
    index: SearchIndex,
    encoder: "Encoder | None" = None,
    limits: ServiceLimits | None = None,
    persist: str = "add",
    *,
    api_key: str | None = None,
    host: str = "127.0.0.1",
    allowed_hosts: Sequence[str] = (),
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
) -> FastAPI:
    """A FastAPI app serving index.

    persist: 'add' saves every add/delete before answering, under the index directory's writer
    lock (waiting up to lock_timeout s; 503 after); 'shutdown' holds that lock for the app's life
    and saves on exit; 'never' keeps writes in memory. api_key: what /add and /delete need (None:
    read-only). host and allowed_hosts: the Host header values accepted besides loopback names.
    """
    limits = limits or ServiceLimits()
    if persist not in PERSIST_MODES:
        raise ValueError(f"persist must be one of {', '.join(PERSIST_MODES)}, got {persist!r}")
    if api_key is not None and not api_key.strip():
        api_key = None
    if encoder is not None:
        index.attach_encoder(encoder)
    enc = index.encoder
    if persist != "never" and index.path is None:
        raise ValueError(f"persist={persist!r} needs an index that was loaded from or saved to a directory")
    hosts = allowed_host_names(host, allowed_hosts)
    encode_lock = threading.Lock()
    counters: Counter[str] = Counter()
    started = time.time()
    key_bytes = api_key.encode("utf-8", "surrogateescape") if api_key is not None else None
    index_dir = index.path
    model = (index.manifest.model or {}).get("name_or_path")
    model_label = _model_label(model)
    writer_name = f"diffcse serve (pid {os.getpid()}, {host})"

    max_len = limits.max_text_chars
    # The schema states what the validator enforces (pattern NON_BLANK = not blank), so that a request
    # valid by the OpenAPI document is one the server accepts.
    Text = Annotated[str, Field(max_length=max_len, json_schema_extra={"pattern": NON_BLANK}), AfterValidator(_check_text)]
    Texts = Annotated[list[Text], Field(min_length=1, max_length=limits.max_batch)]
    Meta = Annotated[dict[str, Any] | None, AfterValidator(_check_metadata)]
    Id = _bounded_int(0, MAX_ID)
    DocId = Annotated[str, Field(min_length=1, max_length=MAX_DOC_ID_CHARS, json_schema_extra={"pattern": NON_BLANK}),
                      AfterValidator(_check_doc_id)]
    Where = Annotated[dict[str, Any] | None, WithJsonSchema(where_schema(max_len)),
                      AfterValidator(lambda w: check_where(w, max_len))]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

    class EncodeRequest(Strict):
        texts: Texts
        normalize: bool = True

    class SearchRequest(Strict):
        # The one cross-field rule, stated in the schema too: a cosine threshold means nothing to BM25.
        model_config = ConfigDict(json_schema_extra={"not": {
            "required": ["mode", "threshold"],
            "properties": {"mode": {"const": "lexical"}, "threshold": {"type": "number"}},
        }})
        queries: Texts
        top_k: _bounded_int(1, limits.max_top_k) = 10
        threshold: Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)] | None = Field(
            None, description="least cosine of a dense hit (modes dense and hybrid; not with mode lexical)"
        )
        nprobe: _bounded_int(1, 1 << 20) | None = None
        ef_search: _bounded_int(1, 1 << 20) | None = None
        where: Where = None
        mode: Literal["dense", "lexical", "hybrid"] = Field(
            "dense", description="dense: cosine; lexical: BM25 over the words; hybrid: reciprocal rank fusion of both"
        )

        @model_validator(mode="after")
        def _threshold_needs_vectors(self) -> "SearchRequest":
            if self.mode == "lexical" and self.threshold is not None:
                raise ValueError("threshold is a cosine similarity: it applies to modes dense and hybrid, not lexical")
            return self

    class SimilarityRequest(Strict):
        a: Texts
        b: Texts

    class AddRequest(Strict):
        texts: Texts
        metadata: list[Meta] | None = Field(
            None, max_length=limits.max_batch, description="one object (or null) per text, in the same order"
        )

        @model_validator(mode="after")
        def _same_length(self) -> "AddRequest":
            if self.metadata is not None and len(self.metadata) != len(self.texts):
                raise ValueError(f"metadata has {len(self.metadata)} entries for {len(self.texts)} texts")
            return self

    class Document(Strict):
        id: DocId
        text: Text
        metadata: Meta = None

    class UpsertRequest(Strict):
        documents: Annotated[list[Document], Field(min_length=1, max_length=limits.max_batch)]

    def _ids_or_doc_ids(schema: dict[str, Any]) -> None:
        # Absent, not null: the schema shows no default, and needs one of the two lists.
        for name in ("ids", "doc_ids"):
            schema["properties"][name].pop("default", None)
        schema["anyOf"] = [{"required": ["ids"]}, {"required": ["doc_ids"]}]

    class DeleteRequest(Strict):
        model_config = ConfigDict(json_schema_extra=_ids_or_doc_ids)
        ids: Annotated[list[Id], Field(min_length=1, max_length=limits.max_batch * 16)] = None
        doc_ids: Annotated[list[DocId], Field(min_length=1, max_length=limits.max_batch * 16)] = None

        @model_validator(mode="after")
        def _something_to_delete(self) -> "DeleteRequest":
            if self.ids is None and self.doc_ids is None:
                raise ValueError("give ids and/or doc_ids")
            return self

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (the server's --api-key)")
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's --api-key")

    def require_key(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        header: Annotated[str | None, Depends(key_header)],
    ) -> None:
        if key_bytes is None:
            raise HTTPException(status_code=403, detail=READ_ONLY_HINT)
        given = [c for c in (cred.credentials if cred else None, header) if c is not None]
        # Both candidates are always compared, so the time taken does not tell which one was sent.
        ok = [hmac.compare_digest(c.encode("utf-8", "surrogateescape"), key_bytes) for c in given]
        if not any(ok):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def encode(texts: list[str]) -> np.ndarray:
        with encode_lock:
            return enc.encode(texts, normalize=True)

    @contextlib.contextmanager
    def writing(what: str):
        """Where a write goes: under the directory's writer lock and saved (add), or memory only."""
        if persist == "add":
            with index.writer(timeout=lock_timeout, command=f"{writer_name} {what}"):
                yield True
        else:
            yield False

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if persist != "shutdown":
            yield
            return
        # The whole life: a CLI writer waits (and fails clearly) instead of being overwritten at exit.
        with index.writer(timeout=lock_timeout, command=f"{writer_name} --persist shutdown"):
            yield
            log.info("saving index to %s", index.path)

    app = FastAPI(
        title="diffcse search",
        description=(
            "Sentence-embedding search over a diffcse index: cosine similarity, BM25, or both fused, with "
            "metadata filters. /add, /upsert and /delete need the server's API key (Authorization: Bearer KEY "
            "or X-API-Key); without one the server is read-only."
        ),
        lifespan=lifespan,
    )
    app.state.index = index
    app.state.limits = limits
    app.state.allowed_hosts = hosts
    # Added innermost first: the Host check runs before anything else, then the body limit.
    known_paths: set[str] = set()  # filled once the routes exist (the middleware stack is built later)
    app.add_middleware(RequestCounter, counters=counters, known=known_paths)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes, state=app.state)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)

    def _public(message: str) -> str:
        """An index error for a client: the index folder by name, never its absolute path."""
        if index_dir is not None:
            for form in {str(index_dir.resolve()), str(index_dir)}:
                message = message.replace(form, index_dir.name)
        return message

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        # The default handler echoes the input, and NaN or a lone surrogate in it cannot be
        # written as JSON: that turned a bad request into a 500.
        errors = [{k: v for k, v in e.items() if k != "url"} for e in err.errors()]
        return JSONResponse(status_code=422, content={"detail": json_safe(errors)})

    @app.exception_handler(IndexLockedError)
    async def locked(request: Request, err: IndexLockedError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": _public(str(err))}, headers={"Retry-After": "5"})

    @app.exception_handler(CorruptIndexError)
    @app.exception_handler(IndexFormatError)
    @app.exception_handler(IndexMismatchError)
    async def unusable_on_disk(request: Request, err: SearchIndexError) -> JSONResponse:
        # Only a write's catch-up with the disk meets these (requests cannot cause them): the
        # server's fault, not the client's.
        return JSONResponse(status_code=503, content={"detail": _public(str(err))})

    @app.exception_handler(IndexConflictError)
    async def conflict(request: Request, err: IndexConflictError) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": _public(str(err))})

    @app.exception_handler(SearchIndexError)
    async def index_error(request: Request, err: SearchIndexError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": _public(str(err))})

    @app.get("/health", response_model=Health, responses=_responses(400))
    def health() -> Health:
        """Liveness and the index's size."""
        return Health(status="ok", count=len(index), kind=index.kind, dim=index.dim)

    @app.get("/stats", responses=_responses(400))
    def stats() -> dict:
        """Index facts, limits, request counts and uptime (the index and model by name, never by path)."""
        facts = index.stats()
        facts["path"] = index_dir.name if index_dir is not None else None
        if facts.get("model"):
            facts["model"]["name_or_path"] = model_label
        return {
            **facts,
            "limits": asdict(limits),
            "persist": persist,
            "writes": "enabled (API key)" if key_bytes is not None else "disabled (read-only: no API key)",
            "requests": dict(counters),
            "uptime_s": round(time.time() - started, 1),
        }

    @app.post("/encode", response_model=EncodeResponse, responses=READ_ERRORS)
    def encode_texts(req: EncodeRequest) -> EncodeResponse:
        """Sentence vectors (L2-normalised unless normalize=false)."""
        with encode_lock:
            vecs = enc.encode(req.texts, normalize=req.normalize)
        return EncodeResponse(dim=int(vecs.shape[1]), embeddings=vecs.tolist())

    @app.post("/search", response_model=SearchResponse, responses=READ_ERRORS)
    def search(req: SearchRequest) -> SearchResponse:
        """Top-k stored texts per query among those passing `where`: by cosine (each >= threshold), BM25 or both."""
        if req.mode == "lexical":
            hits = index.search_lexical(req.queries, top_k=req.top_k, where=req.where)
        elif req.mode == "hybrid":
            hits = index.search_hybrid(encode(req.queries), req.queries, top_k=req.top_k, threshold=req.threshold,
                                       nprobe=req.nprobe, ef_search=req.ef_search, where=req.where)
        else:
            hits = index.search_vectors(encode(req.queries), top_k=req.top_k, threshold=req.threshold,
                                        nprobe=req.nprobe, ef_search=req.ef_search, where=req.where)
        return SearchResponse(results=[[Hit(**h._asdict()) for h in row] for row in hits])

    @app.post("/similarity", response_model=SimilarityResponse, responses=READ_ERRORS)
    def similarity(req: SimilarityRequest) -> SimilarityResponse:
        """Cosine similarity matrix between two lists of texts."""
        both = encode(req.a + req.b)
        a, b = both[: len(req.a)], both[len(req.a) :]
        return SimilarityResponse(scores=(a @ b.T).tolist())

    @app.post("/add", response_model=AddResponse, responses=WRITE_ERRORS, dependencies=[Depends(require_key)])
    def add(req: AddRequest) -> AddResponse:
        """Encode and add texts (with optional metadata); on disk before answering when persist='add'."""
        vecs = encode(req.texts)  # outside the writer lock: encoding is the slow part
        with writing("/add") as saved:
            ids = index.add_vectors(vecs, req.texts, req.metadata)
            count = len(index)
        return AddResponse(ids=ids, count=count, saved=saved)

    @app.post("/upsert", response_model=UpsertResponse, responses=WRITE_ERRORS, dependencies=[Depends(require_key)])
    def upsert(req: UpsertRequest) -> UpsertResponse:
        """Add documents under your ids, or replace the text, vector and metadata of ids already there.

        A repeated id counts once, with its last document. On disk before answering when persist='add'.
        """
        docs = req.documents
        texts = [d.text for d in docs]
        vecs = encode(texts)  # outside the writer lock: encoding is the slow part
        with writing("/upsert") as saved:
            res = index.upsert_vectors([d.id for d in docs], vecs, texts, [d.metadata for d in docs])
            count = len(index)
        return UpsertResponse(ids=res.ids, added=res.added, replaced=res.replaced, count=count, saved=saved)

    @app.post("/delete", response_model=DeleteResponse, responses=WRITE_ERRORS, dependencies=[Depends(require_key)])
    def delete(req: DeleteRequest) -> DeleteResponse:
        """Remove items by internal id and/or by document id; unknown ones are ignored."""
        with writing("/delete") as saved:
            n = index.delete(req.ids) if req.ids else 0
            n += index.delete_ids(req.doc_ids) if req.doc_ids else 0
            count = len(index)
        return DeleteResponse(deleted=n, count=count, saved=saved and n > 0)

    known_paths.update(p for p in (getattr(r, "path", None) for r in app.routes) if p)
    return app
