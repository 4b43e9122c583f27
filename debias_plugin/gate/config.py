"""The gate file: YAML (safe_load only) validated by pydantic, every error naming the file, the line and the field."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from debias_plugin.errors import DataError, DebiasError
from debias_plugin.scoring.specs import find_spec, spec
from debias_plugin.yamlfile import (ConfigFileError, Count, TaskMetric, config_text, field_text, line_of, read_yaml,
                                    schema_keys, validation_problems)

CHECK_KINDS = ("within", "min", "max", "not_worse_than_baseline", "max_relative_increase", "types_not_worse")
BASELINE_KINDS = ("not_worse_than_baseline", "max_relative_increase", "types_not_worse")
TYPES_NOT_WORSE_TITLE = "no CrowS type or StereoSet domain farther from 50 than the baseline (Holm)"


class CheckConfig(BaseModel):
    """One check: a task/metric from the lm-eval results and exactly one requirement on it (types_not_worse: every
    CrowS type and StereoSet domain in the results, no metric)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    metric: TaskMetric | None = None
    name: str | None = None
    within: list[float] | None = Field(None, min_length=2, max_length=2)
    min: float | None = None
    max: float | None = None
    not_worse_than_baseline: Literal[True] | None = None
    max_relative_increase: float | None = Field(None, ge=0)
    types_not_worse: Literal[True] | None = None

    @model_validator(mode="after")
    def _one_requirement(self):
        given = [kind for kind in CHECK_KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(CHECK_KINDS)} (found {', '.join(given) or 'none'})")
        if (self.metric is None) != (self.types_not_worse is not None):
            raise ValueError("types_not_worse tests every CrowS type and StereoSet domain, so it takes no metric"
                             if self.metric is not None else "give the metric to check (task/metric)")
        if self.types_not_worse is not None:
            return self
        if self.within is not None and not self.within[0] < self.within[1]:
            raise ValueError(f"within needs [low, high] with low < high (found {self.within})")
        gap_metric = find_spec(self.metric_name)
        if gap_metric and gap_metric.gap_of:  # its interval and paired test are those of the percentage it comes from
            source, center = gap_metric.gap_of, spec(gap_metric.gap_of).center
            raise ValueError(f"{self.metric_name} is |{source} - {center:g}|: check {self.task}/{source} instead "
                             f"(max: g becomes within: [{center:g} - g, {center:g} + g]; not_worse_than_baseline "
                             f"already compares distances from {center:g})")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in CHECK_KINDS if getattr(self, kind) is not None)

    @property
    def task(self) -> str | None:
        return self.metric.split("/", 1)[0] if self.metric else None

    @property
    def metric_name(self) -> str | None:
        return self.metric.split("/", 1)[1] if self.metric else None

    @property
    def requirement(self) -> str:
        kind = self.kind
        if kind == "within":
            return f"within [{self.within[0]:g}, {self.within[1]:g}]"
        if kind == "min":
            return f">= {self.min:g}"
        if kind == "max":
            return f"<= {self.max:g}"
        if kind == "not_worse_than_baseline":
            return "not worse than baseline"
        if kind == "types_not_worse":
            return "no type worse than baseline"
        return f"relative increase vs baseline <= {self.max_relative_increase:g}"

    @property
    def title(self) -> str:
        if self.kind == "types_not_worse":
            return self.name or TYPES_NOT_WORSE_TITLE
        return self.name or f"{self.metric} {self.requirement}"


class GateConfig(BaseModel):
    """The whole gate: what to evaluate (or read), what to compare against, and the checks."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = None
    model: str | None = None  # a model folder, or "default" for the built-in SmolLM2-135M
    results: str | None = None  # an lm-eval results JSON (samples_*.jsonl beside it): no model run
    baseline: str | None = None  # a model folder, "default", or a results JSON
    tasks: list[str] | None = Field(None, min_length=1)
    checks: list[CheckConfig] = Field(min_length=1)
    alpha: float = Field(0.05, gt=0, le=0.5)
    limit: int | None = Field(None, ge=1)
    batch_size: Count | Literal["auto"] = 16
    device: str | None = None
    model_class: str | None = None  # lm-eval model name; default from the config: hf-bias (causal) or hf-mlm (masked)
    model_args: dict[str, str | int | float | bool] = Field(default_factory=dict)
    resamples: int = Field(2000, ge=100)
    seed: int = 0


def is_results_file(value: str) -> bool:
    return value.lower().endswith(".json")


@dataclass
class Gate:
    path: Path
    config: GateConfig
    lines: dict[tuple, int]

    def line(self, *loc) -> int:
        return line_of(self.lines, loc)

    def where(self, *loc) -> str:
        return f"line {self.line(*loc)}, field '{field_text(loc)}'"

    def error(self, loc: tuple, expected: str, found: str | None = None) -> DataError:
        return DataError(self.path, self.where(*loc), expected, found)

    def resolve(self, value: str) -> Path:
        """Paths in a gate file are relative to the gate file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.path.parent / path).resolve()


_keys_at = schema_keys(GateConfig, {"checks": CheckConfig})


class GateFileError(ConfigFileError):
    def __init__(self, path: Path, problems: list[tuple[int, str, str]]):
        super().__init__(path, problems, "gate")


def load_gate(path: str | Path) -> Gate:
    """Read and validate a gate file; raises GateFileError / DataError (exit code 2 in the CLI)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DebiasError(f"{path}: the gate file does not exist.")
    data, lines = read_yaml(path, config_text(path), "gate", " (model, tasks, checks, ...)", GateFileError)
    try:
        config = GateConfig.model_validate(data)
    except ValidationError as err:
        raise GateFileError(path, validation_problems(err, lines, _keys_at)) from None
    gate = Gate(path, config, lines)
    problems = [(gate.line(*loc), field_text(loc), message) for loc, message in _cross_field_problems(config)]
    if problems:
        raise GateFileError(path, problems)
    return gate


def _cross_field_problems(config: GateConfig) -> list[tuple[tuple, str]]:
    problems = []
    if (config.model is None) == (config.results is None):
        problems.append((("model",) if config.model else (),
                         "give exactly one of 'model' (a model folder or 'default') and 'results' (an lm-eval "
                         "results JSON)"))
    evaluates = config.model is not None or (config.baseline is not None and not is_results_file(config.baseline))
    if evaluates and not config.tasks:
        problems.append((("tasks",), "a model is evaluated, so list the lm-eval tasks to run"))
    if (config.resamples + 1) * config.alpha <= 2:
        problems.append((("resamples",), f"at alpha {config.alpha:g} a bootstrap check needs more than "
                         f"{math.ceil(2 / config.alpha - 1)} resamples to be able to fail (its smallest p-value is "
                         "2 / (resamples + 1))"))
    for index, check in enumerate(config.checks):
        if check.kind in BASELINE_KINDS and config.baseline is None:
            problems.append((("checks", index, check.kind), f"{check.kind} needs a 'baseline' (a model folder or a "
                             "results JSON)"))
    return problems
