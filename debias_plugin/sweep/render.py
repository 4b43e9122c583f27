"""sweep.json, sweep.csv, report.md, plots and best/ in DIR from the study alone (so `sweep report` re-renders)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from debias_plugin.errors import DebiasError
from debias_plugin.gate.sequential import VERDICT_TEXT
from debias_plugin.outputs import write_text_atomically
from debias_plugin.sweep import metrics
from debias_plugin.sweep.plan import Sweep, load_sweep
from debias_plugin.sweep.plots import plot
from debias_plugin.sweep.results import closest_miss, collect, stage_seconds, unfinished_work
from debias_plugin.sweep.sequential_eval import screen_study, stopped_points
from debias_plugin.sweep.storage import STATE_FILE, Studies, open_storage, quiet_optuna, storage_url, sync_sampled

PLOTS = "plots"


def render(out: Path, sweep: Sweep, studies: Studies, *, base: Path | None = None, screens=None) -> dict:
    """Write sweep.json, sweep.csv, report.md and the plots into DIR; returns the sweep.json content."""
    sampled = sync_sampled(sweep, studies.results, stopped_points(screens))  # its proposals are part of the plan
    content, run = collect(sweep, studies, base=base, screens=screens)
    if sampled is not None:
        content["sampling"] = sampling_summary(sweep, content, sampled)
    timed = {p["name"]: stage_seconds(out, p) for p in content["points"]}
    run["stage_seconds"] = {name: seconds for name, seconds in timed.items() if seconds is not None}
    (out / PLOTS).mkdir(exist_ok=True)
    plots = plot(out / PLOTS, sweep, content)
    write_text_atomically(out / "sweep.json", json.dumps({**content, "run": run}, indent=2, sort_keys=True) + "\n")
    write_text_atomically(out / "sweep.csv", table_csv(sweep, content))
    write_text_atomically(out / "report.md", markdown(sweep, content, run, plots))
    return content


def link_best(out: Path, content: dict) -> Path | None:
    """DIR/best -> the chosen point's model folder (relative inside DIR), replaced atomically, with its model card
    (sweep/card.py) where that folder is a stage's output."""
    chosen = next((p for p in content["points"] if p["best"]), None)
    if chosen is None or not chosen["model"] or not (out / chosen["model"]).is_dir():
        return None
    link = out / "best"
    staging = out / f".best.tmp-{os.getpid()}"
    if staging.is_symlink() or staging.exists():
        staging.unlink()
    staging.symlink_to(chosen["model"], target_is_directory=True)
    if link.exists() and not link.is_symlink():
        raise DebiasError(f"{link} exists and is not a link the sweep wrote; move it away.")
    os.replace(staging, link)
    from debias_plugin.sweep.card import write_model_card

    write_model_card(out, content)
    return link


def render_folder(out: str | Path, storage: str | None = None) -> Path:
    """`debias sweep report DIR`: re-render from the stored study, without evaluating anything."""
    out = Path(out).expanduser().resolve()
    if not (out / "sweep.yml").is_file():
        raise DebiasError(f"{out} holds no sweep.yml: not a sweep output folder.")
    sweep = load_sweep(out / "sweep.yml")
    state = json.loads((out / STATE_FILE).read_text()) if (out / STATE_FILE).is_file() else {}
    url = storage or state.get("storage")
    if url is None and state and not (out / "study.db").is_file():
        raise DebiasError(f"{out}: the sweep's study is in an external storage; pass --storage URL.")
    from debias_plugin.default_model import is_builtin

    base = None if is_builtin(sweep.config.base) else Path(sweep.config.base).expanduser().resolve()
    with quiet_optuna():
        storage = open_storage(storage_url(url, out))
        studies = Studies.open(storage, sweep.study_name, sweep.directions, create=False)
        screens = screen_study(storage, sweep, create=False) if sweep.config.evaluation == "sequential" else None
        content = render(out, sweep, studies, base=base, screens=screens)
    link_best(out, content)
    return out


# ------------------------------------------------------------------------------------------------ formats

def _number(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}f}" if magnitude >= 1 or magnitude == 0 else f"{value:.4g}"


def _with_interval(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    text = _number(entry["value"])
    if entry.get("low") is not None:
        text += f" [{_number(entry['low'])}, {_number(entry['high'])}]"
    return text


def _param_columns(content: dict) -> list[str]:
    return list(dict.fromkeys(key for point in content["points"] for key in point["params"]))


def table_csv(sweep: Sweep, content: dict) -> str:
    params = _param_columns(content)
    metric_names = sorted({key for p in content["points"] for key in p["metrics"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "role", *params, "suite", "feasible", "pareto", "best", "objective", "distance",
                     *[f"{m}{suffix}" for m in metric_names for suffix in ("", "_low", "_high")], "error"])
    for p in content["points"]:
        row = [p["name"], p["role"], *[p["params"].get(k, "") for k in params], p["suite"], p["feasible"],
               p["pareto"], p["best"], p["objective"]["value"], p["objective"]["distance"]]
        for m in metric_names:
            entry = p["metrics"].get(m, {})
            row += [entry.get("value"), entry.get("low"), entry.get("high")]
        writer.writerow(["" if v is None else v for v in row] + [p["error"] or ""])
    return buffer.getvalue()


def _task_tables(sweep: Sweep, content: dict) -> list[str]:
    """One table per evaluated task: a group's per-type values, else the task's own metrics."""
    lines = []
    objective_task, objective_metric = sweep.config.objective.split("/", 1)
    for task in sweep.config.evaluate:
        rows = [p for p in content["points"] if any(k.startswith(task + "/") for k in p["metrics"])]
        if not rows:
            continue
        metric = objective_metric if task == objective_task else _first_metric(rows[0]["metrics"], task)
        leaves = sorted({leaf for p in rows for leaf in metrics.leaf_metrics(p["metrics"], f"{task}/{metric}")})
        if leaves:  # a group (crows_bias): its per-type values
            columns = [(f"{task}_{leaf}/{metric}", leaf) for leaf in leaves] + [(f"{task}/{metric}", "all")]
            title = f"### {task}: {metric} per type"
        else:
            names = sorted({k.split("/", 1)[1] for p in rows for k in p["metrics"] if k.startswith(task + "/")},
                           key=lambda n: (n.count("_"), n))
            columns = [(f"{task}/{name}", name) for name in names]
            title = f"### {task}"
        lines += ["", title, "", "| point | " + " | ".join(label for _, label in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for p in rows:
            cells = [_with_interval(p["metrics"].get(key)) for key, _ in columns]
            lines.append(f"| {p['name']} | " + " | ".join(cells) + " |")
    return lines


def _first_metric(summary: dict, task: str) -> str:
    """A task's headline metric: its first in the metric specs' order (CrowS pct, SS, word perplexity, ...)."""
    from debias_plugin.scoring.specs import SPECS, find_spec

    names = sorted(k.split("/", 1)[1] for k in summary if k.startswith(task + "/"))
    order = {name: position for position, name in enumerate(SPECS)}
    declared = [name for name in names if find_spec(name) is not None]
    return min(declared, key=lambda name: order[find_spec(name).name]) if declared else (names[0] if names else "")


def _param_cell(sweep: Sweep, point: dict, key: str) -> str:
    if key in point["params"]:
        return f"{point['params'][key]:g}" if isinstance(point["params"][key], float) else str(point["params"][key])
    if point["role"] == "reference" and key == sweep.knob and sweep.reference_knob_value is not None:
        return f"{sweep.reference_knob_value:g} (base)"
    return ""


def point_budget(point: dict) -> str:
    return "; ".join(f"`{m}` {_number(c['value'])} (limit {_number(c['limit'])}"
                     + (f", {100 * c['relative_change']:+.1f}% vs base" if c["relative_change"] is not None else "")
                     + ")" for m, c in point["budget"].items())


def markdown(sweep: Sweep, content: dict, run: dict, plots: list[str]) -> str:
    config = sweep.config
    budget_text = "; ".join(f"`{m}` {rule.describe()}" for m, rule in config.budget.items()) or "none"
    if config.types_not_worse:
        budget_text += "; no CrowS type or StereoSet domain significantly worse than the base (types_not_worse)"
    lines = [f"# Sweep: {config.name or config.method} ({config.method} on {content['base']})", "",
             f"Objective: |`{config.objective}` − {config.target:g}| minimised. Budget: {budget_text}. "
             f"Intervals: {100 * (1 - config.alpha):g}% (Clopper-Pearson for pair outcomes, percentile bootstrap "
             f"with {config.resamples} resamples otherwise)."
             + (f" lm-eval `limit: {config.limit}` (a slice of every task)." if config.limit else ""), ""]
    best = next((p for p in content["points"] if p["best"]), None)
    unfinished = unfinished_work(content)
    if unfinished:
        lines += [f"**Not finished**: {'; '.join(unfinished)}. The choice below is among the points evaluated so "
                  "far; run the same `debias sweep` command again to finish.", ""]
    if best:
        budget, miss = point_budget(best), closest_miss(content)
        lines += [f"**{'Chosen so far' if unfinished else 'Chosen'}: `{best['name']}`** — `{config.objective}` "
                  f"{_with_interval(best['metrics'].get(config.objective))}" + (f"; {budget}" if budget else "")
                  + (f". Model: `best/` → `{best['model']}` (its `debias_manifest.json` records how it was made)."
                     if best["role"] != "reference" else
                     f". That is the base model itself (`best/` → `{best['model']}`): "
                     + (f"every setting tried breaks the budget, the closest being `{miss['name']}` "
                        f"({point_budget(miss)}), so the range starts past what this model allows; try gentler "
                        "settings (a lower `search` range, earlier `checkpoints`, smaller `grid` values)."
                        if miss else "no setting came closer to the target within the budget.")), ""]
    else:
        lines += ["**No setting keeps the budget**: nothing was chosen.", ""]
    if content["search"]:
        s = content["search"]
        lines += [f"Budget search over `{s['knob']}` in [{s['range'][0]:g}, {s['range'][1]:g}]: "
                  f"{s['evaluations']} evaluations" + (" (the low end is the base model)" if s["reference_used_as_low_end"] else "")
                  + f", {s['reason']}.", ""]
        for problem in s["monotonicity_violations"]:
            lines.append(f"- Warning: {problem}; the bisection assumes monotone metrics, so the result may be local.")
    if content.get("sampling"):
        lines += _front_lines(content)
    params = _param_columns(content)
    budget_metrics = list(config.budget)
    header = ["point", *params, f"{config.objective}", *budget_metrics, "within budget", "Pareto front", "suite"]
    lines += ["## Points", "", "Pareto front: the points within the budget that no other such point beats on both "
              "the distance to the target and the budget metric(s) (Optuna's constrained `best_trials`); the "
              "chosen point is the closest to the target among them.", "",
              "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for p in content["points"]:
        cells = [("**" + p["name"] + "**") if p["best"] else p["name"], *[_param_cell(sweep, p, k) for k in params],
                 _with_interval(p["metrics"].get(config.objective))]
        for m in budget_metrics:
            check = p["budget"][m]
            change = f" ({100 * check['relative_change']:+.1f}%)" if check["relative_change"] is not None else ""
            cells.append(_with_interval(p["metrics"].get(m)) + change)
        cells += ["error: " + p["error"] if p["error"] else ("yes" if p["feasible"] else "no"),
                  "yes" if p["pareto"] else "", p["suite"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _task_tables(sweep, content)
    notes = [f"- `{p['name']}`: {note}" for p in content["points"] for note in p["notes"]]
    if notes:
        lines += ["", "Notes:", *notes]
    screened, full = content["evaluations"]["screen"], content["evaluations"]["full"]
    full_names = ", ".join(f"`{p['name']}`" for p in content["points"] if p["suite"] == "full") or "none yet"
    lines += ["", "## Cost", "",
              f"- Screening suite ({', '.join(content['tasks']['screen'])}) on all {screened} points; "
              + (f"the other tasks ({', '.join(sweep.full_tasks)}) only on {full} point(s), the Pareto front of "
                 f"the points within the budget ({full_names})." if sweep.full_tasks else "it is the whole suite."),
              f"- lm-eval requests scored: {run['requests_scored']} of {run['requests_received']} received "
              "(identical requests across tasks scored once; cached or resumed evaluations score none); "
              f"evaluation time {run['evaluation_seconds']} s in this study's processes.", ""]
    lines += _screening_lines(content, run)
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({PLOTS}/{name}.png) ([SVG]({PLOTS}/{name}.svg))" for name in plots]
    return "\n".join(lines) + "\n"


def _stopped_interval(entry: dict) -> str:
    """A stopped point's deciding interval, as the progress lines print it."""
    low, high = entry["interval"]
    bounds = (f"{100 * low:+.1f} %, {100 * high:+.1f} %" if (entry.get("interval_of") or "").startswith("relative")
              else f"{low:+.4g}, {high:+.4g}")
    return f"{entry.get('interval_of') or 'value'} in [{bounds}]"


def _screening_lines(content: dict, run: dict) -> list[str]:
    """Sequential evaluation: the points stopped early (a verdict and its interval, never a value) and what it saved."""
    if "stopped" not in content:
        return []
    lines = ["## Sequential screening", "",
             "Every point's documents in one seeded order, in growing chunks; a point stops once an anytime-valid "
             "confidence sequence shows it over budget or surely farther from the target than the best point within "
             "budget so far (its numbers are never reported: they would come from a subset). The others, and every "
             "number above, come from the full sets.", ""]
    for entry in content["stopped"]:
        scored = ", ".join(f"{task} {count} of {entry['population'][task]}"
                           for task, count in entry["documents_scored"].items())
        lines.append(f"- `{entry['name']}`: stopped at look {entry['look'] + 1}, {entry['verdict']} on "
                     f"`{entry['metric']}` ({_stopped_interval(entry)}) after {scored} scored")
    if not content["stopped"]:
        lines.append("- no point stopped early")
    screening = run.get("screening")
    if screening:
        cpu = screening["cpu_seconds"]
        lines += ["", f"Documents and windows scored on the stopped points: {screening['stopped']} of "
                  f"{screening['stopped_full']} in their full sets. Evaluation CPU: {cpu['stopped']} s on stopped "
                  f"points, {cpu['passed']} s screening the points then evaluated in full; saved about "
                  f"{cpu['saved_estimate']} s (the stopped points' unscored units at their measured CPU per unit), "
                  f"{cpu['net_saved_estimate']} s net of the screens of the others."]
    return lines + [""]


# ------------------------------------------------------------------------------------------------ several knobs

def _values(point: dict, directions: list[str]) -> list[float] | None:
    """A point's objectives, each turned so that lower is better: the distance, then the budget metrics."""
    values = [point["objective"]["distance"]] + [c["value"] for c in point["budget"].values()]
    if any(v is None for v in values):
        return None
    return [v if d == "minimize" else -v for v, d in zip(values, directions)]


def dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def ruled_out(sweep: Sweep, content: dict) -> dict[str, str]:
    """Why each point off the front is off it: the budget rule(s) it breaks, its error, or a front point that
    beats it on every objective."""
    front = [p for p in content["points"] if p["pareto"]]
    reasons = {}
    for p in content["points"]:
        if p["pareto"]:
            continue
        if p["error"]:
            reasons[p["name"]] = "error: " + p["error"]
            continue
        broken = [f"`{m}` {_number(c['value'])} > limit {_number(c['limit'])}"
                  + (f" ({100 * c['relative_change']:+.1f}% vs base)" if c["relative_change"] is not None else "")
                  if c["value"] is not None else f"`{m}` missing"
                  for m, c in p["budget"].items() if not c["holds"]]
        if broken:
            reasons[p["name"]] = "budget: " + "; ".join(broken)
            continue
        if not metrics.types_hold(p.get("types"), sweep):
            reasons[p["name"]] = "types_not_worse: " + (", ".join(
                f"{t['name']} {t['reference']:.1f} -> {t['value']:.1f} (Holm p {t['adjusted_p']:.2g})"
                for t in p["types"]["worse"]) if p.get("types") else "not judged")
            continue
        mine = _values(p, sweep.directions)
        winner = next((q for q in front if mine is not None and (v := _values(q, sweep.directions)) is not None
                       and dominates(v, mine)), None)
        reasons[p["name"]] = f"dominated by `{winner['name']}`" if winner else "not on Optuna's front"
    for entry in content.get("stopped", []):  # sequential evaluation: a verdict and its interval, never a value
        reasons[entry["name"]] = (f"stopped early: {VERDICT_TEXT[entry['verdict']]} on "
                                  f"`{entry['metric']}` ({_stopped_interval(entry)}) at look {entry['look'] + 1}")
    return reasons


def sampling_summary(sweep: Sweep, content: dict, sampled) -> dict:
    """sweep.json's account of a sampled search: the sampler, its proposals in order, and why points left the front."""
    sampling = sweep.sampling
    names = [sweep.sample_job(settings).name if sweep.sampled_key(settings) != "base" else "base"
             for settings in sampled.proposals]
    return {"sampler": sampling.sampler, "trials": sampling.trials, "seed": sampling.seed,
            "batch": sampling.batch_size, "knobs": list(sampling.knobs),
            "startup": None if sampling.sampler == "nsga2" else sampling.startup_trials,
            "proposals": names, "finished": sampled.finished, "ruled_out": ruled_out(sweep, content)}


def _front_lines(content: dict) -> list[str]:
    s = content["sampling"]
    sampler = {"tpe": "TPE", "gp": "GP", "nsga2": "NSGA-II"}[s["sampler"]]
    distinct = len(dict.fromkeys(s["proposals"]))
    how = (f"populations of {s['batch']}" if s["sampler"] == "nsga2" else
           f"{s['startup']} random start-up trial(s), batches of {s['batch']}")
    lines = [f"Sampled search over {', '.join(f'`{k}`' for k in s['knobs'])}: Optuna's {sampler} sampler (seed "
             f"{s['seed']}, {how}), {len(s['proposals'])} "
             f"of {s['trials']} trials proposed ({distinct} distinct settings)"
             + ("." if s["finished"] else "; not finished."), "", "## Front", "",
             "The points within the budget that no other such point beats on both the distance to the target and "
             "the budget metric(s) (`plots/front.png`); below them, why each other point is not on the front.", "",
             "| point | " + " | ".join(s["knobs"]) + " | distance to target | budget |", "|---|" + "---:|" * (len(s["knobs"]) + 2)]
    for p in content["points"]:
        if p["pareto"]:
            lines.append(f"| {p['name']} | " + " | ".join(_number(p["params"].get(k)) for k in s["knobs"])
                         + f" | {_number(p['objective']['distance'])} | {point_budget(p)} |")
    if s["ruled_out"]:
        lines += ["", "| point | ruled out by |", "|---|---|"]
        lines += [f"| {name} | {reason} |" for name, reason in s["ruled_out"].items()]
    return lines + [""]
