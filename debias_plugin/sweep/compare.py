"""`debias study`: the same sweeps on several models, and one table of every method at its chosen setting.

    name: two_models
    models: {smollm2-135m: default, gemma3-270m: "builtin:gemma3-270m"}
    objective: crows_bias/pct_stereotype  # optional: one objective and budget for every sweep
    budget: {wikitext2_ppl/word_perplexity: {max_relative_increase: 0.02}}
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
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from debias_plugin.errors import DebiasError
from debias_plugin.outputs import MANIFEST_NAME, claim_run_folder, read_manifest, write_text_atomically
from debias_plugin.sweep.config import BudgetRule
from debias_plugin.yamlfile import (ConfigFileError, Label, TaskMetric, field_text, line_of, read_yaml,
                                    schema_keys, validation_problems)

STUDY_FILE = "study.yml"
PREPARED = "prepared"
CROWS, CROWS_TYPES = "crows_bias", ("race_color", "gender", "socioeconomic", "nationality", "religion", "age",
                                    "sexual_orientation", "physical_appearance", "disability")
COLUMNS = {"SS": "stereoset_bias/ss", "LMS": "stereoset_bias/lms", "ICAT": "stereoset_bias/icat",
           "ppl": "wikitext2_ppl/word_perplexity"}


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


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Label | None = None
    models: dict[Label, str] = Field(min_length=1)
    prepare: dict[Label, PrepareEntry] = {}
    sweeps: dict[Label, SweepEntry] = Field(min_length=1)
    objective: TaskMetric | None = None  # one rule for every sweep (each sweep file's own when absent)
    budget: dict[TaskMetric, BudgetRule] | None = None


class Study:
    """A validated study file and, per model, its prepared stages and derived sweeps (validated, not yet run)."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text
        data, self.lines = read_yaml(path, text, "study")
        try:
            self.config = StudyConfig.model_validate(data)
        except ValidationError as err:
            raise ConfigFileError(path, validation_problems(err, self.lines, _keys_at), "study") from None
        problems = []
        own = {"base", "method"} | {key for key in ("objective", "budget") if getattr(self.config, key) is not None}
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
                if isinstance(value, str) and value.startswith("@") and value[1:] not in self.config.prepare:
                    problems.append((loc, f"{value} names no prepare entry"))
            if not self.sweep_file(label).is_file():
                problems.append((("sweeps", label, "file"), f"{self.sweep_file(label)} does not exist"))
        if problems:
            raise self._error(problems)

    def _error(self, problems: list[tuple[tuple, str]]) -> ConfigFileError:
        return ConfigFileError(self.path, [(line_of(self.lines, loc), field_text(loc), message)
                                           for loc, message in problems], "study")

    def sweep_file(self, label: str) -> Path:
        return (self.path.parent / self.config.sweeps[label].file).resolve()

    def fixed(self, model: str, label: str) -> dict:
        """One sweep's fixed options for one model: the study's, with the model's own over them."""
        entry = self.config.sweeps[label]
        return {**entry.fixed, **(entry.models.get(model, {}).get("fixed") or {})}

    def derived_sweep(self, model: str, label: str, out: Path) -> str:
        """The sweep file's text for one model: base replaced, fixed options merged, "@NAME" resolved."""
        import yaml

        from debias_plugin.data._io import read_text

        path = self.sweep_file(label)
        data, _ = read_yaml(path, read_text(path), "sweep")  # a broken file: its own line-numbered error
        entry = self.config.sweeps[label]
        override = {key: value for key, value in entry.models.get(model, {}).items() if key != "fixed"}
        fixed = {key: str(out / model / PREPARED / value[1:]) if isinstance(value, str) and value.startswith("@")
                 else value for key, value in self.fixed(model, label).items()}
        data.update(override)
        data.update(base=self.config.models[model], fixed={**(data.get("fixed") or {}), **fixed},
                    method=entry.method or data.get("method"))  # the Optuna study's name hashes all of it
        if self.config.objective is not None:
            data["objective"] = self.config.objective
        if self.config.budget is not None:
            data["budget"] = {metric: rule.model_dump(exclude_none=True) for metric, rule in self.config.budget.items()}
        return f"# {label} of {self.path.name} for {model}, derived from {self.sweep_file(label)}\n" + \
            yaml.safe_dump(data, sort_keys=False)

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
        from debias_plugin.sweep.config import expand_variables, load_sweep, split_stage_options
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
            needed = {value[1:] for label in labels for value in self.fixed(model, label).values()
                      if isinstance(value, str) and value.startswith("@")}
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


_keys_at = schema_keys(StudyConfig, {"prepare": PrepareEntry, "sweeps": SweepEntry, "budget": BudgetRule})


def load_study(path: str | Path) -> Study:
    from debias_plugin.data._io import read_text

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DebiasError(f"{path}: the study file does not exist.")
    return Study(path, read_text(path))


def run_study(path: str | Path, out: str | Path, *, force: bool = False, only: list[str] | None = None) -> Path:
    """Prepare, sweep and tabulate the study (or the `only` selectors' part of it) into DIR (a rerun resumes, and
    a later run with other selectors adds to the same table); returns DIR/study.md."""
    from debias_plugin.sweep.runner import resolve_base, run_sweep
    from debias_plugin.training import train

    study, out = load_study(path), Path(out).expanduser().resolve()
    plan = study.plan(out, only)  # every sweep and stage option validated before any model loads
    claim_run_folder(out, resumes=(out / STUDY_FILE).is_file(), force=force,
                     refusal=f"--out {out} is not empty and does not hold a study (no {STUDY_FILE}); pass --force to "
                     "replace it, or choose another folder. A study folder is resumed (and extended by an edited "
                     "study file: each sweep and prepared stage checks its own settings).")
    write_text_atomically(out / STUDY_FILE, study.text)
    for model, parts in plan.items():
        base = resolve_base(next(iter(parts["sweeps"].values()))) if parts["prepare"] else None
        for config, method in parts["prepare"].values():
            config = config.model_copy(update={"model": str(base)})
            if (Path(config.output) / MANIFEST_NAME).is_file():
                _check_prepared(Path(config.output), config, method)
            else:
                train(config, method)
        (out / model).mkdir(exist_ok=True)  # a part with no prepared stage has nothing else that makes it
        for label, sweep in parts["sweeps"].items():
            write_text_atomically(out / model / f"{label}.yml", sweep.text)
            run_sweep(out / model / f"{label}.yml", out / model / label)
    return render_study(out, study)


def _check_prepared(folder: Path, config, method) -> None:
    """A prepared stage made by an earlier run is reused only if it was made with the same options."""
    volatile = ("output", "force", "keep_checkpoints", "checkpoint_every")
    wanted = {**config.model_dump(mode="json"), "method": method.options()}
    recorded = read_manifest(folder).get("options", {})
    changed = sorted(key for key in set(wanted) | set(recorded) if key not in volatile
                     and wanted.get(key) != recorded.get(key))
    if changed:
        raise DebiasError(f"{folder} was made with other options ({', '.join(changed)}) than the study file now "
                          "gives; delete that folder to remake it (and the sweeps that read it).")


# ------------------------------------------------------------------------------------------------ the table

def stage_seconds(out: Path, point: dict, recorded: float | None = None) -> float | None:
    """A sweep point's stage time: sweep.json's copy (`recorded`, so a table renders from saved sweep files alone),
    else the model's manifest (a checkpoint's: its run's); none for the base, where no stage ran (a built-in base's
    manifest holds default-model's time)."""
    if point["role"] == "reference" or not point.get("model"):
        return None
    if recorded is not None:
        return recorded
    folder = (out / point["model"]).resolve()
    if folder.parent.name.endswith(".snapshots"):
        folder = folder.parent.with_name(folder.parent.name.removesuffix(".snapshots"))
    if not (folder / MANIFEST_NAME).is_file():  # the base model itself
        return None
    timings = read_manifest(folder).get("timings", {})
    if timings.get("wall_seconds") is not None:
        return timings["wall_seconds"]
    parts = [v for k, v in timings.items() if k.endswith("_s")]
    return round(sum(parts), 1) if parts else None  # a 0.04 s merge is 0.0 s, not unknown


def _gap(metrics: dict, key: str) -> float | None:
    value = (metrics.get(key) or {}).get("value")
    return None if value is None else abs(value - 50.0)


def _reduction(base: float | None, now: float | None) -> float | None:
    return None if base in (None, 0) or now is None else 100.0 * (1 - now / base)


def sweep_results(out: Path, study: Study) -> dict[tuple[str, str], dict]:
    """{(model, sweep label): its sweep.json} for the sweeps that have run."""
    found = {}
    for model in study.config.models:
        for label in study.config.sweeps:
            path = out / model / label / "sweep.json"
            if path.is_file():
                found[model, label] = json.loads(path.read_text())
    return found


def table_rows(out: Path, study: Study, results: dict[tuple[str, str], dict]) -> list[dict]:
    """Per model: the base, then each sweep's chosen point (or its reason for having none)."""
    from debias_plugin.sweep.report import closest_miss, unfinished_work

    rows = []
    for model in study.config.models:
        base_metrics: dict = {}
        chosen = []
        for label in study.config.sweeps:
            folder, content = out / model / label, results.get((model, label))
            if content is None:
                chosen.append({"model": model, "method": label, "note": "pending: not run yet"})
                continue
            points = {p["key"]: p for p in content["points"]}
            base_metrics = {**points["base"]["metrics"], **base_metrics}
            best = points.get(content["best"])
            row = {"model": model, "method": label, "evaluated": len(points),
                   "evaluation_seconds": content.get("run", {}).get("evaluation_seconds")}
            if unfinished_work(content):  # its base still counts; its best so far is not a choice
                chosen.append({**row, "note": f"pending: stopped after {len(points)} evaluated point(s)"})
                continue
            if best is None:
                chosen.append({**row, "note": "no setting within the budget"})
                continue
            setting, miss = _setting(best), closest_miss(content)
            if miss:
                change = next(c for c in miss["budget"].values() if not c["holds"])["relative_change"]
                setting = (f"base (every setting tried breaks the budget; closest {_setting(miss)}"
                           + ("" if change is None else f" at {100 * change:+.1f} %") + ")")
            recorded = content.get("run", {}).get("stage_seconds", {}).get(best["name"])
            chosen.append({**row, "setting": setting or "base", "metrics": best["metrics"], "suite": best["suite"],
                           "stage_seconds": stage_seconds(folder, best, recorded)})
        rows.append({"model": model, "method": "base", "setting": "-", "metrics": base_metrics})
        rows += chosen
    for row in rows:
        metrics = row.get("metrics")
        if metrics is None:
            continue
        base = next(r for r in rows if r["model"] == row["model"] and r["method"] == "base")["metrics"]
        types = [_gap(metrics, f"{CROWS}_{t}/pct_stereotype") for t in CROWS_TYPES]
        base_types = [_gap(base, f"{CROWS}_{t}/pct_stereotype") for t in CROWS_TYPES]
        row["gap_reduction_overall"] = _reduction(_gap(base, f"{CROWS}/pct_stereotype"),
                                                  _gap(metrics, f"{CROWS}/pct_stereotype"))
        if None not in types + base_types:
            row["gap_reduction_type_mean"] = _reduction(sum(base_types) / 9, sum(types) / 9)
        ppl, base_ppl = ((m.get(COLUMNS["ppl"]) or {}).get("value") for m in (metrics, base))
        row["ppl_change_percent"] = None if None in (ppl, base_ppl) else 100.0 * (ppl / base_ppl - 1)
    return rows


def _setting(point: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point["params"].items())


def _cell(metrics: dict | None, key: str, interval: bool = True) -> str:
    entry = (metrics or {}).get(key) or {}
    if entry.get("value") is None:
        return "-"
    text = f"{entry['value']:.2f}"
    return text + (f" [{entry['low']:.1f}, {entry['high']:.1f}]" if interval and entry.get("low") is not None else "")


def _number(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_study(out: Path, study: Study | None = None) -> Path:
    """study.json, study.csv, study.md and plots/ from the sweeps' folders alone (no evaluation)."""
    study = study or load_study(out / STUDY_FILE)
    results = sweep_results(out, study)
    rows = table_rows(out, study, results)
    header = ["model", "method", "setting", "all", *CROWS_TYPES, *COLUMNS, "ppl change %", "gap cut % (all)",
              "gap cut % (type mean)", "stage s", "sweep eval s (points)"]
    lines = [f"# Study {study.config.name or study.path.stem}", "",
             "CrowS-Pairs pct_stereotype with exact 95 % intervals (ideal 50); StereoSet SS, LMS and ICAT with "
             "95 % bootstrap intervals over target terms; gap cut = reduction of |x - 50| against the base; every "
             "method at the setting its sweep chose within its budget.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in rows:
        metrics = row.get("metrics")
        cells = [row["model"], row["method"], row.get("setting", row.get("note", "-")),
                 _cell(metrics, f"{CROWS}/pct_stereotype"),
                 *(_cell(metrics, f"{CROWS}_{t}/pct_stereotype") for t in CROWS_TYPES),
                 *(_cell(metrics, key, interval=name != "ppl") for name, key in COLUMNS.items()),
                 _number(row.get("ppl_change_percent"), 2), _number(row.get("gap_reduction_overall")),
                 _number(row.get("gap_reduction_type_mean")), _number(row.get("stage_seconds"), 0),
                 "-" if "evaluated" not in row else f"{_number(row.get('evaluation_seconds'), 0)} ({row['evaluated']})"]
        lines.append("| " + " | ".join(cells) + " |")
        writer.writerow(cells)
    plots = plot_tradeoffs(out, study, results)
    lines += ["", *(f"![{name}](plots/{name}.png)" for name in plots), ""]
    table = {"study": study.config.model_dump(mode="json"), "rows": rows}
    write_text_atomically(out / "study.json", json.dumps(table, indent=2, sort_keys=True) + "\n")
    write_text_atomically(out / "study.csv", buffer.getvalue())
    write_text_atomically(out / "study.md", "\n".join(lines))
    return out / "study.md"


def plot_tradeoffs(out: Path, study: Study, results: dict[tuple[str, str], dict]) -> list[str]:
    """Per model: |CrowS - 50| against the perplexity change of every evaluated point, one series per sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from debias_plugin.sweep.report import save_plot

    made = []
    (out / "plots").mkdir(exist_ok=True)
    for model in study.config.models:
        figure, axis = plt.subplots(figsize=(6.4, 4.4))
        drawn, widest, lowest = False, 0.0, 0.0
        for label in study.config.sweeps:
            content = results.get((model, label))
            if content is None:
                continue
            objective, budget = content["sweep"]["objective"], next(iter(content["sweep"]["budget"]), None)
            base = next(p for p in content["points"] if p["role"] == "reference")["metrics"]
            points = [p for p in content["points"] if budget and (p["metrics"].get(budget) or {}).get("value")]
            xs = [100 * (p["metrics"][budget]["value"] / base[budget]["value"] - 1) for p in points]
            ys = [p["objective"]["distance"] for p in points]
            axis.plot(xs, ys, marker="o", linewidth=1, label=label)
            widest, lowest = max([widest, *map(abs, xs)]), min([lowest, *xs])
            for x, y, p in zip(xs, ys, points):
                if p.get("best"):
                    axis.plot([x], [y], marker="*", markersize=14, color="black")
            rule = content["sweep"]["budget"][budget]
            if rule.get("max_relative_increase") is not None:
                axis.axvline(100 * rule["max_relative_increase"], color="tab:red", linestyle="--")
            drawn = True
        if drawn:
            scale = ""
            if widest > 100:  # a collapsed model (+2900 %) would squash the budget's few percent into one pixel
                axis.set_xscale("symlog", linthresh=10)
                axis.set_xlim(left=lowest - 2)
                scale = ", linear up to ±10 %, then log"
            axis.set_xlabel(f"perplexity change vs base (%){scale}")
            axis.set_ylabel(f"|{objective} - 50|")
            axis.set_title(f"{model}: bias against perplexity (star: chosen, dashed: budget)")
            axis.legend(fontsize=8)
            save_plot(figure, out / "plots", f"tradeoff_{model}", bbox_inches="tight")
            made.append(f"tradeoff_{model}")
        plt.close(figure)
    return made
