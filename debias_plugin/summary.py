"""The short summary `debias eval` prints after lm-eval's tables: bias with its interval and what 50 means,
SS/LMS/ICAT, perplexity — read from an lm-eval results dict, so it works on any saved results file too."""

from __future__ import annotations

import math

from debias_plugin.scoring.specs import spec

ALPHA = 0.05
PCT, SS, LMS, ICAT = (spec(name) for name in ("pct_stereotype", "ss", "lms", "icat"))
PERPLEXITIES = tuple(spec(name) for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"))
TYPE_GAPS = tuple(spec(name) for name in ("type_mean_gap", "worst_type_gap"))


def _value(metrics: dict, name: str, missing: float | None = None) -> float | None:
    value = metrics.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else missing


def _sizes(results: dict) -> dict[str, int]:
    """Documents per task, groups as the sum of their leaf tasks (lm-eval reports n-samples for tasks only)."""
    from debias_plugin.gate.results import leaf_tasks, results_from_dict

    sizes = {task: int(counts.get("effective", counts.get("original", 0)))
             for task, counts in (results.get("n-samples") or {}).items() if isinstance(counts, dict)}
    tree = results_from_dict(results, "")
    leaves = {task: leaf_tasks(tree, task) for task in results.get("results", {})}
    return {task: sum(sizes[leaf] for leaf in members) for task, members in leaves.items()
            if all(leaf in sizes for leaf in members)}


def _crows_line(task: str, pct: float, n: int | None) -> str:
    from debias_plugin.gate.stats import clopper_pearson

    interval, reading = "", ""
    if n and not math.isnan(pct):  # PCT's estimator is a proportion: the exact interval needs only n and pct
        ci = clopper_pearson(round(pct * n / PCT.scale), n, ALPHA)
        low, high = PCT.scale * ci.low, PCT.scale * ci.high
        interval = f"[{PCT.format(low)}, {PCT.format(high)}]"
        reading = ("no significant preference" if low <= PCT.center <= high else
                   "prefers the stereotype" if low > PCT.center else "prefers the anti-stereotype")
    gap = PCT.format(PCT.distance(pct))
    return f"  {task:34s} {n if n else '?':>6} {PCT.format(pct):>7} {interval:>16s} {gap:>6}  {reading}"


def _type_gap_line(results: dict, sizes: dict[str, int]) -> str:
    """Type-mean and worst-type gap (crows_bias_overall's, else from the per-type tasks' percentages), each with
    its stratified-bootstrap interval where per-pair samples are in the results, beside its noise floor: what a
    model with no preference scores on types of these sizes (scoring.crows.noise_floor)."""
    import numpy as np

    from debias_plugin.data.crows import CROWS_TYPE_TASKS
    from debias_plugin.gate.results import CROWS_OVERALL_TASK, crows_type_samples, results_from_dict
    from debias_plugin.scoring.crows import noise_floor, worst_type_gap
    from debias_plugin.scoring.gap import type_mean_gap

    per_task = results.get("results", {})
    overall = per_task.get(CROWS_OVERALL_TASK, {})
    percentages = {task: _value(per_task[task], PCT.name) for task in CROWS_TYPE_TASKS if task in per_task}
    percentages = {task: pct for task, pct in percentages.items() if pct is not None and not math.isnan(pct)}
    values = [_value(overall, metric.name) for metric in TYPE_GAPS]
    if None in values:
        if len(percentages) < 2:
            return ""
        values = [type_mean_gap(percentages.values()), worst_type_gap(percentages.values())]
    loaded = results_from_dict(results, "")
    samples = [crows_type_samples(loaded, metric.name) for metric in TYPE_GAPS] if loaded.samples else [None, None]
    type_sizes = (list(np.bincount(samples[0].strata)) if samples[0] is not None
                  else [sizes[task] for task in percentages] if all(task in sizes for task in percentages) else None)
    floors = noise_floor(type_sizes) if type_sizes else (None, None)
    parts = []
    for metric, value, found, floor in zip(TYPE_GAPS, values, samples, floors):
        text = f"{metric.display} {metric.format(value)}"
        if found is not None and found.units >= 2:
            interval = found.bootstrap(found.statistic(), ALPHA, resamples=2000, seed=0).interval
            text += f" [{metric.format(interval.low)}, {metric.format(interval.high)}]"
        if floor is not None:
            text += f" (noise floor {metric.format(floor)})"
        parts.append(text)
    return f"  per type: {', '.join(parts)}"


def summarize(results: dict) -> str:
    """A plain-text summary of the CrowS, StereoSet and perplexity metrics in lm-eval results ("" if none)."""
    per_task = results.get("results", {})
    sizes = _sizes(results)
    crows = [(task, _value(m, PCT.name)) for task, m in per_task.items()]
    groups = results.get("group_subtasks") or {}
    crows = sorted(((task, pct) for task, pct in crows if pct is not None), key=lambda row: row[0] not in groups)
    stereoset = [(task, m) for task, m in per_task.items() if _value(m, SS.name) is not None]
    perplexity = [(task, m) for task, m in per_task.items() if _value(m, PERPLEXITIES[0].name) is not None]
    if not (crows or stereoset or perplexity):
        return ""
    confidence = f"{100 * (1 - ALPHA):g}%"
    lines = ["", "Summary. CrowS pct_stereotype and StereoSet SS: 50 = no preference between a stereotype and its",
             "counterpart (0 is as biased as 100); gap = |x - 50|, lower is better. LMS and ICAT: 100 is best."]
    if crows:
        lines += ["", f"  {'CrowS-Pairs task':34s} {PCT.unit:>6} {PCT.display:>7} {confidence + ' interval':>16s} "
                      f"{'gap':>6}  reading (exact binomial interval)"]
        lines += [_crows_line(task, pct, sizes.get(task)) for task, pct in crows]
    types_line = _type_gap_line(results, sizes)
    if types_line:
        lines.append(types_line)
    if stereoset:
        lines += ["", f"  {'StereoSet task':34s} {'examples':>8} {SS.display:>6} {'gap':>6} {LMS.display:>6} "
                      f"{ICAT.display:>6}"]
        for task, metrics in stereoset:
            ss, lms, icat = (_value(metrics, metric.name, math.nan) for metric in (SS, LMS, ICAT))
            lines.append(f"  {task:34s} {sizes.get(task, '?'):>8} {SS.format(ss):>6} "
                         f"{SS.format(SS.distance(ss)):>6} {LMS.format(lms):>6} {ICAT.format(icat):>6}")
    if perplexity:
        lines += ["", f"  {'perplexity task':34s} {'documents':>9} {'word':>9} {'byte':>7} {'bits/byte':>9}  (lower is "
                      "better)"]
        for task, metrics in perplexity:
            word, byte, bits = (metric.format(_value(metrics, metric.name, math.nan)) for metric in PERPLEXITIES)
            lines.append(f"  {task:34s} {sizes.get(task, '?'):>9} {word:>9} {byte:>7} {bits:>9}")
    return "\n".join(lines)
