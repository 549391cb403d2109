"""MilvusIndex: the dense part of the SearchIndex API over Milvus, for corpora that outgrow one machine.

The uri is either a Milvus Lite data path ending in `.db` (an embedded engine that pymilvus starts
in this process, from the milvus-lite package) or a server URI (`http://host:19530`,
`https://...`, `tcp://...`). An index is two collections:

    <collection>            id INT64 (primary key, ours: issued in order, never reused), vector
                            FLOAT_VECTOR (L2-normalised, FLAT index, metric IP = cosine), text
                            VARCHAR, doc_id VARCHAR (the user's id, null for add()), metadata JSON
                            (null when none), types JSON (the JSON type of every metadata leaf)
    <collection>__diffcse   one row of facts: dim, next_id (the next internal id), model record

`where` filters run inside the engine as a boolean expression over the JSON fields, so top_k is
filled from matching documents. Milvus compares JSON values loosely (Lite says `true == 1`), so
every comparison is guarded by the leaf's recorded type (`types["year"] == "n"`; `types` mirrors
the metadata's nesting, with "s", "n", "b" or "o" (null, list) at the leaves): the string
"2000" never equals the number 2000 and true never equals 1, as in SearchIndex.

One writer per collection: ids are allocated by this process (the next id is stored before the
rows that use it, so a crash skips ids but never reuses one). Milvus has no transactions: an
upsert inserts the new rows, then deletes the old ones; a failure in between is undone, but a crash
there leaves a document under two internal ids until its next upsert or delete.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload
from urllib.parse import urlsplit

import numpy as np

from diffcse.search.errors import EmptyQueryError, IndexMismatchError, SearchIndexError
from diffcse.search.filters import FIELD_RE, compile_where
from diffcse.search.index import (
    MAX_DOC_ID_CHARS,
    EncodingWrites,
    SearchIndex,
    SearchResult,
    UpsertResult,
    _check_encoder,
    _check_texts,
    _check_vectors,
    _encode_metadata,
    _model_info,
    check_doc_ids,
    load_recorded_encoder,
)
from diffcse.search.manifest import Manifest

if TYPE_CHECKING:
    from pymilvus import MilvusClient

    from diffcse.core.encoder import Encoder

log = logging.getLogger(__name__)

KIND = "milvus"
FACTS_SUFFIX = "__diffcse"
FACTS_KEY = "index"
FORMAT = 1
# Milvus caps a VARCHAR at 65535 bytes and a search's limit at 16384.
MAX_TEXT_BYTES = 65535
MAX_TOP_K = 16384
# Rows per insert and ids per `in [...]` expression: well under gRPC's 64 MiB message and the
# server's 16384-row query window.
INSERT_BATCH = 1000
ID_BATCH = 1000
COLLECTION_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
CONSISTENCY = "Strong"
OUTPUT_FIELDS = ["text", "metadata", "doc_id"]
# The type tag of a metadata leaf: string, number, boolean, or other (null, a list).
_TAGS = {"text": "s", "number": "n", "bool": "b"}
_RANGE_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Milvus Lite runs inside this process, one engine per data path: it is stopped when the last
# MilvusIndex using that path closes, so a reopen recovers from the files like a new process would.
_local_users: dict[str, int] = {}
_local_lock = threading.Lock()


class MilvusEngineError(SearchIndexError):
    """Milvus (a server or Milvus Lite) refused a request or could not be reached."""


# --------------------------------------------------------------------- filters


def _literal(value: object) -> str:
    """A Milvus expression literal for a filter value already checked by compile_where."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        # repr: the shortest text that reads back as the same float (exponents are part of the grammar).
        return repr(value)
    assert isinstance(value, str)
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in value) + '"'


def _family(value: object) -> str:
    """The type tag a metadata leaf must carry to equal (or be ranged against) value."""
    if isinstance(value, bool):
        return _TAGS["bool"]
    if isinstance(value, (int, float)):
        return _TAGS["number"]
    return _TAGS["text"]


def _path(field: str, column: str = "metadata") -> str:
    """The JSON path of a dotted field in a JSON column: metadata["src"]["site"]."""
    return column + "".join(f'["{part}"]' for part in field.split("."))


def _tag(field: str) -> str:
    """The path of a dotted field's type tag: types mirrors metadata's nesting."""
    return _path(field, "types")


def _equal(field: str, value: object) -> str:
    """True when the field holds exactly value, of the same JSON type."""
    return f'({_tag(field)} == "{_family(value)}" and {_path(field)} == {_literal(value)})'


def _one_of(field: str, values: Sequence[object]) -> str:
    """True when the field equals any of values (Milvus Lite allows `in` on schema fields only, not JSON paths)."""
    groups: dict[str, list[object]] = {}
    for value in values:
        groups.setdefault(_family(value), []).append(value)
    parts = []
    for family, group in groups.items():
        # Within one type the values are ordered (numbers; strings by code point, as SQLite and
        # Milvus compare them), so a search tree can test them: Milvus Lite evaluates JSON paths
        # row by row in Python, and a flat OR of 1024 equalities took 24 s over 3000 rows.
        unique = sorted(set(group)) if family != _TAGS["bool"] else list(dict.fromkeys(group))
        parts.append(f'({_tag(field)} == "{family}" and {_any_equal(_path(field), unique)})')
    return "(" + " or ".join(parts) + ")"


def _any_equal(path: str, ordered: list[object]) -> str:
    """True when the JSON value at path equals one of the sorted values: a balanced tree of comparisons."""
    if len(ordered) <= 4:
        return "(" + " or ".join(f"{path} == {_literal(value)}" for value in ordered) + ")"
    mid = len(ordered) // 2
    pivot = _literal(ordered[mid])
    return (f"(({path} < {pivot} and {_any_equal(path, ordered[:mid])}) or "
            f"({path} >= {pivot} and {_any_equal(path, ordered[mid:])}))")


def milvus_filter(where: Mapping[str, Any] | None) -> str | None:
    """Translate a `where` filter (checked by compile_where, with its errors) into a Milvus boolean expression."""
    if compile_where(where) is None:
        return None
    assert where is not None
    terms: list[str] = []
    for field, cond in where.items():
        if not isinstance(cond, Mapping):
            terms.append(_equal(field, cond))
            continue
        for op, value in cond.items():
            if op == "eq":
                terms.append(_equal(field, value))
            elif op == "ne":
                # Milvus's `not` keeps null as null (no match): a document without the field is
                # "not equal" too, so it is let through explicitly.
                terms.append(f"({_tag(field)} is null or not {_equal(field, value)})")
            elif op == "in":
                terms.append(_one_of(field, value))
            else:
                tag = _family(value)
                terms.append(f'({_tag(field)} == "{tag}" and {_path(field)} {_RANGE_OPS[op]} {_literal(value)})')
    return " and ".join(terms)


def type_tags(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON type tag of every leaf of a metadata object, nested as the object is (what `types` stores).

    Keys that are not identifiers cannot be named by a filter and are left out.
    """
    out: dict[str, Any] = {}
    for key, value in (meta or {}).items():
        if not isinstance(key, str) or "." in key or not FIELD_RE.fullmatch(key):
            continue
        if isinstance(value, Mapping):
            out[key] = type_tags(value)
        elif isinstance(value, bool):
            out[key] = _TAGS["bool"]
        elif isinstance(value, (int, float)):
            out[key] = _TAGS["number"]
        elif isinstance(value, str):
            out[key] = _TAGS["text"]
        else:
            out[key] = "o"
    return out


# --------------------------------------------------------------------- connection


def _is_local(uri: str) -> bool:
    """Whether uri names a Milvus Lite data path rather than a server."""
    return urlsplit(uri).scheme.lower() not in ("http", "https", "tcp", "grpc", "unix")


def _shown(uri: str) -> str:
    """The uri without credentials, for messages and stats."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    return parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")).geturl()


def _connect(uri: str, timeout: float | None) -> tuple[MilvusClient, str | None]:
    """A client for uri, and the absolute data path when it starts (or shares) an embedded Milvus Lite."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise SearchIndexError(
            "the Milvus backend needs pymilvus (and milvus-lite for local .db paths): pip install 'diffcse[milvus]'"
        ) from None
    if not isinstance(uri, str) or not uri.strip():
        raise SearchIndexError(f"uri must be a Milvus Lite path ending in .db or a server URI, got {uri!r}")
    local = None
    if _is_local(uri):
        if not uri.endswith(".db"):
            raise SearchIndexError(
                f"uri {uri!r}: a local Milvus Lite path must end in '.db' (or give a server URI like http://host:19530)"
            )
        path = Path(uri).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        local = str(path)
        try:
            import milvus_lite  # noqa: F401 - pymilvus imports it itself; this gives a clearer error
        except ImportError:
            raise SearchIndexError(f"uri {uri!r} needs Milvus Lite: pip install milvus-lite") from None
        uri = local
    try:
        client = MilvusClient(uri=uri, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - pymilvus raises several types; all mean "no engine"
        what = "start Milvus Lite on" if local else "connect to Milvus at"
        hint = " (is another process using it?)" if local else ""
        raise MilvusEngineError(f"could not {what} {_shown(uri)}{hint}: {_message(err)}") from err
    if local is not None:
        with _local_lock:
            _local_users[local] = _local_users.get(local, 0) + 1
    return client, local


def _release_local(path: str) -> None:
    """Stop the embedded Milvus Lite of path once no MilvusIndex in this process uses it."""
    with _local_lock:
        users = _local_users.get(path, 0) - 1
        if users > 0:
            _local_users[path] = users
            return
        _local_users.pop(path, None)
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(path)


def _message(err: BaseException) -> str:
    """The engine's own message, without pymilvus's repr wrapping."""
    message = getattr(err, "message", None) or str(err) or type(err).__name__
    return str(message).strip().splitlines()[0]


# --------------------------------------------------------------------- the index


class MilvusIndex(EncodingWrites):
    """Cosine-similarity search over texts stored in Milvus, with SearchIndex's ids, upserts and filters (dense only)."""

    def __init__(
        self, client: MilvusClient, local: str | None, uri: str, collection: str, facts: dict, timeout: float | None
    ) -> None:
        self._client = client
        self._local = local
        self._uri = uri
        self._collection = collection
        self._facts_collection = collection + FACTS_SUFFIX
        self._facts = facts
        self._timeout = timeout
        self._encoder: Encoder | None = None
        # Writes are serialised: each allocates ids from _facts["next_id"].
        self._write_lock = threading.Lock()
        self._closed = False

    # ----------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        dim: int,
        uri: str,
        collection: str = "diffcse",
        encoder: Encoder | None = None,
        overwrite: bool = False,
        timeout: float | None = 60.0,
    ) -> MilvusIndex:
        """An empty index in a new collection (overwrite=True drops an existing one of that name first)."""
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise SearchIndexError(f"dim must be a positive integer, got {dim!r}")
        _check_collection(collection)
        if encoder is not None and encoder.dim != dim:
            raise IndexMismatchError(f"encoder {encoder.name_or_path} gives dimension {encoder.dim} but dim={dim}")
        client, local = _connect(uri, timeout)
        try:
            now = time.time()
            facts = {"format": FORMAT, "kind": KIND, "dim": dim, "next_id": 0, "model": None, "created_at": now}
            self = cls(client, local, uri, collection, facts, timeout)
            with self._engine("create collection"):
                exists = [name for name in (collection, self._facts_collection) if client.has_collection(name)]
                if exists and not overwrite:
                    raise SearchIndexError(
                        f"collection {exists[0]!r} already exists at {_shown(uri)}: "
                        "MilvusIndex.open() it, or pass overwrite=True to replace it"
                    )
                for name in exists:
                    client.drop_collection(name)
                self._create_collections(dim)
            if encoder is not None:
                facts["model"] = _model_info(encoder)
                self._encoder = encoder
            self._write_facts(facts)
        except BaseException:
            _close_client(client, local)
            raise
        return self

    def _create_collections(self, dim: int) -> None:
        """The documents collection and the facts collection, indexed and loaded."""
        from pymilvus import DataType

        client = self._client
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        # 4 bytes per character at most: MAX_DOC_ID_CHARS characters always fit.
        schema.add_field("doc_id", DataType.VARCHAR, max_length=4 * MAX_DOC_ID_CHARS, nullable=True)
        schema.add_field("metadata", DataType.JSON, nullable=True)
        schema.add_field("types", DataType.JSON)
        index = client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="IP")
        client.create_collection(self._collection, schema=schema, index_params=index, consistency_level=CONSISTENCY)
        # Every Milvus collection needs a vector field; the facts row carries a dummy one.
        facts = client.create_schema(auto_id=False, enable_dynamic_field=False)
        facts.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
        facts.add_field("facts", DataType.JSON)
        facts.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
        index = client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="L2")
        client.create_collection(self._facts_collection, schema=facts, index_params=index, consistency_level=CONSISTENCY)

    @classmethod
    def open(
        cls, uri: str, collection: str = "diffcse", encoder: Encoder | str | None = None, timeout: float | None = 60.0
    ) -> MilvusIndex:
        """Reopen an index made by create(); encoder='auto' loads the recorded model; a mismatched one is refused."""
        _check_collection(collection)
        if isinstance(encoder, str) and encoder != "auto":
            raise SearchIndexError(f"encoder must be an Encoder, None or 'auto', not {encoder!r}")
        client, local = _connect(uri, timeout)
        try:
            self = cls(client, local, uri, collection, {}, timeout)
            self._facts = self._read_facts()
            where = f"{_shown(uri)} collection {collection!r}"
            manifest = Manifest(dim=self.dim, kind="flat", model=self._facts.get("model"))
            if encoder == "auto":
                encoder = load_recorded_encoder(manifest, where)
            if encoder is not None:
                _check_encoder(manifest, encoder, where)
                self._encoder = encoder
        except BaseException:
            _close_client(client, local)
            raise
        return self

    def _read_facts(self) -> dict:
        """The stored facts, checked against the collection; next_id also covers ids a crashed writer used."""
        where = f"{_shown(self._uri)}"
        with self._engine("open"):
            for name in (self._collection, self._facts_collection):
                if not self._client.has_collection(name):
                    raise SearchIndexError(f"no diffcse index {self._collection!r} at {where}: collection {name!r} is missing")
            for name in (self._collection, self._facts_collection):
                self._client.load_collection(name)
            rows = self._client.get(self._facts_collection, ids=[FACTS_KEY], output_fields=["facts"])
            fields = {f["name"]: f for f in self._client.describe_collection(self._collection)["fields"]}
        facts = rows[0]["facts"] if rows else None
        if not isinstance(facts, dict) or facts.get("kind") != KIND or not isinstance(facts.get("dim"), int):
            raise SearchIndexError(f"collection {self._facts_collection!r} at {where} holds no diffcse index facts")
        if facts.get("format", 0) > FORMAT:
            raise SearchIndexError(
                f"index {self._collection!r} at {where} has format {facts['format']}, newer than this diffcse "
                f"reads ({FORMAT}): upgrade diffcse"
            )
        vector = fields.get("vector")
        if vector is None or int(vector.get("params", {}).get("dim", -1)) != facts["dim"]:
            raise SearchIndexError(
                f"collection {self._collection!r} at {where} does not have the {facts['dim']}-dimensional "
                "vector field its facts record"
            )
        # Ids at or past next_id mean a writer stored rows without its facts (another writer, or a
        # bug): continue after them rather than reuse them.
        with self._engine("open"):
            later = self._client.query(
                self._collection, filter=f"id >= {int(facts['next_id'])}", output_fields=["id"],
                limit=MAX_TOP_K, consistency_level=CONSISTENCY,
            )
        if later:
            facts["next_id"] = max(int(row["id"]) for row in later) + 1
        return facts

    def _write_facts(self, facts: dict) -> None:
        """Store the facts row (an upsert replaces the previous one)."""
        with self._engine("write index facts"):
            self._client.upsert(self._facts_collection, [{"key": FACTS_KEY, "facts": facts, "vector": [0.0, 0.0]}])

    # ----------------------------------------------------------------- engine calls

    @contextmanager
    def _engine(self, what: str) -> Iterator[None]:
        """Turn the engine's errors into MilvusEngineError naming the operation and the index."""
        if self._closed:
            raise SearchIndexError(f"Milvus index {self._collection!r} is closed")
        from pymilvus.exceptions import MilvusException

        try:
            yield
        except MilvusException as err:
            raise MilvusEngineError(
                f"Milvus {what} failed on collection {self._collection!r} at {_shown(self._uri)}: {_message(err)}"
            ) from err

    def _query(self, expr: str, fields: list[str]) -> list[dict]:
        """Rows matching expr, strongly consistent (expr selects at most ID_BATCH rows)."""
        with self._engine("query"):
            return list(self._client.query(
                self._collection, filter=expr, output_fields=fields, consistency_level=CONSISTENCY
            ))

    def _ids_for_docs(self, doc_ids: Sequence[str]) -> dict[str, int]:
        """The internal id of each given document id that exists (the newest, should a crash have left two)."""
        found: dict[str, int] = {}
        for start in range(0, len(doc_ids), ID_BATCH):
            chunk = doc_ids[start : start + ID_BATCH]
            for row in self._query(f"doc_id in [{', '.join(map(_literal, chunk))}]", ["id", "doc_id"]):
                found[row["doc_id"]] = max(int(row["id"]), found.get(row["doc_id"], -1))
        return found

    def _reserve(self, n: int) -> list[int]:
        """Allocate n new ids; the next id is stored first, so a crash after it skips ids but never reuses them."""
        start = int(self._facts["next_id"])
        self._write_facts({**self._facts, "next_id": start + n})
        self._facts["next_id"] = start + n
        return list(range(start, start + n))

    def _insert(
        self, ids: list[int], vecs: np.ndarray, texts: list[str], metas: list[dict | None], doc_ids: list[str] | None
    ) -> None:
        """Insert rows in batches; a failure deletes what this call inserted before raising."""
        try:
            with self._engine("insert"):
                for start in range(0, len(ids), INSERT_BATCH):
                    stop = min(start + INSERT_BATCH, len(ids))
                    self._client.insert(self._collection, [
                        {
                            "id": ids[i], "vector": vecs[i], "text": texts[i],
                            "doc_id": doc_ids[i] if doc_ids is not None else None,
                            "metadata": metas[i], "types": type_tags(metas[i]),
                        }
                        for i in range(start, stop)
                    ])
        except Exception as err:
            self._undo(ids, err)
            if isinstance(err, SearchIndexError):
                raise
            # pymilvus checks rows itself (e.g. JSON it cannot encode) before any engine call.
            raise SearchIndexError(f"Milvus insert into {self._collection!r} refused the rows: {_message(err)}") from err

    def _undo(self, ids: list[int], err: BaseException) -> None:
        """Best effort: remove the rows a failed write inserted."""
        try:
            with self._engine("undo a failed insert"):
                for start in range(0, len(ids), ID_BATCH):
                    self._client.delete(self._collection, ids=ids[start : start + ID_BATCH])
        except Exception as undo_err:  # noqa: BLE001 - the first error is the one to report
            log.error("could not undo a partial Milvus insert after %s: %s", err, undo_err)

    # ----------------------------------------------------------------- encoder

    def attach_encoder(self, encoder: Encoder) -> None:
        """Use encoder for text queries/adds; refuses one of another model or dimension."""
        model = self._facts.get("model")
        if model is None:
            if encoder.dim != self.dim:
                raise IndexMismatchError(
                    f"encoder {encoder.name_or_path} gives dimension {encoder.dim} but the index has dimension {self.dim}"
                )
            with self._write_lock:
                self._write_facts({**self._facts, "model": _model_info(encoder)})
                self._facts["model"] = _model_info(encoder)
        else:
            _check_encoder(Manifest(dim=self.dim, kind="flat", model=model), encoder, self._collection)
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        """The attached encoder; an error if the index was opened without one."""
        if self._encoder is None:
            raise SearchIndexError(
                "this index has no encoder: pass encoder= to MilvusIndex.create()/open(), or call attach_encoder()"
            )
        return self._encoder

    # ----------------------------------------------------------------- writes

    def add_vectors(
        self, vectors: np.ndarray, texts: Sequence[str], metadata: Sequence[dict | None] | None = None
    ) -> list[int]:
        """Add vectors with their texts (and optional metadata dicts); returns the new ids."""
        texts = _check_texts(texts, "text")
        vecs = _check_vectors(vectors, self.dim, "added")
        if len(vecs) != len(texts):
            raise SearchIndexError(f"got {len(vecs)} vectors for {len(texts)} texts")
        metas = _metadata(metadata, len(texts))
        _check_text_bytes(texts)
        if not texts:
            return []
        with self._write_lock:
            ids = self._reserve(len(texts))
            self._insert(ids, vecs, texts, metas, None)
        return ids

    def _check_new(self, texts: list[str], metas: list[dict | None]) -> None:
        """Refuse bad texts or metadata before any encoding, with Milvus's text size limit."""
        _metadata(metas, len(texts))
        _check_text_bytes(texts)

    def upsert_vectors(
        self, ids: Sequence[str], vectors: np.ndarray, texts: Sequence[str], metadata: Sequence[dict | None] | None = None,
    ) -> UpsertResult:
        """Insert or replace documents by the user's ids; a replaced document gets a new internal id.

        A repeated id counts once, with its last text (as if the upserts ran one after another).
        """
        doc_ids = check_doc_ids(ids)
        texts = _check_texts(texts, "text")
        vecs = _check_vectors(vectors, self.dim, "added")
        if len(doc_ids) != len(texts):
            raise SearchIndexError(f"got {len(doc_ids)} doc ids for {len(texts)} texts")
        if len(vecs) != len(texts):
            raise SearchIndexError(f"got {len(vecs)} vectors for {len(texts)} texts")
        metas = _metadata(metadata, len(texts))
        _check_text_bytes(texts)
        if not texts:
            return UpsertResult([], 0, 0)
        keep = sorted({doc: i for i, doc in enumerate(doc_ids)}.values())
        docs = [doc_ids[i] for i in keep]
        with self._write_lock:
            old = self._ids_for_docs(docs)
            new = self._reserve(len(keep))
            self._insert(new, vecs[keep], [texts[i] for i in keep], [metas[i] for i in keep], docs)
            if old:
                try:
                    # By doc id and below the new ids: also clears a duplicate a crash may have left.
                    self._delete_where([d for d in docs if d in old], f"id < {new[0]}")
                except Exception as err:
                    self._undo(new, err)
                    raise
        by_doc = dict(zip(docs, new, strict=True))
        return UpsertResult([by_doc[doc] for doc in doc_ids], len(keep) - len(old), len(old))

    def _delete_where(self, doc_ids: list[str], extra: str | None = None) -> None:
        """Delete every row of the given document ids (and extra, AND-ed)."""
        with self._engine("delete"):
            for start in range(0, len(doc_ids), ID_BATCH):
                expr = f"doc_id in [{', '.join(map(_literal, doc_ids[start : start + ID_BATCH]))}]"
                self._client.delete(self._collection, filter=f"{expr} and {extra}" if extra else expr)

    def delete(self, ids: Sequence[int]) -> int:
        """Remove items by internal id; returns how many existed. Unknown ids are ignored."""
        wanted = list(dict.fromkeys(int(i) for i in ids))
        with self._write_lock:
            present: list[int] = []
            for start in range(0, len(wanted), ID_BATCH):
                chunk = wanted[start : start + ID_BATCH]
                present += [int(row["id"]) for row in self._query(f"id in [{', '.join(map(str, chunk))}]", ["id"])]
            with self._engine("delete"):
                for start in range(0, len(present), ID_BATCH):
                    self._client.delete(self._collection, ids=present[start : start + ID_BATCH])
        return len(present)

    def delete_ids(self, ids: Sequence[str]) -> int:
        """Remove documents by the user's ids; returns how many existed. Unknown ids are ignored."""
        doc_ids = list(dict.fromkeys(check_doc_ids(ids)))
        with self._write_lock:
            found = self._ids_for_docs(doc_ids)
            if found:
                self._delete_where(list(found))
        return len(found)

    # ----------------------------------------------------------------- reads

    @overload
    def search(self, queries: str, top_k: int = ..., threshold: float | None = ..., where: dict | None = ...,
               mode: str = ...) -> list[SearchResult]: ...
    @overload
    def search(self, queries: Sequence[str], top_k: int = ..., threshold: float | None = ..., where: dict | None = ...,
               mode: str = ...) -> list[list[SearchResult]]: ...

    def search(
        self,
        queries: str | Sequence[str],
        top_k: int = 10,
        threshold: float | None = None,
        where: dict | None = None,
        mode: str = "dense",
    ) -> list[SearchResult] | list[list[SearchResult]]:
        """Top-k stored texts per query by cosine among those whose metadata passes `where`; one query -> one list."""
        if mode != "dense":
            raise SearchIndexError(
                f"mode {mode!r}: the Milvus engine backend supports mode 'dense' only "
                "(lexical and hybrid search need SearchIndex)"
            )
        single = isinstance(queries, str)
        batch = _check_texts([queries] if single else list(queries), "query")
        if not batch:
            raise EmptyQueryError("no queries given")
        _check_search_args(top_k, threshold)
        # Bad arguments fail before any encoding.
        milvus_filter(where)
        vecs = self.encoder.encode(batch, normalize=True)
        results = self.search_vectors(vecs, top_k=top_k, threshold=threshold, where=where)
        return results[0] if single else results

    def search_vectors(
        self, queries: np.ndarray, top_k: int = 10, threshold: float | None = None, where: dict | None = None
    ) -> list[list[SearchResult]]:
        """Top-k hits per query vector (normalised here), scores descending, each >= threshold, metadata passing `where`."""
        q = _check_vectors(queries, self.dim, "query")
        if len(q) == 0:
            raise EmptyQueryError("no query vectors given")
        _check_search_args(top_k, threshold)
        expr = milvus_filter(where)
        with self._engine("search"):
            found = self._client.search(
                self._collection, data=list(q), anns_field="vector", limit=top_k, filter=expr or "",
                output_fields=OUTPUT_FIELDS, search_params={"metric_type": "IP"}, consistency_level=CONSISTENCY,
            )
        out: list[list[SearchResult]] = []
        for hits in found:
            row = [
                SearchResult(int(hit["id"]), hit["entity"]["text"], float(hit["distance"]), hit["entity"].get("metadata"),
                             hit["entity"].get("doc_id"))
                for hit in hits
                if threshold is None or float(hit["distance"]) >= threshold
            ]
            row.sort(key=lambda r: -r.score)
            out.append(row)
        return out

    def get(self, ids: Sequence[int]) -> dict[int, tuple[str, dict | None]]:
        """Stored (text, metadata) for the internal ids that exist."""
        wanted = list(dict.fromkeys(int(i) for i in ids))
        out: dict[int, tuple[str, dict | None]] = {}
        for start in range(0, len(wanted), ID_BATCH):
            chunk = wanted[start : start + ID_BATCH]
            for row in self._query(f"id in [{', '.join(map(str, chunk))}]", ["id", "text", "metadata"]):
                out[int(row["id"])] = (row["text"], row.get("metadata"))
        return out

    def get_docs(self, ids: Sequence[str]) -> dict[str, SearchResult]:
        """The stored documents under the user's ids that exist (score 0.0: no query involved)."""
        doc_ids = list(dict.fromkeys(check_doc_ids(ids)))
        rows: dict[str, dict] = {}
        for start in range(0, len(doc_ids), ID_BATCH):
            expr = f"doc_id in [{', '.join(map(_literal, doc_ids[start : start + ID_BATCH]))}]"
            for row in self._query(expr, ["id", *OUTPUT_FIELDS]):
                # The newest, should a crash mid-upsert have left two rows of one document.
                if row["doc_id"] not in rows or int(row["id"]) > int(rows[row["doc_id"]]["id"]):
                    rows[row["doc_id"]] = row
        return {
            doc: SearchResult(int(rows[doc]["id"]), rows[doc]["text"], 0.0, rows[doc].get("metadata"), doc)
            for doc in doc_ids
            if doc in rows
        }

    # ----------------------------------------------------------------- info

    def _count(self, expr: str = "") -> int:
        """Rows matching expr (all rows when empty), strongly consistent."""
        with self._engine("count"):
            rows = self._client.query(
                self._collection, filter=expr, output_fields=["count(*)"], consistency_level=CONSISTENCY
            )
        return int(rows[0]["count(*)"]) if rows else 0

    def __len__(self) -> int:
        """Number of live (not deleted) items."""
        return self._count()

    @property
    def kind(self) -> str:
        """Always 'milvus' (SearchIndex's are flat, ivf, hnsw, ...)."""
        return KIND

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self._facts["dim"])

    def stats(self) -> dict:
        """Counts, dimension, model and engine facts, like SearchIndex.stats()."""
        import pymilvus

        return {
            "kind": KIND,
            "count": self._count(),
            "doc_ids": self._count("doc_id is not null"),
            "dim": self.dim,
            "metric": "cosine (inner product on L2-normalised vectors)",
            "next_id": int(self._facts["next_id"]),
            "model": dict(self._facts["model"]) if self._facts.get("model") else None,
            "uri": _shown(self._uri),
            "collection": self._collection,
            "engine": "milvus-lite (embedded)" if self._local else "milvus server",
            "index_type": "FLAT",
            "consistency": CONSISTENCY,
            "pymilvus": pymilvus.__version__,
        }

    def close(self) -> None:
        """Disconnect; an embedded Milvus Lite stops when the last index using its path closes."""
        if self._closed:
            return
        self._closed = True
        _close_client(self._client, self._local)

    def __enter__(self) -> MilvusIndex:
        """Use as a context manager; close() on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the connection."""
        self.close()


# --------------------------------------------------------------------- helpers


def _check_collection(name: object) -> None:
    """A collection name Milvus accepts (letters, digits, '_'; not starting with a digit)."""
    if not isinstance(name, str) or not COLLECTION_RE.fullmatch(name):
        raise SearchIndexError(
            f"collection must be letters, digits and '_' (not first), at most 201 characters, got {name!r}"
        )


def _check_search_args(top_k: object, threshold: object) -> None:
    """SearchIndex's checks, plus Milvus's cap on top_k."""
    SearchIndex._check_search_args(top_k, threshold)
    assert isinstance(top_k, int)
    if top_k > MAX_TOP_K:
        raise SearchIndexError(f"top_k must be at most {MAX_TOP_K} with the Milvus backend, got {top_k}")


def _metadata(metadata: Sequence[dict | None] | None, n: int) -> list[dict | None]:
    """Metadata checked as SearchIndex checks it, as plain JSON values (what the engine stores)."""
    return [None if text is None else json.loads(text) for text in _encode_metadata(metadata, n)]


def _check_text_bytes(texts: Sequence[str]) -> None:
    """Milvus stores a text in a VARCHAR of at most MAX_TEXT_BYTES UTF-8 bytes."""
    for i, text in enumerate(texts):
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise SearchIndexError(f"text #{i} is not valid Unicode (a lone surrogate)") from None
        if size > MAX_TEXT_BYTES:
            raise SearchIndexError(f"text #{i} has {size} UTF-8 bytes; the Milvus backend stores at most {MAX_TEXT_BYTES}")


def _close_client(client: MilvusClient, local: str | None) -> None:
    """Close a client and release its embedded engine (best effort: closing must not raise)."""
    try:
        client.close()
    except Exception as err:  # noqa: BLE001
        log.warning("closing the Milvus client failed: %s", err)
    if local is not None:
        try:
            _release_local(local)
        except Exception as err:  # noqa: BLE001
            log.warning("stopping Milvus Lite at %s failed: %s", local, err)
