"""The one error type for bad user input: the message names the file, line, option or field."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message names the file and line, or the option or field, at fault."""
