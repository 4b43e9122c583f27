"""Bias-vector negation as mergekit configs: render a merge_configs/ template, validate it, run mergekit lazily.

theta_debiased = theta_base - lambda * (theta_biased - theta_base) is mergekit's ``task_arithmetic`` with one
model at weight -lambda and ``normalize: false`` (mergekit #213). Everything that can be checked is checked
before the first byte is written: lambda, the config's signs, architectures and tensor shapes (read from
safetensors headers, never the tensors). The merge then streams one tensor at a time through mergekit, read
with plain reads and, for tensors as big as an embedding matrix, combined in row blocks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import yaml

from debias_plugin.errors import DataError, DebiasError
from debias_plugin.models import check_weights
from debias_plugin.paths import merge_configs_dir, publish_folder

NEGATION_FORMULA = "theta = base - lambda * (biased - base)"
BASE_PLACEHOLDER = "/path/to/base_model"
BIASED_PLACEHOLDER = "/path/to/biased_model"
ADAPTER_PLACEHOLDER = "/path/to/bias_adapter"
# An architecture name mergekit has no JSON for: it makes mergekit infer the layout from the tensor names.
INFER_ARCHITECTURE = "debias-plugin/infer-from-tensor-names"
MANIFEST_NAME = "debias_manifest.json"
CONFIG_NAME = "mergekit_config.yml"
DEFAULT_SHARD_SIZE = "auto"  # model size / 8, clamped to 100 MB .. 1 GB: mergekit holds one shard in memory
CHUNK_ELEMENTS = 1 << 18  # task_arithmetic on a larger tensor runs in row blocks of about this many elements
# method -> (normalize default, uses a sign election); both from mergekit 0.1.5's registry.
_METHODS = {"task_arithmetic": (False, False), "ties": (True, True)}
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


# ----------------------------------------------------------------------------------------------- headers

@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    dtype: str
    shape: tuple[int, ...]
    file: str


def read_safetensors_header(path: str | Path) -> dict[str, dict]:
    """Names, dtypes, shapes and offsets of a .safetensors file, reading only its JSON header."""
    return read_safetensors_layout(path)[1]


def read_safetensors_layout(path: str | Path) -> tuple[int, dict[str, dict]]:
    """(byte offset where tensor data starts, header without __metadata__) of a .safetensors file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise DataError(path, "first 8 bytes", "a safetensors header length", f"a {len(prefix)}-byte file")
            (size,) = struct.unpack("<Q", prefix)
            if size > _MAX_HEADER_BYTES:
                raise DataError(path, "header length", "a safetensors header (< 100 MB)", f"{size} bytes")
            header = json.loads(handle.read(size))
    except OSError as err:
        raise DebiasError(f"{path}: cannot be read ({err.strerror}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(path, "header", "a JSON safetensors header", "unreadable bytes") from None
    if not isinstance(header, dict):
        raise DataError(path, "header", "a JSON object", type(header).__name__)
    header.pop("__metadata__", None)
    return 8 + size, header


def model_tensors(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder (model.safetensors or its sharded index), from the headers only."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DebiasError(f"{model_dir}: no such folder; expected a Hugging Face model folder.")
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise DebiasError(f"{model_dir} is a peft adapter, not a full model: pass it with --adapter.")
    check_weights(model_dir)  # config.json present, and not pickle-only
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        return _sharded_tensors(model_dir, index_path)
    single = model_dir / "model.safetensors"
    if single.is_file():
        return {name: TensorInfo(entry["dtype"], tuple(entry["shape"]), single.name)
                for name, entry in read_safetensors_header(single).items()}
    found = sorted(path.name for path in model_dir.glob("*.safetensors"))
    raise DebiasError(
        f"{model_dir}: neither model.safetensors nor model.safetensors.index.json exists (found {found}); "
        "mergekit only reads those names. Re-save the model with save_pretrained(safe_serialization=True)."
    )


def _sharded_tensors(model_dir: Path, index_path: Path) -> dict[str, TensorInfo]:
    """Tensors of a sharded checkpoint; a shard the index lists but the folder lacks is an error."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise DataError(index_path, "weight_map", "a JSON object mapping tensor names to shard files") from None
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (model_dir / name).is_file()]
    if missing:
        raise DebiasError(
            f"{index_path} lists {len(missing)} shard(s) missing from {model_dir}: {', '.join(missing[:5])}. "
            "The checkpoint is incomplete (interrupted download or copy?); nothing was written."
        )
    tensors = {}
    for shard in shards:
        for name, entry in read_safetensors_header(model_dir / shard).items():
            tensors[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]), shard)
    for name, shard in weight_map.items():
        if name not in tensors or tensors[name].file != shard:
            raise DataError(index_path, f"weight_map entry {name!r}", f"a tensor stored in {shard}",
                            "no such tensor in that shard")
    return tensors


def _read_json(path: Path) -> dict:
    from debias_plugin.data._io import json_document

    if not path.is_file():
        raise DebiasError(f"{path}: file not found.")
    data = json_document(path)
    if not isinstance(data, dict):
        raise DataError(path, "top level", "a JSON object", type(data).__name__)
    return data


# ------------------------------------------------------------------------------------------ compatibility

def _describe(config: dict) -> str:
    return f"{'/'.join(config.get('architectures') or ['?'])} (model_type {config.get('model_type')!r})"


def check_same_model(base_dir: Path, other_dir: Path, base_tensors: dict[str, TensorInfo],
                     other_tensors: dict[str, TensorInfo], role: str = "biased model") -> None:
    """A bias vector only exists between two checkpoints of one model: same architecture, names and shapes."""
    base_config, other_config = _read_json(base_dir / "config.json"), _read_json(other_dir / "config.json")
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


def check_adapter(base_dir: Path, base_tensors: dict[str, TensorInfo], adapter_dir: Path) -> dict:
    """A LoRA adapter fits the base when every module it targets exists there with matching dimensions."""
    if not adapter_dir.is_dir():
        raise DebiasError(f"{adapter_dir}: no such folder; expected a peft adapter folder.")
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise DebiasError(f"{adapter_dir}: no adapter_config.json; expected a peft adapter folder "
                          "(for a full fine-tuned model use --biased).")
    adapter_config = _read_json(config_path)
    if adapter_config.get("peft_type") != "LORA":
        raise DataError(config_path, "peft_type", "'LORA' (only LoRA adapters merge into the base weights)",
                        repr(adapter_config.get("peft_type")))
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        raise DebiasError(
            f"{adapter_dir}: no adapter_model.safetensors"
            + (" (only adapter_model.bin, a pickle, which can run code when loaded; convert it to safetensors)"
               if pickled else "") + "."
        )
    dims: dict[str, dict[str, int]] = {}
    for name, entry in read_safetensors_header(weights).items():
        stem = name.removeprefix("base_model.model.")
        match = re.match(r"(.+)\.lora_(embedding_)?([AB])(\.[^.]+)?\.weight$", stem) or \
            re.match(r"(.+)\.lora_(embedding_)?([AB])$", stem)
        if match is None:  # modules_to_save and other full tensors replace base tensors one for one
            target = stem
            if target not in base_tensors or base_tensors[target].shape != tuple(entry["shape"]):
                raise DebiasError(
                    f"{weights}: tensor {name} {entry['shape']} has no counterpart of that shape in the base "
                    f"{base_dir}; the adapter was trained on another model."
                )
            continue
        module, _, side, _ = match.groups()
        target = module + ".weight"
        if target not in base_tensors:
            raise DebiasError(
                f"Mismatched architectures: the adapter {adapter_dir} targets {module}, which the base {base_dir} "
                f"does not have (no tensor {target}); the adapter was trained on another model."
            )
        shape = entry["shape"]
        dims.setdefault(module, {})["in" if side == "A" else "out"] = shape[-1] if side == "A" else shape[0]
    for module, found in dims.items():
        base_shape = base_tensors[module + ".weight"].shape
        if len(base_shape) == 2 and len(found) == 2 and sorted(found.values()) != sorted(base_shape):
            raise DebiasError(
                f"Tensor shapes differ: the adapter {adapter_dir} maps {found['in']} -> {found['out']} features "
                f"at {module}, but the base {base_dir} has {module}.weight of shape {list(base_shape)}."
            )
    if not dims:
        raise DebiasError(f"{weights}: no lora_A/lora_B tensors; nothing to negate.")
    return adapter_config


# --------------------------------------------------------------------------------------- config checks

def parse_lambda(value) -> float:
    """lambda as a positive finite number; the template's negative weight supplies the minus sign."""
    if isinstance(value, bool):
        raise DebiasError(f"lambda must be a number, got {value!r}.")
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise DebiasError(f"lambda must be a number (e.g. 0.5), got {value!r}.") from None
    if not math.isfinite(lam) or lam <= 0:
        raise DebiasError(
            f"lambda must be a positive number, got {value!r}: the negation is {NEGATION_FORMULA}, so a "
            "negative lambda would add the bias vector and 0 would return the base unchanged."
        )
    return lam


def _numbers(setting, where: str) -> list[float]:
    """Every numeric value a mergekit parameter setting can take (scalar, gradient list, or filters)."""
    if isinstance(setting, bool) or setting is None:
        raise DebiasError(f"{where} must be a number, got {setting!r}.")
    if isinstance(setting, (int, float)):
        return [float(setting)]
    if isinstance(setting, str):
        try:
            return [float(setting)]
        except ValueError:
            raise DebiasError(f"{where} must be a number, got {setting!r}.") from None
    if isinstance(setting, list) and setting:
        return [x for item in setting for x in _numbers(item.get("value") if isinstance(item, dict) else item,
                                                            where)]
    if isinstance(setting, dict) and "value" in setting:
        return _numbers(setting["value"], where)
    raise DebiasError(f"{where} must be a number, got {setting!r}.")


def _model_key(ref) -> str:
    """A model entry's reference as mergekit's string form, e.g. 'BASE+ADAPTER'."""
    from mergekit.common import ModelReference

    return str(ModelReference.model_validate(ref))


def validate_negation_config(config: dict, bias_models: Iterable[str], source: str = "config") -> None:
    """Refuse a config whose arithmetic would not subtract every bias vector (mergekit #213 and TIES signs)."""
    bias_models = set(bias_models)
    method = config.get("merge_method")
    if method not in _METHODS:
        raise DebiasError(f"{source}: merge_method {method!r} is not checked by debias-plugin; expected one of "
                          f"{sorted(_METHODS)}. Run other methods with mergekit-yaml directly.")
    if not config.get("base_model"):
        raise DebiasError(f"{source}: no base_model; a task vector is measured from the base model.")
    if not isinstance(config.get("models"), list) or not config["models"]:
        raise DebiasError(f"{source}: expected a `models:` list (slices/modules are not supported for negation).")
    shared = config.get("parameters") or {}
    default_normalize, sign_election = _METHODS[method]
    normalize = shared.get("normalize", default_normalize)
    if not isinstance(normalize, bool):
        raise DebiasError(f"{source}: parameters.normalize must be true or false, got {normalize!r}.")
    lambdas = _numbers(shared.get("lambda", 1.0), f"{source}: parameters.lambda")
    if any(value == 0 for value in lambdas):
        raise DebiasError(f"{source}: parameters.lambda is 0, which removes every task vector.")
    base_key = _model_key(config["base_model"])
    weights: dict[str, list[float]] = {}
    for entry in config["models"]:
        key = _model_key(entry["model"])
        if key == base_key:
            continue
        setting = (entry.get("parameters") or {}).get("weight", shared.get("weight"))
        if setting is None:
            raise DebiasError(f"{source}: model {key} has no weight.")
        weights[key] = _numbers(setting, f"{source}: weight of {key}")
    unknown = bias_models - set(weights)
    if unknown:
        raise DebiasError(f"{source}: the bias model(s) {sorted(unknown)} are not among its models.")
    signs = {math.copysign(1, w) for values in weights.values() for w in values}
    if normalize and -1 in signs:
        raise DebiasError(
            f"{source}: normalize: true with a negative weight would cancel the negation (mergekit #213): "
            "mergekit divides by the sum of the weights, so a single weight -lambda gives base + (biased - base) "
            "= the biased model. Set `normalize: false` (or keep weights positive and use a negative lambda)."
        )
    if sign_election and len(signs) > 1:
        raise DebiasError(
            f"{source}: {method} with weights of both signs: its sign election would let added vectors outvote "
            "subtracted ones entry by entry. Use task_arithmetic, or positive weights with a negative lambda."
        )
    for key in bias_models:
        if any(lam * w >= 0 for lam in lambdas for w in weights[key]):
            raise DebiasError(
                f"{source}: the bias vector of {key} enters with a positive coefficient (weight {weights[key]} x "
                f"lambda {lambdas}), so it would be ADDED, not subtracted. Negate with a negative weight "
                "(normalize: false) or a negative lambda."
            )


# ----------------------------------------------------------------------------------------------- render

def load_template(path: str | Path) -> dict:
    """A merge_configs/ template, parsed with yaml.safe_load only."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DebiasError(f"{path}: template not found.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataError(path, f"line {mark.line + 1}" if mark else "YAML", "valid YAML") from None
    if not isinstance(config, dict):
        raise DataError(path, "top level", "a mapping (a mergekit config)", type(config).__name__)
    return config


def default_template(adapter: bool) -> Path:
    return merge_configs_dir() / ("negate_lora.yml" if adapter else "negate.yml")


def render_negation(template: dict, *, base: str, lam: float, biased: str | None = None,
                    adapter: str | None = None, source: str = "template") -> tuple[dict, str]:
    """Fill a template's placeholder paths and scale its bias weight by lambda; returns (config, bias key)."""
    placeholder = f"{BASE_PLACEHOLDER}+{ADAPTER_PLACEHOLDER}" if adapter else BIASED_PLACEHOLDER
    bias_key = f"{base}+{adapter}" if adapter else str(biased)
    config = copy.deepcopy(template)
    if config.get("base_model") != BASE_PLACEHOLDER:
        raise DataError(source, "base_model", f"the placeholder {BASE_PLACEHOLDER}", repr(config.get("base_model")))
    config["base_model"] = str(base)
    entries = [e for e in config.get("models") or [] if isinstance(e, dict) and e.get("model") == placeholder]
    if len(entries) != 1:
        raise DataError(source, "models", f"exactly one model entry `model: {placeholder}`",
                        f"{len(entries)} such entries")
    entry = entries[0]
    entry["model"] = bias_key
    weight = (entry.get("parameters") or {}).get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise DataError(source, f"weight of {placeholder}", "a number (-1.0 means theta = base - lambda*tau)",
                        repr(weight))
    entry["parameters"]["weight"] = float(weight) * lam
    for other in config["models"]:
        if other is not entry and other.get("model") == BASE_PLACEHOLDER:
            other["model"] = str(base)
    return config, bias_key


def check_exact_negation(config: dict, lam: float, source: str = "config") -> None:
    """The rendered one-model config must compute exactly base - lambda * (biased - base)."""
    method = config["merge_method"]
    default_normalize, _ = _METHODS[method]
    shared = config.get("parameters") or {}
    base_key = _model_key(config["base_model"])
    others = [e for e in config["models"] if _model_key(e["model"]) != base_key]
    if len(others) != 1 or method != "task_arithmetic":
        raise DebiasError(f"{source}: `debias negate` renders one bias model with task_arithmetic; found "
                          f"{len(others)} model(s) with {method}. Run multi-vector configs with mergekit-yaml.")
    weight = float(others[0]["parameters"]["weight"])
    coefficient = float(shared.get("lambda", 1.0)) * (1.0 if shared.get("normalize", default_normalize) else weight)
    if not math.isclose(coefficient, -lam, rel_tol=1e-9):
        raise DebiasError(f"{source}: the config computes base + {coefficient:g} * (biased - base), not "
                          f"base - {lam:g} * (biased - base); keep normalize: false and the weight at -1.0.")


# ------------------------------------------------------------------------------------------- mergekit

def _architecture_mode(base_dir: Path, base_tensors: dict[str, TensorInfo]) -> str:
    """'json' when mergekit's bundled description matches the checkpoint exactly, else 'inferred'/'forced'.

    mergekit writes only the tensors its JSON architecture lists and requires the non-optional ones; for
    BertForMaskedLM (0.1.5) it requires a pooler that transformers' MLM checkpoints lack and omits the MLM
    head's transform layer. Then we make mergekit infer the layout from the checkpoint's own tensor names.
    """
    from mergekit.architecture import arch_info_for_config
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    except Exception as err:  # remote-code configs, corrupt files: all mean we cannot plan the merge
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


def _reference(path: str, override: bool):
    """A mergekit model reference; a dict with override_architecture when mergekit must infer the layout."""
    if not override:
        return path
    return {"model": {"path": path}, "override_architecture": INFER_ARCHITECTURE}


def _yaml_text(config: dict, header: str) -> str:
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body


def parse_size(value: str | int, model_bytes: int = 0) -> int:
    """'auto', '500MB', '2GB', '1e9' or an int -> bytes (mergekit's shard size compares bytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if str(value).strip().lower() == "auto":
        return int(min(1e9, max(1e8, model_bytes / 8)))
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)I?B?\s*", str(value).upper())
    try:
        number = float(match.group(1)) if match else None
    except ValueError:
        number = None
    if number is None or number <= 0:
        raise DebiasError(f"shard size must look like 500MB, 2GB or a byte count, got {value!r}.")
    return int(number * 1000 ** " KMGT".index(match.group(2) or " "))


def plain_read_loader(model_dir: str):
    """A mergekit tensor loader that reads each tensor with read() instead of mmap.

    safetensors' mmap keeps every touched page of an input file resident until the shard is closed, so a
    single-file model counts fully in the process's RSS; plain reads keep only the tensors in flight.
    """
    import torch
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex

    dtypes = {code: getattr(torch, name) for code, name in _TORCH_DTYPES.items()}

    class PlainReadLoader(LazyTensorLoader):
        def __init__(self, path: str):
            super().__init__(ShardedTensorIndex.from_disk(path), lazy_unpickle=False)
            self.headers: dict[str, tuple[int, dict]] = {}

        def get_tensor(self, key, device="cpu", aliases=None, raise_on_missing=True):
            paths = self.index.tensor_paths
            if key not in paths:
                key = next((alias for alias in aliases or () if alias in paths), key)
            if key not in paths:
                if raise_on_missing:
                    raise KeyError(key)
                return None
            file = os.path.join(self.index.base_path, paths[key])
            if file not in self.headers:
                self.headers[file] = read_safetensors_layout(file)
            offset, header = self.headers[file]
            entry = header[key]
            start, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=dtypes[entry["dtype"]])
            if tensor.numel():
                with open(file, "rb") as handle:
                    handle.seek(offset + start)
                    if handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - start:
                        raise DebiasError(f"{file}: tensor {key} is truncated.")
            return tensor.to(device)

    return PlainReadLoader(model_dir)


@contextlib.contextmanager
def row_chunked_task_arithmetic(max_elements: int):
    """Run mergekit's task_arithmetic on big tensors in row blocks while the `with` block lasts.

    Its merge_group keeps base, the other inputs, a stacked delta, the mixed delta and the result alive at
    once: five copies of an embedding matrix. Without sparsification the method is elementwise, so row
    blocks give bit-identical results while only base, inputs and the result are whole tensors. Methods
    that sparsify (TIES, DARE: a top-k or a random draw over the whole tensor) are left as they are.
    """
    import torch
    from mergekit.merge_methods.base import TensorEntry, TensorGroup
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    whole_tensor_merge = GeneralizedTaskArithmeticMerge.merge_group

    def merge_group(self, group, /, **parameters):
        base = group.base.tensor if group.base is not None else None
        if (getattr(self, "sparsification_method", True) is not None or base is None or base.dim() == 0
                or base.numel() <= max_elements or not group.non_base):
            return whole_tensor_merge(self, group, **parameters)
        rows = max(1, max_elements // max(1, base[0].numel()))
        result = torch.empty_like(base)
        for start in range(0, base.shape[0], rows):
            block = TensorGroup(entries=tuple(TensorEntry(e.id, e.tensor[start:start + rows], e.is_base)
                                              for e in group.entries), metadata=group.metadata)
            result[start:start + rows] = whole_tensor_merge(self, block, **parameters)
        return result

    GeneralizedTaskArithmeticMerge.merge_group = merge_group
    try:
        yield
    finally:
        GeneralizedTaskArithmeticMerge.merge_group = whole_tensor_merge


def run_mergekit(config: dict, out_dir: Path, config_text: str, *, shard_size: int, progress: bool) -> None:
    """Run mergekit's own run_merge on a validated config, streaming tensors one at a time."""
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    merge_config = MergeConfiguration.model_validate(config)
    options = MergeOptions(trust_remote_code=False, allow_crimes=False, safe_serialization=True,
                           lazy_unpickle=False, copy_tokenizer=True, out_shard_size=shard_size,
                           quiet=not progress)
    references = merge_config.referenced_models()
    cache = LoaderCache()
    registered = isinstance(getattr(cache, "loaders", None), dict)
    try:
        if registered:
            for reference in references:
                cache.loaders[reference] = plain_read_loader(reference.model.path)
        with row_chunked_task_arithmetic(CHUNK_ELEMENTS):
            run_merge(merge_config, str(out_dir), options=options, config_source=config_text)
    finally:
        if registered:
            for reference in references:
                cache.loaders.pop(reference, None)


def _merge_adapter(base: Path, adapter: Path, cache_dir: Path) -> Path:
    """base+adapter merged by mergekit's own ModelReference.merged (what --lora-merge-cache does)."""
    from mergekit.common import ModelReference

    reference = ModelReference.model_validate({"model": {"path": str(base)}, "lora": {"path": str(adapter)}})
    merged = reference.merged(cache_dir=str(cache_dir), trust_remote_code=False, lora_merge_dtype="float32")
    return Path(merged.model.path)


def _verify_output(out_dir: Path, base_tensors: dict[str, TensorInfo], out_dtype: str) -> int:
    """The merged folder must hold exactly the base's tensors, same shapes, in the output dtype."""
    written = model_tensors(out_dir)
    missing, extra = sorted(set(base_tensors) - set(written)), sorted(set(written) - set(base_tensors))
    wrong = [n for n in base_tensors if n in written and written[n].shape != base_tensors[n].shape]
    if missing or extra or wrong:
        raise DebiasError(
            f"mergekit's output does not match the base model (missing {missing[:5]}, extra {extra[:5]}, "
            f"reshaped {wrong[:5]}); nothing was published. This is a mergekit architecture-description problem."
        )
    bad_dtype = [n for n, info in written.items() if _TORCH_DTYPES.get(info.dtype) != out_dtype
                 and _TORCH_DTYPES.get(base_tensors[n].dtype) == out_dtype]
    if bad_dtype:
        raise DebiasError(f"mergekit wrote {bad_dtype[0]} as {written[bad_dtype[0]].dtype}, expected {out_dtype}.")
    return sum(math.prod(info.shape) for info in written.values())


def _base_dtype(base_dir: Path, base_tensors: dict[str, TensorInfo]) -> str:
    """The dtype to store the result in: the base config's, else its first floating tensor's."""
    config = _read_json(base_dir / "config.json")
    declared = str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch.")
    if declared in ("float32", "float16", "bfloat16"):
        return declared
    floats = [_TORCH_DTYPES[i.dtype] for i in base_tensors.values() if i.dtype in ("F32", "F16", "BF16")]
    return floats[0] if floats else "float32"


def _check_output_path(out: Path, inputs: list[Path], force: bool) -> None:
    for path in inputs:
        if out == path or path in out.parents or out in path.parents:
            raise DebiasError(f"--out {out} overlaps the input {path}; choose a separate output folder.")
    if out.exists() and not force:
        raise DebiasError(f"{out} already exists; pass --force to replace it.")
    if not out.parent.is_dir():
        raise DebiasError(f"the parent folder of --out ({out.parent}) does not exist.")


def lambda_folder(lam: float) -> str:
    return f"lambda_{lam:g}"


@dataclass
class _Plan:
    lam: float
    config: dict
    bias_key: str


def negate(base: str | Path, *, lambdas: Iterable, out: str | Path, biased: str | Path | None = None,
           adapter: str | Path | None = None, force: bool = False, template: str | Path | None = None,
           shard_size: str | int = DEFAULT_SHARD_SIZE, progress: bool = True) -> list[Path]:
    """theta = base - lambda * (biased - base) for each lambda, via mergekit; returns the model folders written.

    One lambda writes OUT itself; several write OUT/lambda_<L> each. All checks run before anything is
    written; the result appears atomically (temp folder, then rename) and never replaces OUT without force.
    """
    if (biased is None) == (adapter is None):
        raise DebiasError("Pass exactly one of --biased (a fully fine-tuned model) or --adapter (a LoRA adapter).")
    lams = [parse_lambda(value) for value in lambdas]
    if not lams:
        raise DebiasError("Pass at least one --lambda.")
    if len({lambda_folder(lam) for lam in lams}) != len(lams):
        raise DebiasError(f"Repeated lambda values {lambdas!r}; each lambda gets its own folder.")
    base, out = Path(base).expanduser().resolve(), Path(out).expanduser().resolve()
    source = Path(adapter if adapter is not None else biased).expanduser().resolve()
    for path in (base, source):
        if "+" in str(path) or "@" in str(path):
            raise DebiasError(f"{path}: mergekit reads '+' as BASE+ADAPTER and '@' as a revision; "
                              "rename or symlink the folder to a path without them.")
    _check_output_path(out, [base, source], force)
    parse_size(shard_size)  # fail early on a malformed size

    base_tensors = model_tensors(base)
    shard_bytes = parse_size(shard_size, sum(math.prod(info.shape) * _DTYPE_BYTES.get(info.dtype, 4)
                                             for info in base_tensors.values()))
    if adapter is None:
        check_same_model(base, source, base_tensors, model_tensors(source))
    else:
        check_adapter(base, base_tensors, source)
    template_path = Path(template).expanduser() if template else default_template(adapter is not None)
    template_config = load_template(template_path)
    plans = []
    for lam in lams:
        config, bias_key = render_negation(
            template_config, base=str(base), lam=lam, source=str(template_path),
            biased=None if adapter is not None else str(source), adapter=str(source) if adapter is not None else None)
        validate_negation_config(config, [bias_key], source=str(template_path))
        check_exact_negation(config, lam, source=str(template_path))
        plans.append(_Plan(lam, config, bias_key))
    mode = _architecture_mode(base, base_tensors)
    out_dtype = _base_dtype(base, base_tensors)

    # ---- every check passed: from here on, files are written (to a temp folder first) ----
    token = uuid.uuid4().hex[:8]
    staging = out.with_name(f".{out.name}.tmp-{token}")
    lora_cache = out.with_name(f".{out.name}.lora-cache-{token}")
    written = []
    try:
        staging.mkdir()
        bias_path = str(_merge_adapter(base, source, lora_cache)) if adapter is not None else str(source)
        for plan in plans:
            folder = staging if len(plans) == 1 else staging / lambda_folder(plan.lam)
            written.append(out if len(plans) == 1 else out / lambda_folder(plan.lam))
            _negate_one(plan, folder, base=base, bias_path=bias_path, source=source, adapter=adapter is not None,
                        mode=mode, out_dtype=out_dtype, base_tensors=base_tensors, template=template_path,
                        shard_size=shard_bytes, progress=progress)
        publish_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(lora_cache, ignore_errors=True)
    return written


def _negate_one(plan: _Plan, folder: Path, *, base: Path, bias_path: str, source: Path, adapter: bool,
                mode: str, out_dtype: str, base_tensors: dict, template: Path, shard_size: int,
                progress: bool) -> None:
    """One lambda: write the rendered YAML (as users would run it), run the merge, verify, add the manifest."""
    import mergekit

    from debias_plugin import __version__

    override = mode == "forced"
    shown = copy.deepcopy(plan.config)
    shown["out_dtype"] = out_dtype
    runnable = copy.deepcopy(shown)
    for config, path in ((shown, None if adapter else bias_path), (runnable, bias_path)):
        entry = next(e for e in config["models"] if e["model"] == plan.bias_key)
        if path is not None:
            entry["model"] = _reference(path, override)
        elif override:  # adapter: shown as base+adapter, with the override that forces inference
            entry["model"] = {"model": {"path": str(base)}, "lora": {"path": str(source)},
                              "override_architecture": INFER_ARCHITECTURE}
    header = [f"Rendered by `debias negate` from {template.name}: {NEGATION_FORMULA}, lambda = {plan.lam:g}.",
              "Re-run by hand: mergekit-yaml THIS_FILE OUT" + (" --lora-merge-cache DIR" if adapter else "")]
    if override:
        header.append(f"override_architecture {INFER_ARCHITECTURE!r} makes mergekit infer the tensor layout "
                      "from the checkpoint: its bundled JSON description does not match this model's tensors.")
    if adapter:
        header.append("debias negate merged the adapter first with mergekit's ModelReference.merged (peft "
                      "merge_and_unload, float32), because mergekit 0.1.5 cannot infer an architecture for a "
                      "BASE+ADAPTER reference (OPT, ALBERT, ...).")
    text = _yaml_text(shown, "\n".join(header))
    folder.mkdir(parents=True, exist_ok=True)
    run_mergekit(runnable, folder, text, shard_size=shard_size, progress=progress)
    parameters = _verify_output(folder, base_tensors, out_dtype)
    manifest = {
        "tool": "debias negate",
        "formula": NEGATION_FORMULA,
        "lambda": plan.lam,
        "base": str(base),
        "biased": None if adapter else str(source),
        "adapter": str(source) if adapter else None,
        "template": str(template),
        "config": CONFIG_NAME,
        "architecture": "mergekit JSON description" if mode == "json" else "inferred from tensor names",
        "out_dtype": out_dtype,
        "tensors": len(base_tensors),
        "parameters": parameters,
        "verified": "same tensor names and shapes as the base (safetensors headers)",
        "versions": {"debias_plugin": __version__, "mergekit": getattr(mergekit, "__version__", _version("mergekit"))},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
