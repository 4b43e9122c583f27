"""`negate()`: every check first, then mergekit writes each lambda's model into one staged OutputFolder."""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import yaml

from debias_plugin.errors import DebiasError
from debias_plugin.merge.checkpoints import (
    FLOAT_DTYPES, TensorInfo, architecture_mode, base_dtype, check_adapter, check_same_model, model_tensors,
)
from debias_plugin.merge.config import (
    MULTI_FORMULA, NEGATION_FORMULA, RETAIN_FORMULA, TIES_FORMULA, load_template, parse_lambda, parse_size,
    render_negation,
    validate_negation_config,
)
from debias_plugin.outputs import MANIFEST_NAME, OutputFolder, manifest, write_json
from debias_plugin.paths import merge_configs_dir

# An architecture name mergekit has no JSON for: it makes mergekit infer the layout from the tensor names.
INFER_ARCHITECTURE = "debias-plugin/infer-from-tensor-names"
CONFIG_NAME = "mergekit_config.yml"
DEFAULT_SHARD_SIZE = "auto"  # model size / 8, clamped to 100 MB .. 1 GB: mergekit holds one shard in memory
METHODS = ("task_arithmetic", "ties")  # ties: mergekit's own, from merge_configs/negate_ties*.yml
LORA_CACHE = ".lora-merge-cache"  # inside the staging folder, so a killed run's copy goes with it


def lambda_folder(lam: float) -> str:
    return f"lambda_{lam:g}"


def negate(base: str | Path, *, lambdas: Iterable, out: str | Path, biased=None, adapter=None, force: bool = False,
           template: str | Path | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE, progress: bool = True,
           capability: str | Path | None = None, mu: float | None = None,
           method: str = "task_arithmetic") -> list[Path]:
    """theta = base - lambda * (biased - base) for each lambda via mergekit, into OUT (one lambda) or OUT/lambda_<L>;
    every check runs before a byte is written, then OutputFolder publishes all at once. Returns the model folders.

    Several sources (a list of biased models or of adapters) take one lambda each and give one model,
    theta = base - sum_k lambda_k * (biased_k - base); method "ties" merges the scaled vectors with mergekit's TIES
    (trim to density, majority sign, sum of the agreeing entries) before subtracting (merge_configs/negate_ties.yml).
    With `capability` (the base fine-tuned on neutral text) and `mu`, negate-and-retain adds + mu * (capable - base)
    in the same merge (merge_configs/negate_and_retain*.yml)."""
    if (biased is None) == (adapter is None) or isinstance(biased if adapter is None else adapter, list) and \
            not (biased if adapter is None else adapter):
        raise DebiasError("Pass exactly one of --biased (a fully fine-tuned model) or --adapter (a LoRA adapter).")
    if (capability is None) != (mu is None):
        raise DebiasError("Pass --capability (a model fine-tuned on neutral text) and --mu together.")
    if method not in METHODS:
        raise DebiasError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
    mu = None if mu is None else parse_lambda(mu, "mu")
    lambdas = list(lambdas)  # read twice: parsed, then quoted in the error
    lams = [parse_lambda(value) for value in lambdas]
    lora = adapter is not None
    role = "adapter" if lora else "biased"
    given = adapter if lora else biased
    several = isinstance(given, (list, tuple)) and len(given) > 1
    given = list(given) if isinstance(given, (list, tuple)) else [given]
    if several and len(lams) != len(given):
        raise DebiasError(f"{len(given)} --{role} sources but {len(lams)} --lambda values ({lambdas}): pass one "
                          f"--lambda per source, in the same order (theta = base - sum_k lambda_k * tau_k).")
    if not several and (not lams or len({lambda_folder(lam) for lam in lams}) != len(lams)):
        raise DebiasError(f"Pass one --lambda or more, each value once (got {lambdas}): each gets its folder.")
    base = Path(base).expanduser().resolve()
    sources = [Path(path).expanduser().resolve() for path in given]
    capable = None if capability is None else Path(capability).expanduser().resolve()
    if len(set(sources)) != len(sources):
        raise DebiasError(f"The same --{role} is given twice ({[str(s) for s in sources]}): give each vector once.")
    for path in (base, *sources, capable):
        if "+" in str(path) or "@" in str(path):
            raise DebiasError(f"{path}: mergekit reads '+' as BASE+ADAPTER and '@' as a revision; "
                              "rename or symlink the folder to a path without them.")
    stem = "negate_ties" if method == "ties" else "negate_and_retain" if capability else "negate"
    if method == "ties" and capability:
        raise DebiasError("--method ties with --capability: TIES's sign election would mix the added capability "
                          "vector with the subtracted bias vectors; use task_arithmetic for negate-and-retain.")
    bundled = stem + ("_lora.yml" if lora else ".yml")
    template_path = Path(template or merge_configs_dir() / bundled).expanduser().resolve()
    named = {role: sources[0]} if len(sources) == 1 else {f"{role}_{i}": s for i, s in enumerate(sources, start=1)}
    inputs = {"base": base, **named, "template": template_path, "capability": capable}  # None: left out
    folder = OutputFolder(out, inputs=inputs.values(), force=force, option="--out")
    parse_size(shard_size)  # fail early on a malformed size
    template_config = load_template(template_path)
    base_tensors = model_tensors(base)
    for source in sources:
        if lora:
            check_adapter(base, base_tensors, source)
        else:
            check_same_model(base, source, base_tensors, model_tensors(source))
    if capable is not None:
        check_same_model(base, capable, base_tensors, model_tensors(capable), role="capability model")
    settings = [lams] if several else [[lam] for lam in lams]  # per output model: one lambda per source
    plans = []
    for values in settings:
        config, bias_keys = render_negation(template_config, base=str(base), lam=values, source=str(template_path),
                                            capability=None if capable is None else str(capable), mu=mu,
                                            **{role: [str(s) for s in sources]})
        exact = dict(zip(bias_keys, values)) if several or method == "ties" else values[0]
        validate_negation_config(config, bias_keys, source=str(template_path), exact_lambda=exact,
                                 exact_mu=None if capable is None else (str(capable), mu))
        plans.append((values, config, bias_keys))
    mode, out_dtype = architecture_mode(base, base_tensors), base_dtype(base, base_tensors)

    # ---- every check passed: from here on, files are written (to the staging folder first) ----
    from debias_plugin.merge import engine

    shard_bytes = parse_size(shard_size, engine.model_bytes(base_tensors))
    options = {"lambdas": lams, "template": str(template_path), "max_shard_size": shard_size,
               "shard_size_bytes": shard_bytes, "force": force, **({"mu": mu} if capable else {}),
               **({"method": method} if method != "task_arithmetic" else {})}
    formula = TIES_FORMULA if method == "ties" else RETAIN_FORMULA if capable else \
        MULTI_FORMULA if several else NEGATION_FORMULA
    with folder.staging() as staging:
        clock = time.monotonic()
        caches = [staging / LORA_CACHE / str(i) if several else staging / LORA_CACHE for i in range(len(sources))]
        bias_paths = [str(engine.merge_adapter(base, source, cache)) if lora else str(source)
                      for source, cache in zip(sources, caches)]
        shared_timings = {"adapter_merge_s": round(time.monotonic() - clock, 3)} if lora else {}
        records = []
        for values, config, bias_keys in plans:
            target = staging if len(plans) == 1 else staging / lambda_folder(values[0])
            target.mkdir(exist_ok=True)
            runnable, text = _rendered(config, bias_keys, values, bias_paths=bias_paths, base=base, sources=sources,
                                       lora=lora, override=mode == "forced", out_dtype=out_dtype,
                                       template=template_path, mu=mu, formula=formula)
            clock = time.monotonic()
            engine.run_mergekit(runnable, target, text, shard_size=shard_bytes, progress=progress)
            merged = time.monotonic()
            results = {"formula": formula, "config": CONFIG_NAME,
                       "merge_method": "ties" if method == "ties" else engine.BLOCKED_METHOD,
                       "architecture": "mergekit JSON description" if mode == "json" else "inferred from tensor names",
                       "out_dtype": out_dtype, "tensors": len(base_tensors),
                       "parameters": _verify_output(target, base_tensors, out_dtype),
                       "verified": "same tensor names and shapes as the base (safetensors headers)"}
            records.append((target, values, results, {"merge_s": round(merged - clock, 3),
                                                      "verify_s": round(time.monotonic() - merged, 3)}))
        shutil.rmtree(staging / LORA_CACHE, ignore_errors=True)
        clock = time.monotonic()
        common = manifest("negate", options=options, inputs=inputs, results={})  # hashes the inputs once
        shared_timings["hash_inputs_s"] = round(time.monotonic() - clock, 3)
        for target, values, results, timings in records:
            write_json(target / MANIFEST_NAME, {**common, "options": {**options, "lambda": values if several
                                                                      else values[0]},
                                                "results": results, "timings": {**shared_timings, **timings}})
        folder.publish(staging)
    return [folder.path] if len(plans) == 1 else [folder.path / lambda_folder(lam) for lam in lams]


def _rendered(config: dict, bias_keys: list[str], lams: list[float], *, bias_paths: list[str], base: Path,
              sources: list[Path], lora: bool, override: bool, out_dtype: str, template: Path, formula: str,
              mu: float | None = None) -> tuple[dict, str]:
    """(config mergekit runs, YAML text users can re-run): they differ only in how the bias models are named."""
    shown = {**copy.deepcopy(config), "out_dtype": out_dtype}
    runnable = copy.deepcopy(shown)
    for rendered, paths in ((shown, [None] * len(sources) if lora else bias_paths), (runnable, bias_paths)):
        entries = [next(e for e in rendered["models"] if e["model"] == key) for key in bias_keys]
        for entry, path, source in zip(entries, paths, sources):
            if override:  # an architecture mergekit has no JSON for makes it infer the layout (adapter: base+adapter)
                reference = {"model": {"path": path or str(base)}, **({} if path else {"lora": {"path": str(source)}})}
                entry["model"] = {**reference, "override_architecture": INFER_ARCHITECTURE}
            elif path is not None:
                entry["model"] = path
        if override:
            for other in rendered["models"]:  # a capability model: the same inference
                if all(other is not e for e in entries) and isinstance(other["model"], str) \
                        and other["model"] != str(base):
                    other["model"] = {"model": {"path": other["model"]}, "override_architecture": INFER_ARCHITECTURE}
    shown_formula = formula if mu is None else f"{formula}, mu = {mu:g}"
    strengths = f"lambda = {lams[0]:g}" if len(lams) == 1 else "lambdas = " + ", ".join(f"{lam:g}" for lam in lams)
    header = [f"Rendered by `debias negate` from {template.name}: {shown_formula}, {strengths}.",
              "Re-run by hand: mergekit-yaml THIS_FILE OUT" + (" --lora-merge-cache DIR" if lora else "")]
    if override:
        header.append(f"override_architecture {INFER_ARCHITECTURE!r} makes mergekit infer the tensor layout "
                      "from the checkpoint: its bundled JSON description does not match this model's tensors.")
    if lora:
        header.append("debias negate merged the adapter first with mergekit's ModelReference.merged (peft "
                      "merge_and_unload, float32), because mergekit 0.1.5 cannot infer an architecture for a "
                      "BASE+ADAPTER reference (OPT, ALBERT, ...).")
    body = yaml.safe_dump(shown, sort_keys=False, default_flow_style=False)
    return runnable, "".join(f"# {line}\n" for line in header) + body


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
