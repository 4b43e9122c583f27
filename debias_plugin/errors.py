"""One error family, so the CLI can print a paragraph instead of a traceback."""

from __future__ import annotations

import errno
import re
import traceback
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
        found_text = "" if found is None else f", found {found}"
        super().__init__(f"{self.path}, {where}: expected {expected}{found_text}.")


def one_line(err: BaseException, limit: int = 500) -> str:
    """A library's message as one line of at most `limit` characters, to quote inside our own paragraph."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def describe_library_error(err: BaseException) -> str:
    """One paragraph for an exception raised inside a library we call: what, where it came from, the file."""
    frames = traceback.extract_tb(err.__traceback__)
    origin = next((part for frame in reversed(frames) for part in Path(frame.filename).parts[-4:]
                   if part in _LIBRARIES), None)
    message = one_line(err, 800) or type(err).__name__
    hints = {errno.ENOSPC: " The disk is full: free space or write elsewhere; nothing was published.",
             errno.EACCES: " Permission denied: choose a location you can write.",
             errno.EROFS: " The file system is read-only: choose another location."}
    if isinstance(err, OSError):
        target = " -> ".join(str(name) for name in (err.filename, err.filename2) if name)
        reason = err.strerror or message
        return f"{target + ': ' if target else ''}{reason}.{hints.get(err.errno, '')}"
    code = re.search(r"os error (\d+)", message)  # OS errors wrapped by Rust-backed libraries (safetensors)
    if code and int(code.group(1)) in hints:
        return f"{message}.{hints[int(code.group(1))]}"
    source = f" in {origin}" if origin else ""
    return (f"{type(err).__name__}{source}: {message} (set DEBIAS_DEBUG=1 to see the traceback; if the input "
            "looks right, please report it).")


_LIBRARIES = ("transformers", "safetensors", "torch", "lm_eval", "mergekit", "peft", "accelerate", "datasets",
              "tokenizers", "yaml", "optuna", "json", "csv")
