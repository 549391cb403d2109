"""Encode-and-search: faiss index + SQLite text store + manifest, with a CLI and an HTTP service."""

from __future__ import annotations

from diffcse.search.errors import (
    CorruptIndexError,
    EmptyQueryError,
    IndexFormatError,
    IndexMismatchError,
    SearchIndexError,
)
from diffcse.search.index import SearchIndex, SearchResult
from diffcse.search.manifest import FORMAT_VERSION, KINDS, Manifest, read_manifest

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "CorruptIndexError",
    "EmptyQueryError",
    "IndexFormatError",
    "IndexMismatchError",
    "Manifest",
    "SearchIndex",
    "SearchIndexError",
    "SearchResult",
    "read_manifest",
]
