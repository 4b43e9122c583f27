"""A stage's options in a sweep: fixed + varied values split between the shared training config and the stage's
own options, validated by pydantic before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from debias_plugin.errors import DebiasError
from debias_plugin.sweep.schema import KEYS_AT
from debias_plugin.yamlfile import describe_error

# TrainConfig fields the sweep sets itself for every trial
RESERVED_TRAINING_FIELDS = ("model", "output", "force", "snapshot_steps")


def stage_problems(sweep) -> list[tuple[tuple, str]]:
    """A training stage's options: every fixed/grid/search key is a TrainConfig or Options field, and each
    trial's values pass pydantic, before any model loads."""
    if sweep.is_negate:
        return []
    from debias_plugin.methods import method_class
    from debias_plugin.training import TrainConfig

    config = sweep.config
    try:
        method = method_class(config.method)
    except DebiasError as err:
        return [(("method",), str(err).rstrip("."))]
    problems = []
    shared, own = TrainConfig.model_fields, method.Options.model_fields
    for section, values in [("fixed", config.fixed), ("grid", config.grid or {}), ("search", config.search or {})]:
        for key in values:
            if key in RESERVED_TRAINING_FIELDS:
                problems.append(((section, key), f"'{key}' is set by the sweep for every trial"))
            elif key in method.unused_training_options:
                problems.append(((section, key), f"{config.method} does not use '{key}'"))
            elif key not in shared and key not in own:
                known = sorted(set(shared) - set(RESERVED_TRAINING_FIELDS) | set(own))
                problems.append(((section, key), f"unknown option '{key}' of {config.method}; known: {', '.join(known)}"))
    for key in config.search or {}:
        annotation = (shared.get(key) or own.get(key)).annotation if (key in shared or key in own) else None
        if annotation is not None and annotation not in (int, float) and "float" not in str(annotation):
            problems.append((("search", key), f"the budget search needs a numeric knob; '{key}' is {annotation}"))
    if problems:
        return problems
    jobs = ([sweep.search_job(bound) for bound in config.search[sweep.search_knob]] if config.search
            else sweep.jobs()[1:])
    for job in jobs:
        try:
            training_settings(sweep, job.settings, Path("/nonexistent/output"), base="/nonexistent/base")
        except _OptionError as err:
            problems.append((err.loc, err.message))
            break
    return problems


class _OptionError(Exception):
    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc, self.message = loc, message


def search_is_integer(sweep) -> bool:
    if sweep.is_negate or not sweep.config.search:
        return False
    from debias_plugin.methods import method_class
    from debias_plugin.training import TrainConfig

    fields = {**TrainConfig.model_fields, **method_class(sweep.config.method).Options.model_fields}
    return fields[sweep.search_knob].annotation is int


def split_stage_options(method, values: dict) -> tuple[dict, dict]:
    """(TrainConfig values with the stage's training defaults, the rest for the stage's Options)."""
    from debias_plugin.training import TrainConfig

    shared = {key: value for key, value in values.items() if key in TrainConfig.model_fields}
    for key, value in method.training_defaults.items():
        shared.setdefault(key, value)
    return shared, {key: value for key, value in values.items() if key not in TrainConfig.model_fields}


def training_settings(sweep, settings: dict, output: Path, *, base: str) -> tuple[Any, Any]:
    """(TrainConfig, the stage's Options) of one job: fixed + varied values split between them by field name."""
    from debias_plugin.methods import method_class
    from debias_plugin.training import TrainConfig

    config = sweep.config
    method = method_class(config.method)
    shared, own = split_stage_options(method, {**config.fixed, **settings})
    if sweep.search_knob in shared and TrainConfig.model_fields[sweep.search_knob].annotation is int:
        shared[sweep.search_knob] = int(round(shared[sweep.search_knob]))
    if config.checkpoints:
        shared.setdefault("steps", config.checkpoints[-1])
        shared["snapshot_steps"] = list(config.checkpoints)
    shared.update(model=str(base), output=str(output))
    try:
        return TrainConfig.model_validate(shared), method.Options.model_validate(own)
    except ValidationError as err:
        error = err.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        if name in settings and name in (config.grid or {}):
            values = config.grid[name]
            loc = ("grid", name, values.index(settings[name])) if settings[name] in values else ("grid", name)
        elif name in settings and name in (config.search or {}):
            loc = ("search", name)
        elif name in config.fixed:
            loc = ("fixed", name)
        elif name == "snapshot_steps":
            loc = ("checkpoints",)
        else:
            loc = ("fixed",)
        message = error["msg"] if error["type"] == "extra_forbidden" else describe_error(error, loc, KEYS_AT)
        raise _OptionError(loc, message) from None
