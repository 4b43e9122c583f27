"""A sweep file read into a validated plan: its points, and the jobs that make their models.

A sweep varies one debiasing stage's knob(s) and evaluates every setting with lm-eval:

    base: default                         # a model folder, default (SmolLM2-135M) or builtin:NAME
    method: negate                        # negate, or any registered training stage (debias_plugin.methods)
    fixed: {adapter: runs/dghs_lora}      # the stage's options that stay fixed (its CLI flags, with underscores)
    grid: {lambda: [0.1, 0.2, 0.5]}       # settings to try, all combinations ...
    search: {lambda: [0, 1]}              # ... or one knob's range for the budget search ...
    search: {sampler: tpe, trials: 24, knobs: {lambda: {low: 0, high: 1}, mu: {low: 0, high: 1}}}  # ... or Optuna
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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from debias_plugin.errors import DebiasError
from debias_plugin.sweep.schema import SweepConfig, SweepFileError, KEYS_AT, expand_variables
from debias_plugin.sweep.stage import stage_class, stage_problems
from debias_plugin.yamlfile import config_text, describe_error, field_text, line_of, read_yaml, validation_problems

STEP = "step"
SCHEMA = "debias_plugin.sweep/1"


@dataclass(frozen=True)
class Point:
    """One evaluated setting: a model folder (made by its job) and its lm-eval results."""

    key: str  # canonical id: "base" or the JSON of its parameters
    name: str  # folder name under trials/
    role: Literal["reference", "grid", "search", "checkpoint", "sampled"]
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
    sampled: list[dict] = field(default_factory=list)  # a sampled search's proposals so far (storage.sync_sampled)

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
    def base_settings(self) -> dict | None:
        """The stage's setting that is the base model itself (negation's lambda 0), if it has one."""
        find = getattr(stage_class(self.config.method), "base_settings", None)
        return find(self.config.fixed) if find else None

    @property
    def search_knob(self) -> str | None:
        return next(iter(self.config.search)) if self.config.search else None

    @property
    def sampling(self):
        """The several-knob search (`search: {sampler, trials, knobs}`), or None."""
        return self.config.sampling

    @property
    def knob(self) -> str | None:
        """The x axis of the per-knob plot: lambda, step, the searched or the only grid key (None: several)."""
        if self.config.checkpoints:
            return STEP
        if self.search_knob:
            return self.search_knob
        if self.sampling:
            return next(iter(self.sampling.knobs)) if len(self.sampling.knobs) == 1 else None
        grid = self.config.grid or {}
        return next(iter(grid)) if len(grid) == 1 else None

    @property
    def reference_knob_value(self) -> float | None:
        """Where the base model sits on the knob axis: step 0, the stage's base setting (negation's lambda 0);
        None for other knobs and for negate-and-retain, whose lambda 0 still adds mu times the capability vector."""
        if self.config.checkpoints:
            return 0.0
        base = self.base_settings or {}
        return float(base[self.knob]) if self.knob in base else None

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
        if self.sampling:
            keys = {"base"}
            for settings in self.sampled:  # a repeated proposal (or the base itself) is evaluated once
                if self.sampled_key(settings) not in keys:
                    keys.add(self.sampled_key(settings))
                    jobs.append(self.sample_job(settings))
            return jobs
        grid = self.config.grid or {}
        seen = set()
        for values in itertools.product(*grid.values()):
            settings = dict(zip(grid, values))
            if self._is_base(settings):
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

    def _is_base(self, settings: dict) -> bool:
        base = self.base_settings
        return bool(base) and all(isinstance(settings.get(key), (int, float)) and not isinstance(settings[key], bool)
                                  and float(settings[key]) == value for key, value in base.items())

    def search_job(self, value: float) -> Job:
        settings = {self.search_knob: value}
        key = "model:" + canonical(settings)
        return Job(key, folder_name(settings), settings, (self._point(settings, "search", key),))

    def sampled_key(self, settings: dict) -> str:
        """The point a sampler's proposal evaluates: the base model's where the stage says it is the base."""
        return "base" if self._is_base(settings) else canonical(settings)

    def sample_job(self, settings: dict) -> Job:
        key = "model:" + canonical(settings)
        return Job(key, folder_name(settings), settings, (self._point(settings, "sampled", key),))

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
    """Our task naming: crows_bias covers crows_bias_gender, ... (lm-eval confirms in check_tasks); not the split's
    or the overall tasks (crows_bias_selection_gender, crows_bias_overall_heldout: other pairs or another task)."""
    return any(task.startswith(group + "_") and not _sibling_task(group, task) for task in tasks)


def _sibling_task(group: str, task: str) -> bool:
    from debias_plugin.data.crows import CROWS_HALVES, CROWS_OVERALL_TASK

    rest = task[len(group) + 1:]
    return task.startswith(CROWS_OVERALL_TASK) or any(rest == half or rest.startswith(half + "_")
                                                      for half in CROWS_HALVES)



def load_sweep(path: str | Path, *, text: str | None = None) -> Sweep:
    """Read and validate a sweep file (structure, the stage's own options); raises SweepFileError / DataError."""
    path = Path(path).expanduser().resolve()
    if text is None:
        if not path.is_file():
            raise DebiasError(f"{path}: the sweep file does not exist.")
        text = config_text(path)
    data, lines = read_yaml(path, text, "sweep", error=SweepFileError)
    problems: list[tuple[int, str, str]] = []
    if "sampling" in data:  # the field behind `search: {knobs: ...}`, not a key of the file
        loc = ("sampling",)
        raise SweepFileError(path, [(line_of(lines, loc), "sampling", describe_error(
            {"type": "extra_forbidden"}, loc, KEYS_AT))])
    data = {key: (expand_variables(value, (key,), problems, lines) if key in ("base", "fixed", "grid") else value)
            for key, value in data.items()}
    if problems:
        raise SweepFileError(path, problems)
    try:
        config = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise SweepFileError(path, validation_problems(_as_written(err), lines, KEYS_AT)) from None
    sweep = Sweep(path, text, config, lines)
    problems = _plan_problems(sweep) or stage_problems(sweep)
    if problems:
        raise sweep.errors(problems)
    return sweep


class _as_written:  # noqa: N801 - validation_problems reads .errors() only
    """A validation error located as the file writes it: the several-knob `sampling` field is `search`."""

    def __init__(self, err: ValidationError):
        self.err = err

    def errors(self) -> list[dict]:
        return [{**error, "loc": ("search", *error["loc"][1:])} if error["loc"][:1] == ("sampling",) else error
                for error in self.err.errors()]


# ----------------------------------------------------------------------------------------------- cross-field checks

def _plan_problems(sweep: Sweep) -> list[tuple[tuple, str]]:
    config, problems = sweep.config, []
    grid, search = config.grid or {}, config.search or {}
    if grid and (search or config.sampling):
        problems.append((("search",), "give either grid (settings to try) or search (one knob's range), not both"))
    for key in (config.sampling.knobs if config.sampling else {}):
        if key in config.fixed:
            problems.append((("search", "knobs", key), f"'{key}' is also in fixed"))
    if config.sampling and config.checkpoints:
        problems.append((("checkpoints",), "a checkpoint sweep evaluates the steps of one run; it cannot be "
                         "combined with search"))
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
    if not grid and not search and not config.sampling and not config.checkpoints:
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
    return problems


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
