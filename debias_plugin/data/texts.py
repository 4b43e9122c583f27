"""Plain text corpora and WikiText for perplexity and fine-tuning."""

from __future__ import annotations

from pathlib import Path

from debias_plugin.data._io import csv_rows, jsonl_rows, read_text
from debias_plugin.errors import DataError
from debias_plugin.paths import data_file

WIKITEXT_RELATIVE_PATH = "wikitext2/wiki.test.raw"


def load_texts(path: str | Path, column: str | None = None, where: dict[str, str] | None = None) -> list[str]:
    """Texts from .txt (one per non-empty line), .csv/.tsv or .jsonl (the named column, default 'text').

    `where` keeps only the rows whose columns equal the given values (e.g. {"split": "dev"}); tabular files only.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(path, "path", "an existing text, CSV or JSONL file", "no such file")
    suffix = path.suffix.lower()
    column = column or "text"
    where = where or {}
    fields = [column, *where]
    if suffix in (".csv", ".tsv"):
        rows = csv_rows(path, fields, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json"):
        rows = jsonl_rows(path)
    elif where:
        raise DataError(path, "file type", "a .csv, .tsv or .jsonl file to filter rows with --where", suffix)
    else:
        rows = ((number, {column: line}) for number, line in enumerate(read_text(path).splitlines(), start=1))
    texts = []
    for line, row in rows:
        for name in fields:
            if name not in row:
                raise DataError(path, f"line {line}", f"a field '{name}'", f"fields {sorted(row)}")
        if any(str(row[name]) != value for name, value in where.items()):
            continue
        text = "" if row[column] is None else row[column]
        if not isinstance(text, str):
            raise DataError(path, f"line {line}, field '{column}'", "a string", type(text).__name__)
        if text.strip():
            texts.append(text.strip())
    if not texts:
        condition = " with " + ", ".join(f"{k}={v}" for k, v in where.items()) if where else ""
        raise DataError(path, f"column '{column}'", f"at least one non-empty text{condition}", "none")
    return texts


def split_wikitext_documents(raw: str) -> list[str]:
    """Split raw WikiText into articles at top-level ' = Title = ' lines, as EleutherAI/wikitext_document_level does."""
    documents, current = [], []
    for line in raw.split("\n"):
        normalised = line.replace("= = =", "===").replace("= =", "==").strip()
        if normalised.startswith("= ") and normalised.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                documents.append(page)
            current = []
        current.append(line)
    documents.append("\n".join(current))
    return documents


def load_wikitext_documents(path: str | Path | None = None) -> list[str]:
    """WikiText-2 test articles: explicit raw file > $DEBIAS_DATA_DIR > ../shared/data > the download cache."""
    return split_wikitext_documents(read_text(data_file(path, WIKITEXT_RELATIVE_PATH, "WikiText-2")))
