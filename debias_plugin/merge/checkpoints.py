"""What a negation must know about its input folders, read from safetensors headers and JSON configs only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from debias_plugin.data._io import json_document
from debias_plugin.errors import DataError, DebiasError
from debias_plugin.models import check_weights

FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors code -> torch name


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    dtype: str
    shape: tuple[int, ...]
    file: str


def read_json(path: Path) -> dict:
    """A JSON object file; bad JSON is a DataError with its line."""
    data = json_document(path)
    if not isinstance(data, dict):
        raise DataError(path, "top level", "a JSON object", type(data).__name__)
    return data


def file_tensors(path: Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes in one .safetensors file; safetensors also checks the data is all there."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: TensorInfo(s.get_dtype(), tuple(s.get_shape()), path.name)
                    for name in handle.keys() for s in [handle.get_slice(name)]}
    except SafetensorError as err:  # a truncated file fails here: the header promises more bytes than exist
        raise DataError(path, "header", "a complete safetensors file", f"{err} (truncated or corrupt?)") from None


def model_tensors(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder (model.safetensors or its sharded index), from the headers only."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DebiasError(f"{model_dir}: no such folder; expected a Hugging Face model folder.")
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise DebiasError(f"{model_dir} is a peft adapter, not a full model: pass it with --adapter.")
    check_weights(model_dir)  # config.json present, and not pickle-only
    read_json(model_dir / "config.json")  # a broken config.json is named here, not deep inside mergekit
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        return _sharded_tensors(model_dir, index_path)
    if (model_dir / "model.safetensors").is_file():
        return file_tensors(model_dir / "model.safetensors")
    found = sorted(path.name for path in model_dir.glob("*.safetensors"))
    raise DebiasError(f"{model_dir}: no model.safetensors or model.safetensors.index.json (found {found}); mergekit "
                      "reads only those names. Re-save the model with save_pretrained(safe_serialization=True).")


def _sharded_tensors(model_dir: Path, index_path: Path) -> dict[str, TensorInfo]:
    """Tensors of a sharded checkpoint; a shard the index lists but the folder lacks is an error."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DataError(index_path, "weight_map", "a JSON object mapping tensor names to shard files")
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (model_dir / name).is_file()]
    if missing:
        raise DebiasError(
            f"{index_path} lists {len(missing)} shard(s) missing from {model_dir}: {', '.join(missing[:5])}. "
            "The checkpoint is incomplete (interrupted download or copy?); nothing was written."
        )
    tensors = {name: info for shard in shards for name, info in file_tensors(model_dir / shard).items()}
    for name, shard in weight_map.items():
        if name not in tensors or tensors[name].file != shard:
            raise DataError(index_path, f"weight_map entry {name!r}", f"a tensor stored in {shard}",
                            "no such tensor in that shard")
    return tensors


def _describe(config: dict) -> str:
    return f"{'/'.join(config.get('architectures') or ['?'])} (model_type {config.get('model_type')!r})"


def check_same_model(base_dir: Path, other_dir: Path, base_tensors: dict[str, TensorInfo],
                     other_tensors: dict[str, TensorInfo], role: str = "biased model") -> None:
    """A bias vector only exists between two checkpoints of one model: same architecture, names and shapes."""
    base_config, other_config = read_json(base_dir / "config.json"), read_json(other_dir / "config.json")
    for key in ("model_type", "architectures"):
        if base_config.get(key) != other_config.get(key):
            raise DebiasError(
                f"Mismatched architectures: the base {base_dir} is {_describe(base_config)} but the {role} "
                f"{other_dir} is {_describe(other_config)}. Negation needs two checkpoints of the same model."
            )
    base_tied = base_config.get("tie_word_embeddings", True)
    if base_tied != other_config.get("tie_word_embeddings", True):
        raise DebiasError(
            f"tie_word_embeddings differs: {base_tied} in {base_dir}/config.json but "
            f"{not base_tied} in {other_dir}/config.json. With one tied and one untied output embedding the "
            "merged lm_head would be silently replaced by the input embedding on load (mergekit #464)."
        )
    missing = sorted(set(base_tensors) - set(other_tensors))
    extra = sorted(set(other_tensors) - set(base_tensors))
    if missing or extra:
        raise DebiasError(
            f"The {role} {other_dir} and the base {base_dir} hold different tensors "
            f"(missing from the {role}: {missing[:5]}; only in the {role}: {extra[:5]}). "
            "Save both with the same transformers save_pretrained, or check that they are the same model."
        )
    wrong = [(name, base_tensors[name].shape, other_tensors[name].shape) for name in sorted(base_tensors)
             if base_tensors[name].shape != other_tensors[name].shape]
    if wrong:
        name, base_shape, other_shape = wrong[0]
        raise DebiasError(
            f"Tensor shapes differ between the base {base_dir} and the {role} {other_dir}: {len(wrong)} tensor(s), "
            f"e.g. {name} is {list(base_shape)} in the base but {list(other_shape)} in the {role} "
            "(a resized vocabulary or another model size?)."
        )


def check_adapter(base_dir: Path, base_tensors: dict[str, TensorInfo], adapter_dir: Path) -> None:
    """A LoRA adapter fits the base when every module it targets exists there with matching dimensions."""
    if not adapter_dir.is_dir():
        raise DebiasError(f"{adapter_dir}: no such folder; expected a peft adapter folder.")
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise DebiasError(f"{adapter_dir}: no adapter_config.json; expected a peft adapter folder "
                          "(for a full fine-tuned model use --biased).")
    read_json(config_path)  # bad JSON is named with its line; peft's PeftConfig then reads the fields
    from peft import PeftConfig

    try:
        peft_type = str(PeftConfig.from_pretrained(str(adapter_dir)).peft_type.value)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(config_path, "peft_type", "a peft adapter config (peft_type 'LORA')", repr(err)) from None
    if peft_type != "LORA":
        raise DataError(config_path, "peft_type", "'LORA' (only LoRA adapters merge into the base weights)",
                        repr(peft_type))
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = " (only adapter_model.bin, a pickle, which can run code when loaded; convert it to safetensors)"
        raise DebiasError(f"{adapter_dir}: no adapter_model.safetensors"
                          f"{pickled if (adapter_dir / 'adapter_model.bin').is_file() else ''}.")
    dims: dict[str, dict[str, int]] = {}
    for name, info in file_tensors(weights).items():
        stem = name.removeprefix("base_model.model.")
        match = re.match(r"(.+)\.lora_(?:embedding_)?([AB])(?:(?:\.[^.]+)?\.weight)?$", stem)
        if match is None:  # modules_to_save and other full tensors replace base tensors one for one
            if stem not in base_tensors or base_tensors[stem].shape != info.shape:
                raise DebiasError(
                    f"{weights}: tensor {name} {list(info.shape)} has no counterpart of that shape in the base "
                    f"{base_dir}; the adapter was trained on another model."
                )
            continue
        module, side = match.groups()
        if module + ".weight" not in base_tensors:
            raise DebiasError(
                f"Mismatched architectures: the adapter {adapter_dir} targets {module}, which the base {base_dir} "
                f"does not have (no tensor {module}.weight); the adapter was trained on another model."
            )
        dims.setdefault(module, {})["in" if side == "A" else "out"] = info.shape[-1] if side == "A" else info.shape[0]
    for module, found in dims.items():
        base_shape = base_tensors[module + ".weight"].shape
        if len(base_shape) == 2 and len(found) == 2 and sorted(found.values()) != sorted(base_shape):
            raise DebiasError(
                f"Tensor shapes differ: the adapter {adapter_dir} maps {found['in']} -> {found['out']} features "
                f"at {module}, but the base {base_dir} has {module}.weight of shape {list(base_shape)}."
            )
    if not dims:
        raise DebiasError(f"{weights}: no lora_A/lora_B tensors; nothing to negate.")


def architecture_mode(base_dir: Path, base_tensors: dict[str, TensorInfo]) -> str:
    """'json' when mergekit's bundled description covers exactly the checkpoint's tensors, else 'inferred'/'forced'.

    mergekit writes only the tensors its JSON lists and requires the non-optional ones; for BertForMaskedLM it
    wants a pooler MLM checkpoints lack and omits the MLM head's transform: then mergekit must infer the layout."""
    from mergekit.architecture import arch_info_for_config
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    except Exception as err:  # remote-code configs, unknown model types: all mean we cannot plan the merge
        raise DebiasError(f"{base_dir}/config.json cannot be loaded without remote code ({err}).") from None
    try:
        arch = arch_info_for_config(config)
    except RuntimeError:
        return "forced"
    if arch is None:
        return "inferred"
    names, covered = set(base_tensors), set()
    for weight in arch.all_weights(config):
        own = [n for n in (weight.name, *(weight.aliases or ())) if n in names]
        tied = [n for n in (weight.tied_names or ()) if n in names]
        if not own and not tied and not weight.optional:
            return "forced"
        covered.update(own)
    return "json" if covered == names else "forced"


def base_dtype(base_dir: Path, base_tensors: dict[str, TensorInfo]) -> str:
    """The dtype to store the result in: the base config's, else its first floating tensor's."""
    config = read_json(base_dir / "config.json")
    declared = str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch.")
    if declared in FLOAT_DTYPES.values():
        return declared
    floats = [FLOAT_DTYPES[i.dtype] for i in base_tensors.values() if i.dtype in FLOAT_DTYPES]
    return floats[0] if floats else "float32"
