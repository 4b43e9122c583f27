"""Small readers shared by the loaders; every failure becomes a DataError naming file and line."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from debias_plugin.errors import DataError


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, f"byte {err.start}", "UTF-8 text") from None
    if not text.strip():
        raise DataError(path, "line 1", "a non-empty file", "an empty file")
    return text


def csv_rows(path: Path, required: list[str], delimiter: str = ",") -> Iterator[tuple[int, dict]]:
    """Yield (line number, row) for a CSV with a header, after checking the required columns."""
    reader = csv.DictReader(read_text(path).splitlines(keepends=True), delimiter=delimiter)
    with _csv_errors(path, reader):
        header = reader.fieldnames or []
    missing = [name for name in required if name not in header]
    if missing:
        raise DataError(
            path, "line 1 (header)", f"column(s) {', '.join(map(repr, required))}",
            f"columns {header} without {', '.join(map(repr, missing))}",
        )
    row = None
    with _csv_errors(path, reader):
        for row in reader:
            # reader.line_num is the last physical line of the record; fine for messages.
            yield reader.line_num, row
    if row is None:
        raise DataError(path, "line 2", "at least one data row after the header", "no rows")


@contextmanager
def _csv_errors(path: Path, reader: csv.DictReader) -> Iterator[None]:
    """csv's own errors (a field over its size limit, a NUL byte) as a DataError naming the file and line."""
    try:
        yield
    except csv.Error as err:
        raise DataError(path, f"line {reader.line_num + 1}",
                        f"a well-formed CSV row (fields of at most {csv.field_size_limit():,} characters)",
                        f"csv: {err}") from None


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, f"line {number}", "one JSON object per line", f"bad JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(path, f"line {number}", "a JSON object", type(row).__name__)
        yield number, row


def json_document(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(path, f"line {err.lineno}", "valid JSON", f"bad JSON ({err.msg})") from None


def require_field(path: Path, where: str, row: dict, field: str):
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(path, f"{where}, field '{field}'", "a non-empty value", "nothing")
    return value
