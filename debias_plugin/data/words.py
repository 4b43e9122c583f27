"""Bias attribute word lists (bias-bench's bias_attribute_words.json layout)."""

from __future__ import annotations

from pathlib import Path

from debias_plugin.data._io import json_document
from debias_plugin.errors import DataError
from debias_plugin.paths import data_file

ATTRIBUTE_WORDS_RELATIVE_PATH = "bias_attribute_words.json"


def load_attribute_words(path: str | Path | None = None) -> dict[str, list[list[str]]]:
    """Domain -> list of word tuples (e.g. gender: [["actor", "actress"], ...])."""
    path = data_file(path, ATTRIBUTE_WORDS_RELATIVE_PATH, "Bias attribute words")
    document = json_document(path)
    if not isinstance(document, dict) or not document:
        raise DataError(path, "top level", "an object mapping a domain to lists of words")
    for domain, groups in document.items():
        if not isinstance(groups, list) or not all(
            isinstance(group, list) and group and all(isinstance(word, str) and word for word in group)
            for group in groups
        ):
            raise DataError(path, f"field '{domain}'", "a list of non-empty lists of words")
    return document


def domain_words(words: dict[str, list[list[str]]], domain: str, path: str = "word list") -> set[str]:
    """All words of one domain, flattened."""
    if domain not in words:
        raise DataError(path, f"field '{domain}'", f"one of the domains {sorted(words)}", "no such domain")
    return {word for group in words[domain] for word in group}
