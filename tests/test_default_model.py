"""The built-in model folder goes through OutputFolder: staged, manifested, reused, never half-written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from debias_plugin import default_model
from debias_plugin.errors import DebiasError
from debias_plugin.outputs import MANIFEST_NAME, MANIFEST_SCHEMA


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> tuple[Path, list]:
    """A stand-in GGUF and a converter that writes a minimal finished folder (the real one takes minutes)."""
    gguf = tmp_path / "wheel" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake weights")
    calls = []

    def convert(source: Path, folder: Path) -> int:
        calls.append(folder)
        assert folder.name.startswith(".") and ".tmp-" in folder.name  # written into a hidden staging folder
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(source.read_bytes())
        return 7

    monkeypatch.setitem(default_model.BUILTIN_MODELS, "smollm2-135m",
                        default_model.BuiltinModel("SmolLM2-135M-Instruct", lambda: gguf, "fake"))
    monkeypatch.setattr(default_model, "_convert_gguf", convert)
    return gguf, calls


def test_materialized_once_with_the_shared_manifest(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    out = tmp_path / "cache" / "SmolLM2"
    assert default_model.materialize_default_model(out) == out
    record = json.loads((out / MANIFEST_NAME).read_text())
    assert record["schema"] == MANIFEST_SCHEMA and record["stage"] == "default-model"
    assert record["inputs"] == {"gguf": {"path": str(gguf.resolve()),
                                         "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()}}
    assert record["results"]["parameters"] == 7 and "convert_s" in record["timings"]
    assert [p.name for p in out.parent.iterdir()] == ["SmolLM2"]  # no staging left behind
    assert default_model.materialize_default_model(out) == out and len(calls) == 1  # reused


def test_unfinished_folder_or_a_file_is_refused(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    unfinished = tmp_path / "half"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    for out in (unfinished, gguf, gguf.parent):
        with pytest.raises(DebiasError, match="not a finished model folder"):
            default_model.materialize_default_model(out)
    assert not calls and gguf.read_bytes() == b"GGUF fake weights"


def test_builtin_names_resolve_and_unknown_names_are_refused(fake_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path / "cache"))
    folder = default_model.resolve_model("builtin:smollm2-135m")
    assert folder == default_model.resolve_model("default") == str(tmp_path / "cache" / "SmolLM2-135M-Instruct")
    assert default_model.resolve_model("/some/folder") == "/some/folder"
    with pytest.raises(DebiasError, match="gemma3-270m"):
        default_model.resolve_model("builtin:gpt-5")


def test_the_saved_tokenizer_does_not_record_how_it_was_loaded(tiny_model, tmp_path):
    """Offline loading (HF_HUB_OFFLINE) must not change the folder's content: it keys the evaluation cache."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model("gpt2"), local_files_only=True)
    default_model.save_tokenizer(tokenizer, tmp_path)
    assert "local_files_only" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
