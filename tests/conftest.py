"""Shared fixtures: the real data folder and tiny seeded models built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from debias_plugin.paths import CHECKOUT_DATA_DIR  # the one data-folder default, shared with the CLI

os.environ.setdefault("DEBIAS_DATA_DIR", str(CHECKOUT_DATA_DIR))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["DEBIAS_DATA_DIR"])
    if not (path / "crows_pairs").is_dir():
        pytest.fail(f"DEBIAS_DATA_DIR={path} does not hold the benchmark files (expected ../shared/data)")
    return path


@pytest.fixture(scope="session")
def tokenizer_texts(data_dir) -> list[str]:
    """Text to train the tiny BPE tokenizers on: CrowS sentences plus a WikiText slice."""
    from debias_plugin.data import load_crows_pairs, load_wikitext_documents

    pairs = load_crows_pairs()
    texts = [p.sent_more for p in pairs] + [p.sent_less for p in pairs]
    return texts + load_wikitext_documents()[0].split("\n")[:400]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_texts):
    """tiny_model("gpt2") -> folder of a seeded 2-layer model with its tokenizer (built once per kind)."""
    from tiny_models import build_tiny_model

    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_tiny_model(kind, root / kind, tokenizer_texts)
        return built[kind]

    return get
