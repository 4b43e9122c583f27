"""Per-point numbers: every reported lm-eval metric with its interval (the gate's statistics), and the choice.

Intervals, as each metric's spec (scoring/specs.py) declares: proportions (CrowS 0/100 outcomes, accuracies) get
the exact Clopper-Pearson interval, perplexities and BBQ bias scores (over documents), StereoSet SS/LMS/ICAT (over
target terms) and other means a percentile bootstrap, all at 1 - alpha; a gap metric (|x - 50|) the image of its
percentage's interval. Metrics without a spec get their value only.
"""

from __future__ import annotations

from collections.abc import Iterable


def _interval(samples, metric: str, alpha: float, resamples: int, seed: int) -> dict | None:
    from debias_plugin.gate import stats
    from debias_plugin.gate.results import finite_or_none
    from debias_plugin.scoring.gap import gap_interval
    from debias_plugin.scoring.specs import spec

    gap_of = spec(metric).gap_of
    if gap_of:  # the samples are the percentage's: map its interval through |x - 50|
        source = _interval(samples, gap_of, alpha, resamples, seed)
        if source is None:
            return None
        center = spec(gap_of).center
        low, high = gap_interval(source["low"], source["high"], center)
        return {"low": low, "high": high, "method": source["method"] + f", mapped through |x - {center:g}|"}
    if samples.spec.estimator == "proportion":
        interval = stats.clopper_pearson(int(round(samples.columns["outcome"].sum())), samples.units, alpha)
        return {"low": interval.low * samples.scale, "high": interval.high * samples.scale, "method": interval.method}
    if samples.units < 2:
        return None
    result = samples.bootstrap(samples.statistic(), alpha, resamples=resamples, seed=seed)
    low, high = finite_or_none(result.interval.low), finite_or_none(result.interval.high)
    if low is None or high is None:
        return None
    return {"low": low, "high": high, "method": result.interval.method}


def summarize(results: dict, *, alpha: float, resamples: int, seed: int, source: str = "results") -> dict:
    """{"task/metric": {"value", "low", "high", "method", "units"}} for every numeric metric in lm-eval results."""
    from debias_plugin.gate.results import finite_or_none, metric_key, metric_names, metric_samples, results_from_dict

    loaded = results_from_dict(results, source)
    summary = {}
    for task in sorted(loaded.data.get("results", {})):
        for metric in metric_names(loaded, task):
            key = metric_key(loaded, task, metric)
            value = finite_or_none(loaded.data["results"][task].get(key)) if key else None
            entry = {"value": value}
            if value is not None:
                samples, _ = metric_samples(loaded, task, metric)
                interval = _interval(samples, metric, alpha, resamples, seed) if samples is not None else None
                if interval is not None:
                    entry.update(interval, units=samples.units)
            summary[f"{task}/{metric}"] = entry
    return summary


def value_of(summary: dict, metric: str) -> float | None:
    return (summary.get(metric) or {}).get("value")


def point_values(summary: dict, sweep) -> list[float | None]:
    """Optuna's objective values for a point: |objective - target|, then each budget metric."""
    objective = value_of(summary, sweep.config.objective)
    values = [None if objective is None else abs(objective - sweep.config.target)]
    return values + [value_of(summary, metric) for metric in sweep.config.budget]


def feasibility(summary: dict, reference: dict, sweep) -> dict[str, dict]:
    """Each budget rule at this point: value, limit (from the reference where relative), holds."""
    checks = {}
    for metric, rule in sweep.config.budget.items():
        value, base = value_of(summary, metric), value_of(reference, metric)
        limit = rule.limit(base)
        checks[metric] = {"value": value, "reference": base, "limit": limit, "rule": rule.describe(),
                          "holds": rule.holds(value, base),
                          "relative_change": None if value is None or not base else value / base - 1}
    return checks


def constraints(summary: dict, reference: dict, sweep, types: dict | None = None) -> dict[str, float] | None:
    """Optuna constraints of a point, one per budget rule, <= 0 where it holds; None when one cannot be judged.
    With types_not_worse, one more: the number of worse types (`types`: types_check's record)."""
    found = {}
    for metric, check in feasibility(summary, reference, sweep).items():
        if check["value"] is None or check["limit"] is None:
            return None
        over = check["value"] - check["limit"]
        found[metric] = -over if sweep.config.budget[metric].kind == "min" else over
    if sweep.config.types_not_worse:
        if types is None:
            return None
        found[TYPES_NOT_WORSE] = float(len(types["worse"]))
    return found


TYPES_NOT_WORSE = "types_not_worse"


def types_check(results: dict, reference: dict, sweep, source: str = "results") -> dict | None:
    """gate.types.types_not_worse of a point's screen results against the base's, as a JSON record (passed, the
    worse types with both values and Holm-adjusted p); None where the sweep does not ask for it."""
    from debias_plugin.gate.results import results_from_dict
    from debias_plugin.gate.types import types_not_worse

    if not sweep.config.types_not_worse:
        return None
    candidate, base = (_selection_as_full(results_from_dict(dict(data), where))
                       for data, where in ((results, source), (reference, "the base's results")))
    verdict = types_not_worse(candidate, base, sweep.config.alpha, resamples=sweep.config.resamples,
                              seed=sweep.config.seed)
    return {"passed": verdict.passed, "alpha": verdict.alpha, "tested": [row.name for row in verdict.rows],
            "worse": [{"name": row.name, "value": row.candidate, "reference": row.baseline,
                       "adjusted_p": row.adjusted_p} for row in verdict.worse]}


def types_hold(types: dict | None, sweep) -> bool:
    """Whether a point passes types_not_worse (always, where the sweep does not ask; never, where unjudged)."""
    return not sweep.config.types_not_worse or bool(types and types["passed"])


def _selection_as_full(results):
    """The selection half's per-type tasks under the full set's names, which gate.types tests (a study screens the
    selection half only); results without them unchanged."""
    from debias_plugin.data.crows import CROWS_BIAS_TYPES, CROWS_HALVES, crows_half_task, crows_type_task
    from debias_plugin.gate.results import Results

    names = {crows_half_task(CROWS_HALVES[0], t): crows_type_task(t) for t in CROWS_BIAS_TYPES}
    present = set(results.data.get("results", {}))
    if not names.keys() & present or set(names.values()) & present:
        return results

    def renamed(value):
        if isinstance(value, dict):
            return {names.get(key, key): renamed(item) for key, item in value.items()}
        if isinstance(value, list):
            return [names.get(item, item) if isinstance(item, str) else renamed(item) for item in value]
        return value

    data = {key: renamed(value) if key != "samples" else value for key, value in results.data.items()}
    return Results(results.source, data, {names.get(task, task): rows for task, rows in results.samples.items()})


def choose(points: Iterable[dict]) -> str | None:
    """The feasible point closest to the target; ties go to the smaller budget cost, then the earlier point."""
    best, best_rank = None, None
    for order, point in enumerate(points):
        distance = point.get("distance")
        if distance is None or not point.get("feasible"):
            continue
        costs = [c if d == "minimize" else -c for c, d in zip(point.get("budget_values", []), point.get("directions", []))]
        rank = (distance, *costs, order)
        if best_rank is None or rank < best_rank:
            best, best_rank = point["key"], rank
    return best


def leaf_metrics(summary: dict, metric: str) -> dict[str, float | None]:
    """task/metric of a group's subtasks in the summary: crows_bias/pct_stereotype -> each crows_bias_<type>."""
    task, name = metric.split("/", 1)
    prefix = task + "_"
    found = {}
    for key, entry in sorted(summary.items()):
        leaf, leaf_metric = key.split("/", 1)
        if leaf.startswith(prefix) and leaf_metric == name and leaf[len(prefix):].split("_")[0] not in _NOT_SUBTASKS:
            found[leaf[len(prefix):]] = entry.get("value")
    return found


# sibling tasks over the same data (and CrowS's halves: crows_bias_selection_<type>), not parts of the group
_NOT_SUBTASKS = ("overall", "aul", "inter", "selection", "heldout")
