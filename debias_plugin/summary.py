"""The short summary `debias eval` prints after lm-eval's tables: bias with its interval and what 50 means,
SS/LMS/ICAT, perplexity — read from an lm-eval results dict, so it works on any saved results file too."""

from __future__ import annotations

import math

from debias_plugin.scoring.gap import NO_PREFERENCE, gap

ALPHA = 0.05


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
    if n and not math.isnan(pct):
        ci = clopper_pearson(round(pct * n / 100), n, ALPHA)
        low, high = 100 * ci.low, 100 * ci.high
        interval = f"[{low:.1f}, {high:.1f}]"
        reading = ("no significant preference" if low <= NO_PREFERENCE <= high else
                   "prefers the stereotype" if low > NO_PREFERENCE else "prefers the anti-stereotype")
    return f"  {task:34s} {n if n else '?':>6} {pct:7.1f} {interval:>16s} {gap(pct):6.1f}  {reading}"


def summarize(results: dict) -> str:
    """A plain-text summary of the CrowS, StereoSet and perplexity metrics in lm-eval results ("" if none)."""
    per_task = results.get("results", {})
    sizes = _sizes(results)
    crows = [(task, _value(m, "pct_stereotype")) for task, m in per_task.items()]
    groups = results.get("group_subtasks") or {}
    crows = sorted(((task, pct) for task, pct in crows if pct is not None), key=lambda row: row[0] not in groups)
    stereoset = [(task, m) for task, m in per_task.items() if _value(m, "ss") is not None]
    perplexity = [(task, m) for task, m in per_task.items() if _value(m, "word_perplexity") is not None]
    if not (crows or stereoset or perplexity):
        return ""
    confidence = f"{100 * (1 - ALPHA):g}%"
    lines = ["", "Summary. CrowS pct_stereotype and StereoSet SS: 50 = no preference between a stereotype and its",
             "counterpart (0 is as biased as 100); gap = |x - 50|, lower is better. LMS and ICAT: 100 is best."]
    if crows:
        lines += ["", f"  {'CrowS-Pairs task':34s} {'pairs':>6} {'pct':>7} {confidence + ' interval':>16s} "
                      f"{'gap':>6}  reading (exact binomial interval)"]
        lines += [_crows_line(task, pct, sizes.get(task)) for task, pct in crows]
    if stereoset:
        lines += ["", f"  {'StereoSet task':34s} {'examples':>8} {'SS':>6} {'gap':>6} {'LMS':>6} {'ICAT':>6}"]
        for task, metrics in stereoset:
            ss, lms, icat = (_value(metrics, name, math.nan) for name in ("ss", "lms", "icat"))
            lines.append(f"  {task:34s} {sizes.get(task, '?'):>8} {ss:6.1f} {gap(ss):6.1f} {lms:6.1f} {icat:6.1f}")
    if perplexity:
        lines += ["", f"  {'perplexity task':34s} {'documents':>9} {'word':>9} {'byte':>7} {'bits/byte':>9}  (lower is "
                      "better)"]
        for task, metrics in perplexity:
            word, byte, bits = (_value(metrics, name, math.nan)
                                for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"))
            lines.append(f"  {task:34s} {sizes.get(task, '?'):>9} {word:9.3f} {byte:7.4f} {bits:9.4f}")
    return "\n".join(lines)
