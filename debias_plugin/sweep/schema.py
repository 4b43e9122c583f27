"""The sweep file's schema: YAML (safe_load only) validated by pydantic, every error naming the file, line and field.

Strings may use ${VAR} (environment; ${DEBIAS_DATA_DIR} falls back to the data folder the loaders use).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from debias_plugin.yamlfile import ConfigFileError, Count, Label, TaskMetric, field_text, line_of, schema_keys

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


class KnobRange(BaseModel):
    """One knob of a sampled search: its range, optionally on a log scale or a step grid."""

    model_config = ConfigDict(extra="forbid", strict=True)

    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"give low < high (found low {self.low:g}, high {self.high:g})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log needs low > 0 and no step")
        return self


SAMPLERS = ("tpe", "gp", "nsga2")


class KnobSearch(BaseModel):
    """Several knobs at once: Optuna's sampler proposes `trials` settings, `batch` at a time."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sampler: Literal["tpe", "gp", "nsga2"] = "tpe"
    trials: int = Field(ge=1, le=512)
    seed: int = 0
    batch: int | None = Field(None, ge=1, le=64)
    startup: int | None = Field(None, ge=1)
    knobs: dict[str, KnobRange] = Field(min_length=1, max_length=6)

    @property
    def batch_size(self) -> int:
        """Proposals made together from the settings finished before them (NSGA-II's population)."""
        return self.batch or (min(4, self.trials) if self.sampler == "nsga2" else 1)

    @property
    def startup_trials(self) -> int:
        """Random proposals before TPE / GP model the results (Optuna's n_startup_trials)."""
        return self.startup or min(10, max(1, self.trials // 3))


def is_knob_search(value) -> bool:
    """`search: {sampler, trials, knobs, ...}` (several knobs) rather than `search: {knob: [low, high]}`."""
    return isinstance(value, dict) and any(key in value for key in ("knobs", "sampler", "trials"))


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
    batch_size: Count | Literal["auto"] = 16
    device: str | None = None
    model_args: dict[str, str | int | float | bool] = Field(default_factory=dict)
    alpha: float = Field(0.05, gt=0, le=0.5)
    resamples: int = Field(1000, ge=100)
    seed: int = 0
    evaluation: Literal["sequential", "full"] = "sequential"  # sequential: points screened on growing chunks
    order_seed: int = 0  # the one document order of a sequential screen
    sampling: KnobSearch | None = None  # written as `search:` with knobs (see _knob_search)
    types_not_worse: bool = False  # a point with a CrowS type / StereoSet domain worse than the base is infeasible

    @model_validator(mode="before")
    @classmethod
    def _knob_search(cls, data):
        """The several-knob form of `search` is its own field, so `search` stays the one-knob budget search."""
        if isinstance(data, dict) and is_knob_search(data.get("search")) and "sampling" not in data:
            data = {**data, "sampling": data["search"]}
            del data["search"]
        return data

    @model_serializer(mode="wrap")
    def _without_unused_sampling(self, handler):
        """A sweep without several knobs or types_not_worse dumps (and hashes) exactly as before they existed."""
        dumped = handler(self)
        if isinstance(dumped, dict) and dumped.get("sampling") is None:
            dumped.pop("sampling", None)
        if isinstance(dumped, dict) and not dumped.get("types_not_worse"):
            dumped.pop("types_not_worse", None)
        if isinstance(dumped, dict) and dumped.get("evaluation") == "sequential" and not dumped.get("order_seed"):
            dumped.pop("evaluation", None)  # the defaults: a sweep folder made before them resumes (same study)
            dumped.pop("order_seed", None)
        return dumped


class SweepFileError(ConfigFileError):
    def __init__(self, path: Path, problems: list[tuple[int, str, str]]):
        super().__init__(path, problems, "sweep")


_KEYS_AT = schema_keys(SweepConfig, {"budget": BudgetRule})


def KEYS_AT(loc: tuple) -> tuple[str, ...]:  # noqa: N802 - the same name the one-model schema_keys had
    """Keys allowed at a location: the schema's, and a several-knob search's (search.*, search.knobs.NAME.*)."""
    loc = tuple("search" if i == 0 and part == "sampling" else part for i, part in enumerate(loc))
    if loc[:1] == ("search",) and len(loc) == 2:
        return tuple(KnobSearch.model_fields)
    if loc[:2] == ("search", "knobs") and len(loc) == 4:
        return tuple(KnobRange.model_fields)
    return tuple(key for key in _KEYS_AT(loc) if len(loc) != 1 or key != "sampling")


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

