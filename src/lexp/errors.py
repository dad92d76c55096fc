"""Error types whose messages tell the user what went wrong and how to fix it."""

from __future__ import annotations


class LexpInputError(ValueError):
    """Bad input data or configuration: the message names the file, the line and the fix."""


class LexpModelError(RuntimeError):
    """A model or tokenizer could not be loaded: the message says what was tried and the fix."""
