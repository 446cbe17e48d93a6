"""Errors that reach the user as one line (exit code 2) instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it. CLI exit code 2."""


def require(cond: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise UserError(message)


class RunFailure(Exception):
    """A failure that is not a bug and needs no traceback (a full disk, another run holding the output):
    the message says what happened and what to do. CLI exit code 1."""
