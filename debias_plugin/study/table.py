"""The study table: per model, the base and each sweep's chosen point (CrowS-Pairs per type with the sweeps' exact
intervals, StereoSet, WikiText-2 perplexity, costs) in study.json/csv/md, and plots/tradeoff_<model>.png/.svg of
every evaluated point; read from the sweeps' sweep.json files alone (no evaluation)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from debias_plugin.data.crows import CROWS_BIAS_TYPES, CROWS_HALVES, CROWS_TASK, CROWS_TYPE_TASKS, crows_half_task
from debias_plugin.outputs import write_text_atomically
from debias_plugin.scoring.gap import gap, type_mean_gap
from debias_plugin.scoring.specs import SPECS
from debias_plugin.study.config import STUDY_FILE, Study, load_study
from debias_plugin.sweep.plots import save_plot
from debias_plugin.sweep.results import closest_miss, stage_seconds, unfinished_work

BIAS = "pct_stereotype"  # CrowS-Pairs' metric, overall and per bias type
STEREOSET = "stereoset_bias"  # its scores (SS, LMS, ICAT: the specs' parts) beside CrowS
PERPLEXITY = "wikitext2_ppl/word_perplexity"  # the quality column and its change against the base
PERPLEXITY_LABEL = "ppl"  # the committed tables' header (the spec's display name is "word ppl")


def _stereoset_columns() -> dict[str, str]:
    """Header -> metric key of StereoSet's overall scores, named and ordered as their specs."""
    return {spec.display: f"{STEREOSET}/{spec.name}" for spec in SPECS.values()
            if spec.part is not None and spec.domain is None}


def crows_group(study: Study) -> str:
    """The CrowS-Pairs group of the table's headline columns: the held-out half where the study chose on the other."""
    return crows_half_task(CROWS_HALVES[1]) if study.config.selection is not None else CROWS_TASK


def _type_tasks(rows: list[dict], group: str = CROWS_TASK) -> list[str]:
    """CrowS-Pairs' bias-type tasks, the most pairs first (the pair counts the summaries' intervals record)."""
    tasks = list(CROWS_TYPE_TASKS) if group == CROWS_TASK else \
        [crows_half_task(group.removeprefix(f"{CROWS_TASK}_"), bias_type) for bias_type in CROWS_BIAS_TYPES]

    def pairs(task: str) -> int:
        return max((((row.get("metrics") or {}).get(f"{task}/{BIAS}") or {}).get("units") or 0 for row in rows),
                   default=0)

    return sorted(tasks, key=lambda task: (-pairs(task), tasks.index(task)))


def _split_columns() -> dict[str, str]:
    """Header -> metric key of the split's gap columns: the held-out half's type gaps, the selection half's."""
    selection, held_out = (crows_half_task(half, overall=True) for half in CROWS_HALVES)
    return {"type-mean gap": f"{held_out}/type_mean_gap", "worst-type gap": f"{held_out}/worst_type_gap",
            "selection all": f"{selection}/{BIAS}", "selection type-mean gap": f"{selection}/type_mean_gap"}


def _gap(metrics: dict, key: str) -> float | None:
    value = (metrics.get(key) or {}).get("value")
    return None if value is None else gap(value)


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
            if study.config.selection is not None:
                chosen[-1]["types"] = best.get("types")
        rows.append({"model": model, "method": "base", "setting": "-", "metrics": base_metrics})
        rows += chosen
    group = crows_group(study)
    type_tasks = _type_tasks(rows, group)
    for row in rows:
        metrics = row.get("metrics")
        if metrics is None:
            continue
        base = next(r for r in rows if r["model"] == row["model"] and r["method"] == "base")["metrics"]
        types, base_types = ([(m.get(f"{task}/{BIAS}") or {}).get("value") for task in type_tasks]
                             for m in (metrics, base))
        row["gap_reduction_overall"] = _reduction(_gap(base, f"{group}/{BIAS}"), _gap(metrics, f"{group}/{BIAS}"))
        if None not in types + base_types:
            row["gap_reduction_type_mean"] = _reduction(type_mean_gap(base_types), type_mean_gap(types))
        ppl, base_ppl = ((m.get(PERPLEXITY) or {}).get("value") for m in (metrics, base))
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


def _worse_types(row: dict) -> str:
    """The chosen point's types_not_worse verdict: none, the worse types, or '-' where not recorded."""
    if row["method"] == "base":
        return "-"
    types = row.get("types")
    if not types:
        return "-"
    return ", ".join(f"{t['name']} {t['reference']:.1f} -> {t['value']:.1f}" for t in types["worse"]) or "none"


def render_study(out: Path, study: Study | None = None) -> Path:
    """study.json, study.csv, study.md and plots/ from the sweeps' folders alone (no evaluation)."""
    study = study or load_study(out / STUDY_FILE)
    results = sweep_results(out, study)
    rows = table_rows(out, study, results)
    group, split = crows_group(study), study.config.selection is not None
    type_tasks, columns = _type_tasks(rows, group), {**_stereoset_columns(), PERPLEXITY_LABEL: PERPLEXITY}
    gaps = _split_columns() if split else {}
    header = ["model", "method", "setting", "held-out all" if split else "all",
              *(task.removeprefix(f"{group}_") for task in type_tasks), *gaps,
              *columns, f"{PERPLEXITY_LABEL} change %", "gap cut % (all)",
              "gap cut % (type mean)", *(["worse types"] if split else []), "stage s", "sweep eval s (points)"]
    intro = ("CrowS-Pairs pct_stereotype with exact 95 % intervals (ideal 50); StereoSet SS, LMS and ICAT with "
             "95 % bootstrap intervals over target terms; gap cut = reduction of |x - 50| against the base; every "
             "method at the setting its sweep chose within its budget.")
    if split:
        intro = (f"Every setting chosen on the selection half of CrowS-Pairs (seed {study.config.selection.split_seed}"
                 ", stratified by bias type: tasks/crows_bias/README.md); the CrowS columns up to the worst-type gap "
                 "and the gap cuts are the HELD-OUT half, with exact 95 % intervals (pct, ideal 50) and 95 % "
                 "bootstrap intervals resampling pairs within types (type gaps, ideal 0); 'selection' columns are "
                 "the half the choice saw. StereoSet SS, LMS and ICAT (95 % bootstrap intervals over target terms) "
                 "were never used to choose: the independent check. Gap cut = reduction against the base; worse "
                 "types = types_not_worse on the selection half (Holm-adjusted p below the sweep's alpha).")
    lines = [f"# Study {study.config.name or study.path.stem}", "", intro, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in rows:
        metrics = row.get("metrics")
        cells = [row["model"], row["method"], row.get("setting", row.get("note", "-")),
                 _cell(metrics, f"{group}/{BIAS}"),
                 *(_cell(metrics, f"{task}/{BIAS}") for task in type_tasks),
                 *(_cell(metrics, key) for key in gaps.values()),
                 *(_cell(metrics, key, interval=key != PERPLEXITY) for key in columns.values()),
                 _number(row.get("ppl_change_percent"), 2), _number(row.get("gap_reduction_overall")),
                 _number(row.get("gap_reduction_type_mean")), *([_worse_types(row)] if split else []),
                 _number(row.get("stage_seconds"), 0),
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
            target = content["sweep"].get("target", 50.0)
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
            axis.set_ylabel(f"|{objective} - {target:g}|")
            axis.set_title(f"{model}: bias against perplexity (star: chosen, dashed: budget)")
            axis.legend(fontsize=8)
            save_plot(figure, out / "plots", f"tradeoff_{model}", bbox_inches="tight")
            made.append(f"tradeoff_{model}")
        plt.close(figure)
    return made
