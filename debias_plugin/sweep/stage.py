"""A sweep's stage: one that makes a folder (negation, a bias direction, Self-Debias) or a training stage, looked up
by name, its options from fixed + varied values (split between the shared training config and the stage's own
options), validated before any model loads."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from debias_plugin.errors import DebiasError
from debias_plugin.sweep.schema import KEYS_AT
from debias_plugin.yamlfile import describe_error

# Stages that do not train, name -> "module:Class" (imported when used): each has make() and Options
STAGES = {"negate": "debias_plugin.merge.stage:NegateStage",
          "direction": "debias_plugin.methods.direction:DirectionStage",
          "selfdebias": "debias_plugin.lm_eval.selfdebias:SelfDebiasStage"}
# TrainConfig fields the sweep sets itself for every trial
RESERVED_TRAINING_FIELDS = ("model", "output", "force", "snapshot_steps")


def stage_class(name: str):
    """The stage registered as `name`: negation (a merge), a bias direction (steering file or folded LEACE),
    Self-Debias (the base through hf-selfdebias) or a TrainingMethod subclass (debias_plugin.methods)."""
    from debias_plugin.methods import available_methods, method_class

    if name in STAGES:
        module, attribute = STAGES[name].split(":")
        return getattr(importlib.import_module(module), attribute)
    if name not in available_methods():
        known = sorted([*STAGES, *available_methods()])
        raise DebiasError(f"Unknown stage '{name}'; expected one of {', '.join(known)}.")
    return method_class(name)


def trains(stage) -> bool:
    """Whether the stage runs the shared training loop (its options split with TrainConfig; checkpoints apply)."""
    return not hasattr(stage, "make")


def option_fields(stage) -> dict:
    """Option name as written in a sweep file -> pydantic field: TrainConfig's (training stages) and the stage's."""
    own = {info.alias or name: info for name, info in stage.Options.model_fields.items()}
    if not trains(stage):
        return own
    from debias_plugin.training import TrainConfig

    return {**TrainConfig.model_fields, **own}


def stage_problems(sweep) -> list[tuple[tuple, str]]:
    """Every fixed/grid/search key is one of the stage's options, and each trial's values pass its pydantic
    validation, before any model loads."""
    config = sweep.config
    try:
        stage = stage_class(config.method)
    except DebiasError as err:
        return [(("method",), str(err).rstrip("."))]
    problems = []
    if config.checkpoints and not trains(stage):
        problems.append((("checkpoints",), f"{config.method} has no training steps: use grid or search"))
    fields = option_fields(stage)
    knobs = config.sampling.knobs if config.sampling else {}
    for section, values in [(("fixed",), config.fixed), (("grid",), config.grid or {}),
                            (("search",), config.search or {}), (("search", "knobs"), knobs)]:
        for key in values:
            if trains(stage) and key in RESERVED_TRAINING_FIELDS:
                problems.append(((*section, key), f"'{key}' is set by the sweep for every trial"))
            elif key in getattr(stage, "unused_training_options", ()):
                problems.append(((*section, key), f"{config.method} does not use '{key}'"))
            elif key not in fields:
                known = sorted(set(fields) - set(RESERVED_TRAINING_FIELDS))
                problems.append(((*section, key), f"unknown option '{key}' of {config.method}; known: {', '.join(known)}"))
    for section, key in [(("search",), key) for key in config.search or {}] + [(("search", "knobs"), k) for k in knobs]:
        annotation = fields[key].annotation if key in fields else None
        if annotation is not None and annotation not in (int, float) and "float" not in str(annotation):
            what = "the budget search" if len(section) == 1 else "a sampled search"
            problems.append(((*section, key), f"{what} needs a numeric knob; '{key}' is {annotation}"))
    if problems:
        return problems
    if config.search:
        jobs = [sweep.search_job(bound) for bound in config.search[sweep.search_knob]]
    elif config.sampling:  # the two corners of the knobs' box
        jobs = [sweep.sample_job(corner) for corner in sampling_corners(sweep)]
    else:
        jobs = sweep.jobs()[1:]
    for job in jobs:
        try:
            stage_settings(sweep, job.settings, Path("/nonexistent/output"), base="/nonexistent/base")
        except _OptionError as err:
            problems.append((err.loc, err.message))
            break
    return problems


class _OptionError(Exception):
    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc, self.message = loc, message


def integer_knobs(sweep) -> set[str]:
    """The sampled knobs whose option is an int (Optuna proposes them as IntDistribution)."""
    fields = option_fields(stage_class(sweep.config.method))
    return {key for key in (sweep.sampling.knobs if sweep.sampling else {}) if fields[key].annotation is int}


def sampling_corners(sweep) -> list[dict]:
    """Every sampled knob at its low end, then every one at its high end."""
    integers = integer_knobs(sweep)
    return [{key: int(getattr(knob, end)) if key in integers else getattr(knob, end)
             for key, knob in sweep.sampling.knobs.items()} for end in ("low", "high")]


def evaluated_as(sweep, settings: dict, made: Path, base: Path) -> tuple[Path, str | None, dict]:
    """(model folder, lm-eval model class or None for the folder's own, extra model_args) that score a point:
    the stage's own answer where it has one (a direction's steering file is the base through hf-steered-safe),
    else the made folder itself."""
    stage = stage_class(sweep.config.method)
    if not hasattr(stage, "evaluated_as") or made == base:
        return made, None, {}
    _, options = stage_settings(sweep, settings, made, base=str(base))
    return stage(options).evaluated_as(base, made)


def search_is_integer(sweep) -> bool:
    if not sweep.config.search:
        return False
    return option_fields(stage_class(sweep.config.method))[sweep.search_knob].annotation is int


def input_paths(sweep) -> list[Path]:
    """The files and folders the stage reads (options typed InputPath): an output folder must not overlap them."""
    from debias_plugin.options import input_options

    paths = []
    for key, marker in input_options(stage_class(sweep.config.method).Options).items():
        value = sweep.config.fixed.get(key)
        for item in value if isinstance(value, list) else [value]:  # several bias vectors: a list of folders
            if isinstance(item, str) and (not marker.or_name or Path(item).expanduser().exists()):
                paths.append(Path(item).expanduser())
    return paths


def split_stage_options(method, values: dict) -> tuple[dict, dict]:
    """(TrainConfig values with the stage's training defaults, the rest for the stage's Options)."""
    if not trains(method):
        return {}, dict(values)
    from debias_plugin.training import TrainConfig

    shared = {key: value for key, value in values.items() if key in TrainConfig.model_fields}
    for key, value in method.training_defaults.items():
        shared.setdefault(key, value)
    return shared, {key: value for key, value in values.items() if key not in TrainConfig.model_fields}


def stage_settings(sweep, settings: dict, output: Path, *, base: str) -> tuple[Any, Any]:
    """(TrainConfig or None for a stage that does not train, the stage's Options) of one job: fixed + varied
    values split between them by field name."""
    config = sweep.config
    stage = stage_class(config.method)
    shared, own = split_stage_options(stage, {**config.fixed, **settings})
    try:
        if not trains(stage):
            return None, stage.Options.model_validate(own)
        from debias_plugin.training import TrainConfig

        if sweep.search_knob in shared and TrainConfig.model_fields[sweep.search_knob].annotation is int:
            shared[sweep.search_knob] = int(round(shared[sweep.search_knob]))
        if config.checkpoints:
            shared.setdefault("steps", config.checkpoints[-1])
            shared["snapshot_steps"] = list(config.checkpoints)
        shared.update(model=str(base), output=str(output))
        return TrainConfig.model_validate(shared), stage.Options.model_validate(own)
    except ValidationError as err:
        error = err.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        if name in settings and name in (config.grid or {}):
            values = config.grid[name]
            loc = ("grid", name, values.index(settings[name])) if settings[name] in values else ("grid", name)
        elif name in settings and name in (config.search or {}):
            loc = ("search", name)
        elif name in settings and config.sampling and name in config.sampling.knobs:
            loc = ("search", "knobs", name)
        elif name in config.fixed:
            loc = ("fixed", name)
        elif name == "snapshot_steps":
            loc = ("checkpoints",)
        else:
            loc = ("fixed",)
        message = error["msg"] if error["type"] == "extra_forbidden" else describe_error(error, loc, KEYS_AT)
        raise _OptionError(loc, message) from None
