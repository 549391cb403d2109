"""Errors of the search index; each message names the file, field or input that caused it."""

from __future__ import annotations


class SearchIndexError(ValueError):
    """Base class: a search index or a request to it is unusable as given."""


class IndexMismatchError(SearchIndexError):
    """The index was built with another model or another dimension than the encoder given."""


class CorruptIndexError(SearchIndexError):
    """A file of the index directory is missing, truncated or does not match its checksum."""


class IndexFormatError(SearchIndexError):
    """The manifest is unreadable, lacks a field, or comes from a newer format version."""


class EmptyQueryError(SearchIndexError):
    """A query is empty (no queries, or an empty / whitespace-only text, or a zero vector)."""


class IndexLockedError(SearchIndexError):
    """Another writer holds the index directory's lock and did not let go within the timeout."""


class IndexConflictError(SearchIndexError):
    """Another process saved the index since this copy was loaded, and this copy has unsaved changes."""


class FilterError(SearchIndexError):
    """A metadata filter (`where`) names a bad field, operator or value."""
