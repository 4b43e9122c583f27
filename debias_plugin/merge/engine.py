"""mergekit I/O for `debias negate`: a row-block task_arithmetic registered with mergekit, plain-read inputs.

The one module here importing torch and mergekit at the top (only a running merge imports it). Importing it
registers `task_arithmetic_blocked` with mergekit's public `merge_methods.register`; no mergekit class changes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import cached_property
from pathlib import Path

import torch
from mergekit import merge_methods
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.io.tasks import LoaderCache
from mergekit.merge import run_merge
from mergekit.merge_methods import GeneralizedTaskArithmeticMerge, ParameterScope, TensorEntry, TensorGroup
from mergekit.merge_methods.base import ParameterSpec
from mergekit.options import MergeOptions

from debias_plugin.errors import DataError, DebiasError

BLOCKED_METHOD = "task_arithmetic_blocked"
CHUNK_ELEMENTS = 1 << 18  # a tensor larger than this is merged in row blocks of about this many elements
TORCH_DTYPES = dict(F64=torch.float64, F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16, I64=torch.int64,
                    I32=torch.int32, I16=torch.int16, I8=torch.int8, U8=torch.uint8, BOOL=torch.bool)


class BlockedTaskArithmetic(GeneralizedTaskArithmeticMerge):
    """mergekit's task_arithmetic on big tensors in row blocks: the same bits with a fraction of the memory.

    Its merge_group holds base, inputs, stacked deltas, mixed delta and result at once (five embedding matrices);
    the method is elementwise, so row blocks give the same bits with only base, inputs and result whole."""

    @cached_property
    def spec(self):
        whole = GeneralizedTaskArithmeticMerge.spec.func(self)
        block = ParameterSpec("block_elements", int, ParameterScope.SHARED, default=CHUNK_ELEMENTS,
                              description="tensors above this many elements are merged in row blocks this big")
        return dataclasses.replace(whole, parameters=(*whole.parameters, block))

    def merge_group(self, group: TensorGroup, /, **parameters) -> torch.Tensor:
        limit = parameters["block_elements"]
        base = group.base.tensor if group.base is not None else None
        if (self.sparsification_method is not None or base is None or base.dim() == 0 or base.numel() <= limit
                or not group.non_base):
            return super().merge_group(group, **parameters)
        rows = max(1, limit // max(1, base[0].numel()))
        result = torch.empty_like(base)
        for start in range(0, base.shape[0], rows):
            block = TensorGroup(entries=tuple(TensorEntry(e.id, e.tensor[start:start + rows], e.is_base)
                                              for e in group.entries), metadata=group.metadata)
            result[start:start + rows] = super().merge_group(block, **parameters)
        return result


def register_blocked_method() -> None:
    """Register task_arithmetic_blocked once, configured exactly like mergekit's registered task_arithmetic."""
    if BLOCKED_METHOD not in {method.spec.name for method in merge_methods.registered_methods()}:
        plain = merge_methods.get("task_arithmetic")
        fields = {field.name: getattr(plain, field.name) for field in dataclasses.fields(plain)}
        merge_methods.register(BlockedTaskArithmetic(**fields | {"method_name": BLOCKED_METHOD}))


register_blocked_method()


def model_bytes(tensors) -> int:
    """Bytes of a model's tensors, which sets the 'auto' output shard size."""
    return sum(math.prod(i.shape) * getattr(TORCH_DTYPES.get(i.dtype), "itemsize", 4) for i in tensors.values())


class PlainReadLoader(LazyTensorLoader):
    """A mergekit tensor loader reading each tensor with read(): safetensors' mmap keeps every touched page of a
    file resident until the shard closes (a whole single-file model in RSS); plain reads hold only tensors in flight."""

    def __init__(self, model_dir: str):
        super().__init__(ShardedTensorIndex.from_disk(model_dir), lazy_unpickle=False)
        self.layouts: dict[str, tuple[int, dict]] = {}

    def get_tensor(self, key, device="cpu", aliases=None, raise_on_missing=True):
        paths = self.index.tensor_paths
        key = next((name for name in (key, *(aliases or ())) if name in paths), key)
        if key not in paths:
            if raise_on_missing:
                raise KeyError(key)
            return None
        file = os.path.join(self.index.base_path, paths[key])
        if file not in self.layouts:  # (where tensor data starts, the header) of each file, read once
            try:
                with open(file, "rb") as handle:
                    size = int.from_bytes(handle.read(8), "little")
                    self.layouts[file] = 8 + size, json.loads(handle.read(size))
            except (OSError, ValueError) as err:
                raise DataError(file, "header", "a readable safetensors header", str(err)) from None
        offset, header = self.layouts[file]
        entry = header[key]
        start, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=TORCH_DTYPES[entry["dtype"]])
        if tensor.numel():
            with open(file, "rb") as handle:
                handle.seek(offset + start)
                if handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - start:
                    raise DebiasError(f"{file}: tensor {key} is truncated.")
        return tensor.to(device)


def run_mergekit(config: dict, out_dir: Path, config_text: str, *, shard_size: int, progress: bool) -> None:
    """mergekit's run_merge on a validated config: task_arithmetic in row blocks, inputs read with plain reads."""
    if config["merge_method"] == "task_arithmetic":
        config = {**config, "merge_method": BLOCKED_METHOD,
                  "parameters": {**(config.get("parameters") or {}), "block_elements": CHUNK_ELEMENTS}}
    merge_config = MergeConfiguration.model_validate(config)
    options = MergeOptions(trust_remote_code=False, allow_crimes=False, safe_serialization=True,
                           lazy_unpickle=False, copy_tokenizer=True, out_shard_size=shard_size,
                           quiet=not progress)
    references = merge_config.referenced_models()
    loaders = LoaderCache().loaders  # mergekit's public per-model loader table, consulted before it opens one
    try:
        loaders.update({reference: PlainReadLoader(reference.model.path) for reference in references})
        run_merge(merge_config, str(out_dir), options=options, config_source=config_text)
    finally:
        for reference in references:
            loaders.pop(reference, None)


def merge_adapter(base: Path, adapter: Path, cache_dir: Path) -> Path:
    """base+adapter merged by mergekit's own ModelReference.merged (what --lora-merge-cache does)."""
    reference = ModelReference.model_validate({"model": {"path": str(base)}, "lora": {"path": str(adapter)}})
    merged = reference.merged(cache_dir=str(cache_dir), trust_remote_code=False, lora_merge_dtype="float32")
    return Path(merged.model.path)
