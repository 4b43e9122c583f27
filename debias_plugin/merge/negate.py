"""`negate()`: every check first, then mergekit writes each lambda's model into one staged OutputFolder."""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml

from debias_plugin.errors import DebiasError
from debias_plugin.merge.checkpoints import (
    FLOAT_DTYPES, TensorInfo, architecture_mode, base_dtype, check_adapter, check_same_model, model_tensors,
)
from debias_plugin.merge.config import (
    NEGATION_FORMULA, check_exact_negation, default_template, load_template, parse_lambda, parse_size,
    render_negation, validate_negation_config,
)
from debias_plugin.outputs import MANIFEST_NAME, OutputFolder, manifest, write_json

# An architecture name mergekit has no JSON for: it makes mergekit infer the layout from the tensor names.
INFER_ARCHITECTURE = "debias-plugin/infer-from-tensor-names"
CONFIG_NAME = "mergekit_config.yml"
DEFAULT_SHARD_SIZE = "auto"  # model size / 8, clamped to 100 MB .. 1 GB: mergekit holds one shard in memory
LORA_CACHE = ".lora-merge-cache"  # inside the staging folder, so a killed run's copy goes with it


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
    written; the result appears atomically (OutputFolder) and never replaces OUT without force.
    """
    if (biased is None) == (adapter is None):
        raise DebiasError("Pass exactly one of --biased (a fully fine-tuned model) or --adapter (a LoRA adapter).")
    lams = [parse_lambda(value) for value in lambdas]
    if not lams:
        raise DebiasError("Pass at least one --lambda.")
    if len({lambda_folder(lam) for lam in lams}) != len(lams):
        raise DebiasError(f"Repeated lambda values {lambdas!r}; each lambda gets its own folder.")
    base = Path(base).expanduser().resolve()
    source = Path(adapter if adapter is not None else biased).expanduser().resolve()
    for path in (base, source):
        if "+" in str(path) or "@" in str(path):
            raise DebiasError(f"{path}: mergekit reads '+' as BASE+ADAPTER and '@' as a revision; "
                              "rename or symlink the folder to a path without them.")
    template_path = Path(template).expanduser().resolve() if template else default_template(adapter is not None)
    folder = OutputFolder(out, inputs=[base, source, template_path], force=force, option="--out")
    parse_size(shard_size)  # fail early on a malformed size
    template_config = load_template(template_path)

    base_tensors = model_tensors(base)
    if adapter is None:
        check_same_model(base, source, base_tensors, model_tensors(source))
    else:
        check_adapter(base, base_tensors, source)
    plans = []
    for lam in lams:
        config, bias_key = render_negation(
            template_config, base=str(base), lam=lam, source=str(template_path),
            biased=None if adapter is not None else str(source), adapter=str(source) if adapter is not None else None)
        validate_negation_config(config, [bias_key], source=str(template_path))
        check_exact_negation(config, lam, source=str(template_path))
        plans.append(_Plan(lam, config, bias_key))
    mode = architecture_mode(base, base_tensors)
    out_dtype = base_dtype(base, base_tensors)

    # ---- every check passed: from here on, files are written (to the staging folder first) ----
    from debias_plugin.merge import engine

    shard_bytes = parse_size(shard_size, engine.model_bytes(base_tensors))
    options = {"lambdas": lams, "template": str(template_path), "max_shard_size": shard_size,
               "shard_size_bytes": shard_bytes, "force": force}
    inputs = {"base": base, "biased": None if adapter is not None else source,
              "adapter": source if adapter is not None else None, "template": template_path}
    with folder.staging() as staging:
        started = time.monotonic()
        bias_path = str(engine.merge_adapter(base, source, staging / LORA_CACHE)) if adapter else str(source)
        shared_timings = {"adapter_merge_s": round(time.monotonic() - started, 3)} if adapter else {}
        done = []
        for plan in plans:
            target = staging if len(plans) == 1 else staging / lambda_folder(plan.lam)
            results, timings = _negate_one(plan, target, base=base, bias_path=bias_path, source=source,
                                           adapter=adapter is not None, mode=mode, out_dtype=out_dtype,
                                           base_tensors=base_tensors, template=template_path,
                                           shard_size=shard_bytes, progress=progress)
            done.append((target, plan.lam, results, timings))
        shutil.rmtree(staging / LORA_CACHE, ignore_errors=True)
        started = time.monotonic()
        common = manifest("negate", options=options, inputs=inputs, results={})  # hashes the inputs once
        shared_timings["hash_inputs_s"] = round(time.monotonic() - started, 3)
        records = [(target, {**common, "options": {**options, "lambda": lam}, "results": results,
                             "timings": {**shared_timings, **timings}}) for target, lam, results, timings in done]
        if len(plans) > 1:
            for target, record in records:
                write_json(target / MANIFEST_NAME, record)
        folder.publish(staging, records[0][1] if len(plans) == 1 else None)
    if len(plans) == 1:
        return [folder.path]
    return [folder.path / lambda_folder(plan.lam) for plan in plans]


def _reference(path: str, override: bool):
    """A mergekit model reference; a dict with override_architecture when mergekit must infer the layout."""
    if not override:
        return path
    return {"model": {"path": path}, "override_architecture": INFER_ARCHITECTURE}


def _yaml_text(config: dict, header: str) -> str:
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body


def _negate_one(plan: _Plan, folder: Path, *, base: Path, bias_path: str, source: Path, adapter: bool,
                mode: str, out_dtype: str, base_tensors: dict, template: Path, shard_size: int,
                progress: bool) -> tuple[dict, dict]:
    """One lambda: write the rendered YAML (as users would run it), run the merge, verify; (results, timings)."""
    from debias_plugin.merge.engine import BLOCKED_METHOD, run_mergekit

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
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    run_mergekit(runnable, folder, _yaml_text(shown, "\n".join(header)), shard_size=shard_size, progress=progress)
    merged = time.monotonic()
    parameters = _verify_output(folder, base_tensors, out_dtype)
    results = {"formula": NEGATION_FORMULA, "config": CONFIG_NAME, "merge_method": BLOCKED_METHOD,
               "architecture": "mergekit JSON description" if mode == "json" else "inferred from tensor names",
               "out_dtype": out_dtype, "tensors": len(base_tensors), "parameters": parameters,
               "verified": "same tensor names and shapes as the base (safetensors headers)"}
    return results, {"merge_s": round(merged - started, 3), "verify_s": round(time.monotonic() - merged, 3)}


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
    bad_dtype = [n for n, info in written.items() if FLOAT_DTYPES.get(info.dtype) != out_dtype
                 and FLOAT_DTYPES.get(base_tensors[n].dtype) == out_dtype]
    if bad_dtype:
        raise DebiasError(f"mergekit wrote {bad_dtype[0]} as {written[bad_dtype[0]].dtype}, expected {out_dtype}.")
    return sum(math.prod(info.shape) for info in written.values())
