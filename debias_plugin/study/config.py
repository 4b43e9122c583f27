"""The study file: the same sweeps on several models, and one table of every method at its chosen setting.

    name: two_models
    models: {smollm2-135m: default, gemma3-270m: "builtin:gemma3-270m"}
    objective: crows_bias/pct_stereotype  # optional: one objective and budget for every sweep
    budget: {wikitext2_ppl/word_perplexity: {max_relative_increase: 0.02}}
    types_not_worse: true        # optional: a point with a CrowS type (or StereoSet domain) worse than the base fails
    selection: {split_seed: 0}   # optional: choose on one half of CrowS-Pairs, report the held-out half
    prepare:                     # stage outputs the sweeps read, trained once per model
      dghs_lora: {method: finetune, options: {corpus: ..., column: text, lora: true, steps: 100}}
    sweeps:                      # label -> a sweep file (relative to this file) and the fixed options it changes
      unlearn:                   # models: per model, sweep-file keys replaced (fixed: merged), e.g. its own range
        file: ../sweeps/unlearn_smollm2.yml
        models: {gemma3-270m: {checkpoints: [2, 4, 6]}}
      npo: {file: ../sweeps/unlearn_smollm2.yml, method: npo}     # another stage over the same sweep
      negate: {file: ../sweeps/negate_smollm2.yml, fixed: {adapter: "@dghs_lora"}}

Each model's copy of a sweep (its `base` replaced by the model, `fixed` merged, "@NAME" -> that model's prepared
folder) is written to DIR/<model>/<sweep>.yml and run into DIR/<model>/<sweep>/ by `run_sweep`, so resuming after a
kill, sharing a study storage and the results cache are the sweep's own. DIR/study.json, study.csv and study.md
hold the table (per model: the base and each sweep's chosen point, CrowS-Pairs per type with the sweeps' exact
intervals, StereoSet, WikiText-2 perplexity, costs); plots/tradeoff_<model>.png/.svg every evaluated point.

With `selection:`, every derived sweep evaluates CrowS-Pairs as its two halves (data.crows.crows_split: the sweep
file's crows_bias / crows_bias_overall / per-type tasks become crows_bias_selection, crows_bias_heldout and their
crows_bias_overall_<half> tasks) and screens only the selection half (the objective's task, crows_bias_selection
for types_not_worse) and the budget's tasks, so the choice never sees the held-out pairs or StereoSet; the table's
CrowS columns are the held-out half's. The objective should then read a selection task, e.g.
crows_bias_overall_selection/type_mean_gap with `target: 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from debias_plugin.data.crows import (CROWS_HALVES, CROWS_OVERALL_TASK, CROWS_TASK, CROWS_TYPE_TASKS,
                                      crows_half_task)
from debias_plugin.errors import DebiasError
from debias_plugin.sweep.schema import BudgetRule
from debias_plugin.yamlfile import (ConfigFileError, Label, TaskMetric, config_text, field_text, line_of, read_yaml,
                                    schema_keys, validation_problems)

STUDY_FILE = "study.yml"
PREPARED = "prepared"


class PrepareEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    method: str
    options: dict[str, Any] = {}


class SweepEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    file: str
    method: str | None = None  # another stage over the same sweep (npo for unlearn's)
    fixed: dict[str, Any] = {}
    models: dict[Label, dict[str, Any]] = {}  # per model: sweep-file keys replaced (fixed: merged), e.g. a range


class Selection(BaseModel):
    """Choose on the selection half of a seeded CrowS-Pairs split; report the held-out half."""

    model_config = ConfigDict(extra="forbid", strict=True)
    split_seed: int = 0


SPLIT_SEEDS_WITH_TASKS = (0,)  # tasks/crows_bias/crows_bias_{selection,heldout}*.yaml: dataset_kwargs split_seed


def half_tasks(task: str) -> list[str] | None:
    """The split tasks that replace a full-set CrowS task in a sweep's evaluate list (None: not a CrowS task)."""
    if task in (CROWS_TASK, CROWS_OVERALL_TASK, *CROWS_TYPE_TASKS):
        return [crows_half_task(half, overall=overall) for overall in (False, True) for half in CROWS_HALVES]
    return None


def _on_selection_half(task: str) -> bool:
    group, overall = crows_half_task(CROWS_HALVES[0]), crows_half_task(CROWS_HALVES[0], overall=True)
    return task in (group, overall) or task.startswith(group + "_")


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Label | None = None
    models: dict[Label, str] = Field(min_length=1)
    prepare: dict[Label, PrepareEntry] = {}
    sweeps: dict[Label, SweepEntry] = Field(min_length=1)
    objective: TaskMetric | None = None  # one rule for every sweep (each sweep file's own when absent)
    budget: dict[TaskMetric, BudgetRule] | None = None
    target: float | None = None  # the objective's target (each sweep file's own when absent)
    types_not_worse: bool | None = None  # passed to every sweep (gate.types.types_not_worse on the screen)
    selection: Selection | None = None

    @model_serializer(mode="wrap")
    def _without_unset_additions(self, handler):
        """A study without the issue-38 keys dumps (into study.json) exactly as before they existed."""
        dumped = handler(self)
        for key in ("target", "types_not_worse", "selection"):
            if dumped.get(key) is None:
                dumped.pop(key, None)
        return dumped


class Study:
    """A validated study file and, per model, its prepared stages and derived sweeps (validated, not yet run)."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text
        data, self.lines = read_yaml(path, text, "study")
        try:
            self.config = StudyConfig.model_validate(data)
        except ValidationError as err:
            raise ConfigFileError(path, validation_problems(err, self.lines, KEYS_AT), "study") from None
        problems: list = []
        own = {"base", "method"} | {key for key in ("objective", "budget", "target", "types_not_worse")
                                    if getattr(self.config, key) is not None}
        if self.config.selection is not None:
            own |= {"evaluate", "screen"}
            if self.config.selection.split_seed not in SPLIT_SEEDS_WITH_TASKS:
                problems.append((("selection", "split_seed"), f"only seed {SPLIT_SEEDS_WITH_TASKS[0]} has tasks "
                                 "(tasks/crows_bias/crows_bias_selection*.yaml); add include files with another "
                                 "split_seed to use it"))
            if self.config.objective is None:
                problems.append((("selection",), "needs the study's objective, on a selection task (each sweep "
                                 "file's own reads the full set)"))
            read = [("objective", self.config.objective), *(("budget", m) for m in self.config.budget or {})]
            for key, metric in read:
                task = (metric or "").split("/")[0]
                if task.startswith(CROWS_TASK) and not _on_selection_half(task):
                    problems.append(((key,) if key == "objective" else (key, metric), f"'{metric}' reads "
                                     "CrowS-Pairs pairs outside the selection half; with `selection:` read a "
                                     "selection task (e.g. crows_bias_overall_selection/type_mean_gap)"))
        for label, entry in self.config.sweeps.items():
            fixed = [(("sweeps", label, "fixed", key), value) for key, value in entry.fixed.items()]
            for model, override in entry.models.items():
                loc = ("sweeps", label, "models", model)
                if model not in self.config.models:
                    known = ", ".join(self.config.models)
                    problems.append((loc, f"'{model}' is not one of the study's models ({known})"))
                for key in sorted(override.keys() & own):
                    problems.append((loc + (key,), f"the study sets '{key}' for every model; it cannot change here"))
                if not isinstance(override.get("fixed") or {}, dict):
                    problems.append((loc + ("fixed",), "expected a mapping of the stage's options"))
                    continue
                fixed += [(loc + ("fixed", key), value) for key, value in (override.get("fixed") or {}).items()]
            for loc, value in fixed:
                for name in _prepared_names(value):
                    if name not in self.config.prepare:
                        problems.append((loc, f"@{name} names no prepare entry"))
            if not self.sweep_file(label).is_file():
                problems.append((("sweeps", label, "file"), f"{self.sweep_file(label)} does not exist"))
        if problems:
            raise self._error(problems)

    def _error(self, problems: list[tuple[tuple, str]]) -> ConfigFileError:
        return ConfigFileError(self.path, [(line_of(self.lines, loc), field_text(loc), message)
                                           for loc, message in problems], "study")

    def inputs(self) -> list[Path]:
        """Everything the study reads (its output folder may hold none of them): its file, the sweep files, the
        models given by folder, the data folder."""
        from debias_plugin.default_model import is_builtin
        from debias_plugin.paths import data_root

        models = [Path(model).expanduser() for model in self.config.models.values() if not is_builtin(model)]
        return [self.path, *(self.sweep_file(label) for label in self.config.sweeps), *models,
                *([data_root()] if data_root() else [])]

    def sweep_file(self, label: str) -> Path:
        return (self.path.parent / self.config.sweeps[label].file).resolve()

    def fixed(self, model: str, label: str) -> dict:
        """One sweep's fixed options for one model: the study's, with the model's own over them."""
        entry = self.config.sweeps[label]
        return {**entry.fixed, **(entry.models.get(model, {}).get("fixed") or {})}

    def derived_sweep(self, model: str, label: str, out: Path) -> str:
        """The sweep file's text for one model: base replaced, fixed options merged, "@NAME" resolved."""
        import yaml

        path = self.sweep_file(label)
        data, _ = read_yaml(path, config_text(path), "sweep")  # a broken file: its own line-numbered error
        entry = self.config.sweeps[label]
        override = {key: value for key, value in entry.models.get(model, {}).items() if key != "fixed"}
        fixed = {key: _resolved(value, out / model / PREPARED) for key, value in self.fixed(model, label).items()}
        data.update(override)
        data.update(base=self.config.models[model], fixed={**(data.get("fixed") or {}), **fixed},
                    method=entry.method or data.get("method"))  # the Optuna study's name hashes all of it
        if self.config.objective is not None:
            data["objective"] = self.config.objective
        if self.config.budget is not None:
            data["budget"] = {metric: rule.model_dump(exclude_none=True) for metric, rule in self.config.budget.items()}
        for key in ("target", "types_not_worse"):
            if getattr(self.config, key) is not None:
                data[key] = getattr(self.config, key)
        if self.config.selection is not None:
            data.update(self._selection_tasks(data))
        return f"# {label} of {self.path.name} for {model}, derived from {self.sweep_file(label)}\n" + \
            yaml.safe_dump(data, sort_keys=False)

    def _selection_tasks(self, data: dict) -> dict:
        """evaluate with CrowS-Pairs as its two halves; screen: the selection half and the budget's tasks only."""
        evaluate: list[str] = []
        for task in data.get("evaluate") or []:
            evaluate += [name for name in half_tasks(task) or [task] if name not in evaluate]
        read = [data["objective"].split("/")[0]] + \
            ([crows_half_task(CROWS_HALVES[0])] if data.get("types_not_worse") else [])
        budget = [metric.split("/")[0] for metric in data.get("budget") or {}]
        read += [task for task in evaluate if task in budget or any(b.startswith(task + "_") for b in budget)]
        evaluate += [task for task in read if task not in evaluate]
        return {"evaluate": evaluate, "screen": list(dict.fromkeys(read))}

    def selected(self, only: list[str] | None) -> dict[str, list[str]]:
        """{model: [sweep labels]} of the selectors MODEL or MODEL/SWEEP (None: everything)."""
        if not only:
            return {model: list(self.config.sweeps) for model in self.config.models}
        chosen: dict[str, list[str]] = {}
        for selector in only:
            model, _, label = selector.partition("/")
            if model not in self.config.models or (label and label not in self.config.sweeps):
                raise DebiasError(f"--only {selector}: expected MODEL or MODEL/SWEEP with MODEL one of "
                                  f"{', '.join(self.config.models)} and SWEEP one of {', '.join(self.config.sweeps)}.")
            labels = chosen.setdefault(model, [])
            labels += [name for name in ([label] if label else self.config.sweeps) if name not in labels]
        return {model: [name for name in self.config.sweeps if name in labels] for model, labels in chosen.items()}

    def plan(self, out: Path, only: list[str] | None = None) -> dict:
        """{model: {"prepare": {name: (TrainConfig, method)}, "sweeps": {label: Sweep}}}, everything validated
        (a prepared stage's `model` is still the study's name for it until the run resolves it)."""
        from debias_plugin.methods import method_class
        from debias_plugin.sweep.plan import load_sweep
        from debias_plugin.sweep.schema import expand_variables
        from debias_plugin.sweep.stage import split_stage_options
        from debias_plugin.training import TrainConfig

        plan = {}
        for model, labels in self.selected(only).items():
            sweeps = {}
            for label in labels:
                path = out / model / f"{label}.yml"
                try:
                    sweeps[label] = load_sweep(path, text=self.derived_sweep(model, label, out))
                except DebiasError as err:
                    raise DebiasError(f"{self.path}: sweeps.{label} (from {self.sweep_file(label)}) for model "
                                      f"'{model}': {err}") from None
            prepare = {}
            needed = {name for label in labels for value in self.fixed(model, label).values()
                      for name in _prepared_names(value)}
            for name, entry in self.config.prepare.items():
                if name not in needed:
                    continue
                loc = ("prepare", name)
                problems: list = []
                values = expand_variables(entry.options, loc + ("options",), problems, self.lines)
                if problems:
                    raise ConfigFileError(self.path, problems, "study")
                try:
                    method = method_class(entry.method)
                    shared, own = split_stage_options(method, values)
                    config = TrainConfig.model_validate({**shared, "model": self.config.models[model],
                                                         "output": str(out / model / PREPARED / name)})
                    prepare[name] = (config, method(method.Options.model_validate(own)))
                except (ValidationError, DebiasError) as err:
                    detail = "; ".join(f"{field_text(e['loc'])}: {e['msg']}" for e in err.errors()) \
                        if isinstance(err, ValidationError) else str(err)
                    raise self._error([(loc, detail)]) from None
            plan[model] = {"prepare": prepare, "sweeps": sweeps}
        return plan


KEYS_AT = schema_keys(StudyConfig, {"prepare": PrepareEntry, "sweeps": SweepEntry, "budget": BudgetRule})


def load_study(path: str | Path) -> Study:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DebiasError(f"{path}: the study file does not exist.")
    return Study(path, config_text(path))


def _prepared_names(value) -> list[str]:
    """The prepare entries a fixed option names: "@NAME", or a list of them (several bias vectors)."""
    values = value if isinstance(value, list) else [value]
    return [item[1:] for item in values if isinstance(item, str) and item.startswith("@")]


def _resolved(value, prepared: Path):
    """"@NAME" (alone or in a list) -> that model's prepared folder; other values as they are."""
    if isinstance(value, list):
        return [_resolved(item, prepared) for item in value]
    return str(prepared / value[1:]) if isinstance(value, str) and value.startswith("@") else value
