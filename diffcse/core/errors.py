"""The two kinds of failure a command reports in one line (no traceback): bad input, and a run that failed."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message names the file and line, or the option or field, at fault (exit 2)."""


class RunFailed(RuntimeError):
    """A run that started but could not finish correctly (e.g. training diverged); exit 1."""
