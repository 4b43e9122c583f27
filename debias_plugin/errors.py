"""One error family, so the CLI can print a paragraph instead of a traceback."""

from __future__ import annotations

from pathlib import Path


class DebiasError(Exception):
    """Any user-facing failure: bad input, bad options, unsafe weights, existing outputs."""


class DataError(DebiasError, ValueError):
    """Malformed input data, always naming the file, the line or field, and what was expected."""

    def __init__(self, path: str | Path, where: str, expected: str, found: str | None = None):
        self.path = str(path)
        self.where = where
        self.expected = expected
        self.found = found
        message = f"{self.path}, {where}: expected {expected}"
        if found is not None:
            message += f", found {found}"
        super().__init__(message + ".")
