"""Encode-and-search: faiss index + SQLite text store + manifest, with a CLI and an HTTP service."""

from __future__ import annotations

from diffcse.search.errors import (
    CorruptIndexError,
    EmptyQueryError,
    FilterError,
    IndexConflictError,
    IndexFormatError,
    IndexLockedError,
    IndexMismatchError,
    SearchIndexError,
)
from diffcse.search.index import SearchIndex, SearchResult, UpsertResult, reciprocal_rank_fusion
from diffcse.search.manifest import FORMAT_VERSION, KINDS, Manifest, read_manifest
from diffcse.search.rwlock import index_lock, lock_holder

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "CorruptIndexError",
    "EmptyQueryError",
    "FilterError",
    "IndexConflictError",
    "IndexFormatError",
    "IndexLockedError",
    "IndexMismatchError",
    "Manifest",
    "SearchIndex",
    "SearchIndexError",
    "SearchResult",
    "UpsertResult",
    "index_lock",
    "lock_holder",
    "read_manifest",
    "reciprocal_rank_fusion",
]
