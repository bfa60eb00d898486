"""Typed errors. Every error the CLI prints as one `error:` line derives from `CnncError`.

Exit codes: 1 for an equivalence failure, 2 for bad input or usage; anything else that escapes is a bug in cnnc
and the CLI reports it as an internal error with exit code 3.
"""

from __future__ import annotations


class CnncError(Exception):
    """Base class of the errors cnnc reports to its users."""

    exit_code = 2


class ModelError(CnncError):
    """The input model is unreadable, malformed, unsafe or unsupported."""


class UsageError(CnncError):
    """An option or argument is invalid (unknown pass, bad pass option, bad input shape...)."""


class EquivalenceError(CnncError):
    """The compiled model does not compute the same function as the original within tolerance."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}
