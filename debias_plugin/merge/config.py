"""Negation configs: load a template strictly (mergekit's MergeConfiguration, its registry's parameters), render
it, and prove it subtracts the bias vector. A typo is an error naming its YAML line, not a silently ignored key."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from debias_plugin.data._io import read_text
from debias_plugin.errors import DataError, DebiasError

NEGATION_FORMULA = "theta = base - lambda * (biased - base)"
MULTI_FORMULA = "theta = base - sum_k lambda_k * (biased_k - base)"
TIES_FORMULA = "theta = base - TIES(lambda_k * (biased_k - base)): trimmed to density, majority sign, summed"
BASE_PLACEHOLDER = "/path/to/base_model"
BIASED_PLACEHOLDER = "/path/to/biased_model"
ADAPTER_PLACEHOLDER = "/path/to/bias_adapter"
CAPABILITY_PLACEHOLDER = "/path/to/capability_model"
RETAIN_FORMULA = "theta = base - lambda * (biased - base) + mu * (capable - base)"
CHECKED_METHODS = ("task_arithmetic", "ties")  # the methods whose signs (normalize, election) we reason about


def parse_lambda(value, name: str = "lambda") -> float:
    """lambda (or mu) as a positive finite number; the template's weights supply the signs."""
    if isinstance(value, bool):
        raise DebiasError(f"{name} must be a number, got {value!r}.")
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise DebiasError(f"{name} must be a number (e.g. 0.5), got {value!r}.") from None
    if not math.isfinite(lam) or lam <= 0:
        formula = NEGATION_FORMULA if name == "lambda" else RETAIN_FORMULA
        raise DebiasError(
            f"{name} must be a positive number, got {value!r}: the merge is {formula}, so a negative {name} "
            "would flip its vector's sign and 0 would leave it out."
        )
    return lam


def parse_size(value: str | int, model_bytes: int = 0) -> int:
    """'auto', '500MB', '2GB', '1e9' or an int -> bytes (mergekit's shard size compares bytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if str(value).strip().lower() == "auto":
        return int(min(1e9, max(1e8, model_bytes / 8)))
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:E\+?\d+)?)\s*([KMGT]?)I?B?\s*", str(value).upper())
    if match is None or float(match.group(1)) <= 0:
        raise DebiasError(f"shard size must look like 500MB, 2GB or a byte count, got {value!r}.")
    return int(float(match.group(1)) * 1000 ** " KMGT".index(match.group(2) or " "))


# ------------------------------------------------------------------------------- strict mergekit parsing

def _locate(config, root, loc: tuple) -> tuple[str, int | None]:
    """('models[0].parameters.x', its YAML line) for a pydantic error location, skipping its union labels."""
    data, node, key, line = config, root, "", None
    for part in loc:
        if not (isinstance(data, dict) and part in data or isinstance(data, list) and isinstance(part, int)):
            continue
        data, key, mark = data[part], key + (f"[{part}]" if isinstance(part, int) else f".{part}"), None
        if isinstance(node, yaml.MappingNode):
            mark, node = next(((k, v) for k, v in node.value if k.value == str(part)), (None, None))
        elif isinstance(node, yaml.SequenceNode):
            mark = node = node.value[part]
        line = mark.start_mark.line + 1 if mark is not None else line
    return key.lstrip(".") or "top level", line


def _refusal(source, config: dict, text: str | None, problems: list[tuple[tuple, str]], expected: str) -> DataError:
    """One DataError naming every offending key with its YAML line (when the text is known)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader) if text else None
    described, where = {}, None  # one reason per key: a bad value fails every branch of mergekit's unions
    for loc, why in problems:
        key, line = _locate(config, root, loc)
        described.setdefault(f"{key} (line {line})" if line else key, why)
        where = where or (f"line {line}" if line else f"key {key}")
    return DataError(source, where, expected, "; ".join(f"{key}: {why}" for key, why in list(described.items())[:5]))


def parse_config(config: dict, source="config", text: str | None = None):
    """mergekit's MergeConfiguration of `config`, refusing unknown keys and parameters its method lacks."""
    from mergekit import merge_methods
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        parsed = MergeConfiguration.model_validate(config, extra="forbid")
    except ValidationError as err:
        problems = [(e["loc"], "unknown key" if e["type"] == "extra_forbidden" else e["msg"]) for e in err.errors()]
        unknown_only = all(why == "unknown key" for _, why in problems)
        raise _refusal(source, config, text, problems, "only keys mergekit reads (it ignores the others silently)"
                       if unknown_only else "a mergekit config") from None
    except RuntimeError as err:  # mergekit's own validators raise these
        raise DataError(source, "top level", "a mergekit config", str(err)) from None
    try:
        spec = merge_methods.get(parsed.merge_method).spec
    except RuntimeError:
        names = sorted(m.spec.name for m in merge_methods.registered_methods())
        raise _refusal(source, config, text, [(("merge_method",), f"unknown method {parsed.merge_method!r}")],
                       f"one of mergekit's merge methods ({', '.join(names)})") from None
    shared, per_model = [p.name for p in spec.parameters], [p.name for p in spec.input_parameters]
    problems = [(("parameters", key), f"not a parameter of {spec.name} (it takes {', '.join(shared)})")
                for key in parsed.parameters or {} if key not in shared]
    hint = "; this one belongs under the top-level parameters"
    problems += [(("models", index, "parameters", key),
                  f"not a per-model parameter of {spec.name} (those: {', '.join(per_model)}{hint * (key in shared)})")
                 for index, entry in enumerate(parsed.models or []) for key in entry.parameters or {}
                 if key not in per_model]
    if problems:
        raise _refusal(source, config, text, problems, "only parameters the merge method reads (others are ignored)")
    return parsed


def load_template(path: str | Path) -> dict:
    """A merge_configs/ template: yaml.safe_load, then every key checked against what mergekit reads."""
    path = Path(path)
    if not path.is_file():
        raise DebiasError(f"{path}: template not found.")
    text = read_text(path)  # UTF-8 and not empty, or a DataError
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataError(path, f"line {mark.line + 1}" if mark else "YAML", "valid YAML") from None
    if not isinstance(config, dict):
        raise DataError(path, "top level", "a mapping (a mergekit config)", type(config).__name__)
    parse_config(config, path, text)
    return config


# ----------------------------------------------------------------------------------------------- signs

def _numbers(setting, where: str) -> list[float]:
    """Every numeric value a parsed mergekit parameter setting can take (scalar, gradient list, or filters)."""
    from mergekit.config import ConditionalParameter

    if isinstance(setting, ConditionalParameter):
        setting = setting.value
    if isinstance(setting, list) and setting:
        return [x for item in setting for x in _numbers(item, where)]
    if isinstance(setting, (int, float, str)) and not isinstance(setting, bool):
        try:
            return [float(setting)]
        except ValueError:
            pass
    raise DebiasError(f"{where} must be a number, got {setting!r}.")


def validate_negation_config(config: dict, bias_models: Iterable[str], source: str = "config",
                             exact_lambda: float | dict[str, float] | None = None,
                             exact_mu: tuple[str, float] | None = None) -> None:
    """Refuse a config that would not subtract every bias vector (mergekit #213, TIES signs), or with
    exact_lambda anything but base - exact_lambda * (biased - base) from one task_arithmetic model (a dict
    {bias model: lambda}: base - sum_k lambda_k * (biased_k - base), task_arithmetic or ties with normalize: false;
    plus, with exact_mu = (capability model, mu), exactly + mu * (capable - base))."""
    from mergekit import merge_methods

    method = config.get("merge_method")
    if method not in CHECKED_METHODS:
        raise DebiasError(f"{source}: merge_method {method!r} is not checked by debias-plugin; expected one of "
                          f"{sorted(CHECKED_METHODS)}. Run other methods with mergekit-yaml directly.")
    parsed = parse_config(config, source)
    if parsed.base_model is None:
        raise DebiasError(f"{source}: no base_model; a task vector is measured from the base model.")
    if not parsed.models:
        raise DebiasError(f"{source}: expected a `models:` list (slices/modules are not supported for negation).")
    shared, defaults = parsed.parameters or {}, {p.name: p.default for p in merge_methods.get(method).spec.parameters}
    normalize = shared.get("normalize", defaults["normalize"])
    if not isinstance(normalize, bool):
        raise DebiasError(f"{source}: parameters.normalize must be true or false, got {normalize!r}.")
    lambdas = _numbers(shared.get("lambda", defaults["lambda"]), f"{source}: parameters.lambda")  # registry defaults
    if any(value == 0 for value in lambdas):
        raise DebiasError(f"{source}: parameters.lambda is 0, which removes every task vector.")
    weights: dict[str, list[float]] = {}
    for entry in (e for e in parsed.models if e.model != parsed.base_model):
        setting = (entry.parameters or {}).get("weight", shared.get("weight"))
        if setting is None:
            raise DebiasError(f"{source}: model {entry.model} has no weight.")
        weights[str(entry.model)] = _numbers(setting, f"{source}: weight of {entry.model}")
    unknown = set(bias_models) - set(weights)
    if unknown:
        raise DebiasError(f"{source}: the bias model(s) {sorted(unknown)} are not among its models.")
    signs = {math.copysign(1, w) for values in weights.values() for w in values}
    if normalize and -1 in signs:
        raise DebiasError(
            f"{source}: normalize: true with a negative weight would cancel the negation (mergekit #213): "
            "mergekit divides by the sum of the weights, so a single weight -lambda gives base + (biased - base) "
            "= the biased model. Set `normalize: false` (or keep weights positive and use a negative lambda)."
        )
    if getattr(merge_methods.get(method), "consensus_method", None) is not None and len(signs) > 1:
        raise DebiasError(
            f"{source}: {method} with weights of both signs: its sign election would let added vectors outvote "
            "subtracted ones entry by entry. Use task_arithmetic, or positive weights with a negative lambda."
        )
    for key in set(bias_models):
        if any(lam * w >= 0 for lam in lambdas for w in weights[key]):
            raise DebiasError(
                f"{source}: the bias vector of {key} enters with a positive coefficient (weight {weights[key]} x "
                f"lambda {lambdas}), so it would be ADDED, not subtracted. Negate with a negative weight "
                "(normalize: false) or a negative lambda."
            )
    if exact_lambda is None:
        return
    several = isinstance(exact_lambda, dict)
    per_model = exact_lambda if several else {key: exact_lambda for key in bias_models}
    expected = {key: -lam for key, lam in per_model.items()} | (dict([exact_mu]) if exact_mu else {})
    if several and (set(weights) != set(expected) or any(len(ws) != 1 for ws in weights.values())
                    or len(lambdas) != 1 or method == "ties" and normalize):
        raise DebiasError(f"{source}: `debias negate` renders its bias models (and optionally one capability model) "
                          f"with task_arithmetic, or ties with normalize: false; found {len(weights)} model(s) with "
                          f"{method}{' (normalize: true)' * normalize}. Run other configs with mergekit-yaml.")
    if set(weights) != set(expected) or any(len(ws) != 1 for ws in weights.values()) or len(lambdas) != 1 \
            or method != "task_arithmetic" and not several:
        raise DebiasError(f"{source}: `debias negate` renders one bias model (and optionally one capability model) "
                          f"with task_arithmetic; found {len(weights)} model(s) with {method}. Run other multi-vector "
                          "configs with mergekit-yaml.")
    for key, wanted in expected.items():
        coefficient = lambdas[0] * (1.0 if normalize else weights[key][0])
        if not math.isclose(coefficient, wanted, rel_tol=1e-9):
            raise DebiasError(f"{source}: the config computes base + {coefficient:g} * ({key} - base), not "
                              f"{wanted:+g} * ({key} - base); keep normalize: false and the template's weights.")


# ----------------------------------------------------------------------------------------------- render

def render_negation(template: dict, *, base: str, lam: float | list[float], biased: str | list[str] | None = None,
                    adapter: str | list[str] | None = None, capability: str | None = None, mu: float | None = None,
                    source: str = "template") -> tuple[dict, str | list[str]]:
    """Fill a template's placeholder paths and scale its bias weight by lambda (and set the capability model's
    weight to mu); returns (config, bias key). With lists of sources and lambdas, the bias entry is repeated once
    per source, each scaled by its own lambda; the bias keys come back as a list."""
    placeholder = f"{BASE_PLACEHOLDER}+{ADAPTER_PLACEHOLDER}" if adapter else BIASED_PLACEHOLDER
    several = isinstance(adapter if adapter else biased, list)
    sources, lams = (adapter if adapter else biased), lam
    if not several:
        sources, lams = [sources], [lam]
    if len(lams) != len(sources):
        raise DebiasError(f"{len(sources)} bias sources but {len(lams)} lambdas: pass one lambda per source.")
    keys = [f"{base}+{path}" if adapter else str(path) for path in sources]
    config = copy.deepcopy(template)
    if config.get("base_model") != BASE_PLACEHOLDER:
        raise DataError(source, "base_model", f"the placeholder {BASE_PLACEHOLDER}", repr(config.get("base_model")))
    config["base_model"] = str(base)
    entries = [e for e in config.get("models") or [] if isinstance(e, dict) and e.get("model") == placeholder]
    if len(entries) != 1:
        raise DataError(source, "models", f"exactly one model entry `model: {placeholder}`",
                        f"{len(entries)} such entries")
    entry = entries[0]
    weight = (entry.get("parameters") or {}).get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise DataError(source, f"weight of {placeholder}", "a number (-1.0 means theta = base - lambda*tau)",
                        repr(weight))
    position = config["models"].index(entry)
    rendered = []
    for key, value in zip(keys, lams):
        copied = copy.deepcopy(entry)
        copied["model"] = key
        copied["parameters"]["weight"] = float(weight) * value
        rendered.append(copied)
    config["models"][position:position + 1] = rendered
    if capability is not None:
        kept = [e for e in config["models"] if isinstance(e, dict) and e.get("model") == CAPABILITY_PLACEHOLDER]
        if len(kept) != 1:
            raise DataError(source, "models", f"exactly one model entry `model: {CAPABILITY_PLACEHOLDER}`",
                            f"{len(kept)} such entries")
        kept[0].update(model=str(capability), parameters={**(kept[0].get("parameters") or {}), "weight": float(mu)})
    for other in config["models"]:
        if other not in rendered and other.get("model") == BASE_PLACEHOLDER:
            other["model"] = str(base)
    return config, keys if several else keys[0]
