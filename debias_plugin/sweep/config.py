"""The sweep file: YAML (safe_load only) validated by pydantic, every error naming the file, its line and field.

A sweep varies one debiasing stage's knob(s) and evaluates every setting with lm-eval:

    base: default                         # a model folder, default (SmolLM2-135M) or builtin:NAME
    method: negate                        # negate, or any registered training stage (debias_plugin.methods)
    fixed: {adapter: runs/dghs_lora}      # the stage's options that stay fixed (its CLI flags, with underscores)
    grid: {lambda: [0.1, 0.2, 0.5]}       # settings to try, all combinations ...
    search: {lambda: [0, 1]}              # ... or one knob's range for the budget search
    checkpoints: [10, 20, 30]             # training stages: evaluate these steps of ONE run
    evaluate: [crows_bias, stereoset_bias, wikitext2_ppl]
    objective: crows_bias/pct_stereotype  # |value - target| is minimised (target: 50)
    budget: {wikitext2_ppl/word_perplexity: {max_relative_increase: 0.02}}   # relative to the base model

Strings may use ${VAR} (environment; ${DEBIAS_DATA_DIR} falls back to the data folder the loaders use). Relative
paths are relative to the working directory, as the same values would be on the stage's command line.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from debias_plugin.errors import DebiasError
from debias_plugin.yamlfile import (ConfigFileError, Label, TaskMetric, describe_error, field_text, line_of, read_yaml,
                                    schema_keys, validation_problems)

NEGATE = "negate"
NEGATE_KNOB = "lambda"
NEGATE_FIXED = ("biased", "adapter", "template", "shard_size", "capability", "mu")
# TrainConfig fields the sweep sets itself for every trial
RESERVED_TRAINING_FIELDS = ("model", "output", "force", "snapshot_steps")
STEP = "step"
SCHEMA = "debias_plugin.sweep/1"
_VARIABLE = re.compile(r"\$\{(\w+)\}")


class BudgetRule(BaseModel):
    """One quality constraint on a metric, judged against the base model's value where relative."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_relative_increase: float | None = Field(None, ge=0)
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in ("max_relative_increase", "max", "min") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of max_relative_increase, max, min (found {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in ("max_relative_increase", "max", "min") if getattr(self, name) is not None)

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        return "maximize" if self.kind == "min" else "minimize"

    def limit(self, reference: float | None) -> float | None:
        """The value the metric may reach; None when the reference it is relative to is unknown."""
        if self.kind == "max_relative_increase":
            return None if reference is None or not math.isfinite(reference) else reference * (1 + self.max_relative_increase)
        return self.max if self.kind == "max" else self.min

    def holds(self, value: float | None, reference: float | None) -> bool:
        limit = self.limit(reference)
        if value is None or limit is None or not math.isfinite(value):
            return False
        return value >= limit if self.kind == "min" else value <= limit

    def describe(self) -> str:
        if self.kind == "max_relative_increase":
            return f"at most {100 * self.max_relative_increase:g}% above the base model"
        return f"<= {self.max:g}" if self.kind == "max" else f">= {self.min:g}"


class SweepConfig(BaseModel):
    """Everything a sweep needs; see the module docstring for an example."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Label | None = None
    base: str
    method: str
    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] | None = None
    search: dict[str, list[float]] | None = None
    tolerance: float | None = Field(None, gt=0)
    max_evaluations: int = Field(8, ge=2, le=64)
    checkpoints: list[int] | None = Field(None, min_length=1)
    evaluate: list[str] = Field(min_length=1)
    screen: list[str] | None = Field(None, min_length=1)
    objective: TaskMetric
    target: float = 50.0
    budget: dict[TaskMetric, BudgetRule] = Field(default_factory=dict)
    limit: int | None = Field(None, ge=1)
    batch_size: int | Literal["auto"] = 16
    device: str | None = None
    model_args: dict[str, str | int | float | bool] = Field(default_factory=dict)
    alpha: float = Field(0.05, gt=0, le=0.5)
    resamples: int = Field(1000, ge=100)
    seed: int = 0


@dataclass(frozen=True)
class Point:
    """One evaluated setting: a model folder (made by its job) and its lm-eval results."""

    key: str  # canonical id: "base" or the JSON of its parameters
    name: str  # folder name under trials/
    role: Literal["reference", "grid", "search", "checkpoint"]
    params: dict = field(hash=False, compare=False)
    job: str


@dataclass(frozen=True)
class Job:
    """One unit of work: make the model(s) of its points (one negation, one training run) and evaluate them."""

    key: str
    name: str
    settings: dict = field(hash=False, compare=False)  # the stage's varied options (no step)
    points: tuple[Point, ...] = ()


@dataclass
class Sweep:
    """A validated sweep file: its config, where each key sits in the file, and the derived plan."""

    path: Path
    text: str
    config: SweepConfig
    lines: dict[tuple, int]

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        """Hash of the validated content (not of comments or layout): one study per distinct sweep."""
        payload = json.dumps(self.config.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def study_name(self) -> str:
        return f"debias-sweep-{self.config.name or self.config.method}-{self.sha256[:12]}"

    # -- errors ---------------------------------------------------------------------------------------------
    def line(self, *loc) -> int:
        return line_of(self.lines, loc)

    def error(self, loc: tuple, message: str) -> SweepFileError:
        return self.errors([(loc, message)])

    def errors(self, problems: list[tuple[tuple, str]]) -> SweepFileError:
        return SweepFileError(self.path, [(self.line(*loc), field_text(loc), message) for loc, message in problems])

    # -- what varies ----------------------------------------------------------------------------------------
    @property
    def is_negate(self) -> bool:
        return self.config.method == NEGATE

    @property
    def search_knob(self) -> str | None:
        return next(iter(self.config.search)) if self.config.search else None

    @property
    def knob(self) -> str | None:
        """The x axis of the per-knob plot: lambda, step, the searched or the only grid key (None: several)."""
        if self.config.checkpoints:
            return STEP
        if self.search_knob:
            return self.search_knob
        grid = self.config.grid or {}
        return next(iter(grid)) if len(grid) == 1 else None

    @property
    def reference_knob_value(self) -> float | None:
        """Where the base model sits on the knob axis: lambda 0, step 0; None for other knobs and for
        negate-and-retain, whose lambda 0 still adds mu times the capability vector."""
        if self.is_negate:
            return None if self.config.fixed.get("capability") else 0.0
        return 0.0 if self.config.checkpoints else None

    @property
    def screen_tasks(self) -> list[str]:
        """Tasks run at every point: the screen list, or just the tasks the objective and budget read."""
        if self.config.screen:
            return list(self.config.screen)
        needed = [metric.split("/")[0] for _, metric in _read_metrics(self.config)]
        chosen = [task for task in self.config.evaluate if task in needed or _covers(task, needed)]
        for task in needed:  # a subtask of a listed group: evaluate the subtask itself
            if task not in chosen and not any(_covers(group, [task]) for group in chosen):
                chosen.append(task)
        return chosen

    @property
    def full_tasks(self) -> list[str]:
        """Tasks added on the Pareto front (every evaluate task the screen did not run)."""
        screen = self.screen_tasks
        return [task for task in self.config.evaluate if task not in screen]

    @property
    def directions(self) -> list[str]:
        return ["minimize"] + [rule.direction for rule in self.config.budget.values()]

    # -- plan -----------------------------------------------------------------------------------------------
    def reference_point(self) -> Point:
        return Point("base", "base", "reference", {}, "reference")

    def jobs(self) -> list[Job]:
        """The reference job, then one job per grid setting (a checkpoint run is one job with many points)."""
        jobs = [Job("reference", "base", {}, (self.reference_point(),))]
        if self.config.search:
            return jobs
        grid = self.config.grid or {}
        seen = set()
        for values in itertools.product(*grid.values()):
            settings = dict(zip(grid, values))
            if self.is_negate and float(settings[NEGATE_KNOB]) == self.reference_knob_value:
                continue  # the base model itself: the reference point
            key = "model:" + canonical(settings)
            if key in seen:
                continue
            seen.add(key)
            name = folder_name(settings) or "run"
            if self.config.checkpoints:
                points = tuple(self._point({**settings, STEP: step}, "checkpoint", key)
                               for step in self.config.checkpoints)
            else:
                points = (self._point(settings, "grid", key),)
            jobs.append(Job(key, name, settings, points))
        return jobs

    def search_job(self, value: float) -> Job:
        settings = {self.search_knob: value}
        key = "model:" + canonical(settings)
        return Job(key, folder_name(settings), settings, (self._point(settings, "search", key),))

    def _point(self, params: dict, role: str, job: str) -> Point:
        return Point(canonical(params), folder_name(params), role, dict(params), job)


# ----------------------------------------------------------------------------------------------- naming

def canonical(params: dict) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def _format_value(value) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "+".join(_format_value(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def folder_name(params: dict) -> str:
    """lambda_0.25, lr_1e-05-step_20: readable, filesystem- and lm-eval-argument-safe (no '=' or ',')."""
    name = "-".join(f"{key}_{_format_value(params[key])}" for key in params if key != STEP)
    if STEP in params:
        name = f"{name}-step_{params[STEP]}" if name else f"step_{params[STEP]}"
    if len(name) > 80:
        name = name[:60] + "-" + hashlib.sha256(canonical(params).encode()).hexdigest()[:12]
    return name


def _read_metrics(config: SweepConfig) -> list[tuple[tuple, str]]:
    """(where in the file, task/metric) of the objective and each budget rule: the metrics every point needs."""
    return [(("objective",), config.objective)] + [(("budget", metric), metric) for metric in config.budget]


def _covers(group: str, tasks: list[str]) -> bool:
    """Our task naming: crows_bias covers crows_bias_gender, ... (lm-eval confirms in check_tasks)."""
    return any(task.startswith(group + "_") for task in tasks)


# ----------------------------------------------------------------------------------------------- YAML + errors

class SweepFileError(ConfigFileError):
    def __init__(self, path: Path, problems: list[tuple[int, str, str]]):
        super().__init__(path, problems, "sweep")


_keys_at = schema_keys(SweepConfig, {"budget": BudgetRule})


def expand_variables(value, loc: tuple, problems: list, lines):
    """${VAR} in strings (recursively); ${DEBIAS_DATA_DIR} falls back to the loaders' data folder."""
    if isinstance(value, str):
        def substitute(match):
            name = match.group(1)
            found = os.environ.get(name)
            if found is None and name == "DEBIAS_DATA_DIR":
                from debias_plugin.paths import data_root

                root = data_root()
                found = str(root) if root else None
            if found is None:
                problems.append((line_of(lines, loc), field_text(loc), f"the environment variable {name} is not set"))
                return match.group(0)
            return found

        return _VARIABLE.sub(substitute, value)
    if isinstance(value, list):
        return [expand_variables(item, loc + (i,), problems, lines) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {key: expand_variables(item, loc + (key,), problems, lines) for key, item in value.items()}
    return value


def load_sweep(path: str | Path, *, text: str | None = None) -> Sweep:
    """Read and validate a sweep file (structure, the stage's own options); raises SweepFileError / DataError."""
    from debias_plugin.data._io import read_text

    path = Path(path).expanduser().resolve()
    if text is None:
        if not path.is_file():
            raise DebiasError(f"{path}: the sweep file does not exist.")
        text = read_text(path)
    data, lines = read_yaml(path, text, "sweep", error=SweepFileError)
    problems: list[tuple[int, str, str]] = []
    data = {key: (expand_variables(value, (key,), problems, lines) if key in ("base", "fixed", "grid") else value)
            for key, value in data.items()}
    if problems:
        raise SweepFileError(path, problems)
    try:
        config = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise SweepFileError(path, validation_problems(err, lines, _keys_at)) from None
    sweep = Sweep(path, text, config, lines)
    problems = _plan_problems(sweep) or _stage_problems(sweep)
    if problems:
        raise sweep.errors(problems)
    return sweep


# ----------------------------------------------------------------------------------------------- cross-field checks

def _plan_problems(sweep: Sweep) -> list[tuple[tuple, str]]:
    config, problems = sweep.config, []
    grid, search = config.grid or {}, config.search or {}
    if grid and search:
        problems.append((("search",), "give either grid (settings to try) or search (one knob's range), not both"))
    for key, values in grid.items():
        if not values:
            problems.append((("grid", key), "list at least one value"))
        if key in config.fixed:
            problems.append((("grid", key), f"'{key}' is also in fixed"))
    if search:
        if len(search) != 1:
            problems.append((("search",), f"the budget search varies one knob (found {', '.join(search)})"))
        for key, bounds in search.items():
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                problems.append((("search", key), f"give [low, high] with low < high (found {bounds})"))
            if key in config.fixed:
                problems.append((("search", key), f"'{key}' is also in fixed"))
        if config.checkpoints:
            problems.append((("checkpoints",), "a checkpoint sweep evaluates the steps of one run; it cannot be "
                             "combined with search"))
    if not grid and not search and not config.checkpoints:
        problems.append(((), "nothing varies: give grid, search or (training stages) checkpoints"))
    if config.checkpoints:
        steps = config.checkpoints
        if sorted(set(steps)) != steps or steps[0] < 1:
            problems.append((("checkpoints",), f"list increasing steps >= 1 (found {steps})"))
        if STEP in grid or "steps" in grid:
            problems.append((("grid", "steps" if "steps" in grid else STEP), "the steps of a checkpoint sweep come "
                             "from checkpoints, not from the grid"))
        fixed_steps = config.fixed.get("steps")
        if isinstance(fixed_steps, int) and fixed_steps < steps[-1]:
            problems.append((("fixed", "steps"), f"the run must reach the last checkpoint {steps[-1]} "
                             f"(found steps {fixed_steps})"))
    for index, task in enumerate(config.screen or []):
        if task not in config.evaluate:
            problems.append((("screen", index), f"'{task}' is not in evaluate"))
    screen = sweep.screen_tasks if not problems else []
    for loc, metric in _read_metrics(config):
        task = metric.split("/")[0]
        if config.screen and task not in screen and not any(_covers(group, [task]) for group in screen):
            problems.append((loc, f"the task '{task}' must be in screen: every point needs it"))
    if sweep.is_negate:
        problems += _negate_problems(sweep)
    return problems


def _negate_problems(sweep: Sweep) -> list[tuple[tuple, str]]:
    config, problems = sweep.config, []
    for section in ("grid", "search"):
        for knob in getattr(config, section) or {}:
            if knob != NEGATE_KNOB:
                problems.append(((section, knob), f"negate varies only '{NEGATE_KNOB}'"))
    if config.checkpoints:
        problems.append((("checkpoints",), "negate has no training steps: use grid or search over lambda"))
    for key in config.fixed:
        if key not in NEGATE_FIXED:
            problems.append((("fixed", key), f"unknown negate option '{key}'; allowed: {', '.join(NEGATE_FIXED)}"))
    if (config.fixed.get("capability") is None) != (config.fixed.get("mu") is None):
        problems.append((("fixed",), "negate-and-retain needs both capability (a model fine-tuned on neutral text) "
                         "and mu (its weight > 0)"))
    given = [key for key in ("biased", "adapter") if config.fixed.get(key) is not None]
    if len(given) != 1:
        problems.append((("fixed",), "negate needs exactly one of biased (a fine-tuned model folder) and adapter "
                         f"(a LoRA adapter) (found {', '.join(given) or 'none'})"))
    for index, value in enumerate((config.grid or {}).get(NEGATE_KNOB, [])):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            problems.append((("grid", NEGATE_KNOB, index), f"lambda must be a number >= 0 (found {value!r}; 0 is "
                             "the base model)"))
    for value in (config.search or {}).get(NEGATE_KNOB, [])[:2]:
        if value < 0:
            problems.append((("search", NEGATE_KNOB), f"lambda must be >= 0 (found {value:g})"))
    return problems


def _stage_problems(sweep: Sweep) -> list[tuple[tuple, str]]:
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


def search_is_integer(sweep: Sweep) -> bool:
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


def training_settings(sweep: Sweep, settings: dict, output: Path, *, base: str) -> tuple[Any, Any]:
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
        message = error["msg"] if error["type"] == "extra_forbidden" else describe_error(error, loc, _keys_at)
        raise _OptionError(loc, message) from None


def check_tasks(sweep: Sweep) -> None:
    """Tasks lm-eval knows, and objective/budget metrics a listed task (or subtask) reports: before any model loads."""
    from debias_plugin.evaluation import UnknownTaskError, describe_tasks

    config, problems = sweep.config, []
    try:
        described = describe_tasks(list(dict.fromkeys(config.evaluate + sweep.screen_tasks)))
    except UnknownTaskError as err:
        index = config.evaluate.index(err.task) if err.task in config.evaluate else None
        loc = ("evaluate", index) if index is not None else ("evaluate",)
        raise sweep.error(loc, str(err).rstrip(".")) from None
    for loc, metric in _read_metrics(config):
        task, name = metric.split("/", 1)
        if task not in described:
            problems.append((loc, f"'{task}' is neither an evaluate task nor one of their subtasks"))
        elif described[task] is not None and name.split(",")[0] not in described[task]:
            problems.append((loc, f"{task} reports {', '.join(sorted(described[task]))}, not '{name}'"))
    if problems:
        raise sweep.errors(problems)
