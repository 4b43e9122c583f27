"""One gate check on lm-eval results: find the metric, its per-sample data, the interval, the test, the verdict."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import numpy as np

from debias_plugin.errors import DebiasError
from debias_plugin.gate import stats
from debias_plugin.gate.config import Gate
from debias_plugin.gate.results import (
    MetricSamples, Results, higher_is_better, metric_key, metric_names, metric_samples, paired_order, reported_value,
    same_point,
)
from debias_plugin.scoring.specs import find_spec


@dataclass
class CheckResult:
    title: str
    metric: str
    kind: str
    requirement: str
    line: int
    passed: bool
    value: float
    interval: stats.Interval | None = None
    baseline_value: float | None = None
    baseline_interval: stats.Interval | None = None
    delta_label: str | None = None  # what a baseline check compares: "Δ|x-50|", "Δ", "relative change"
    delta: float | None = None
    delta_interval: stats.Interval | None = None
    p_value: float | None = None
    method: str = ""
    note: str = ""
    seconds: float = 0.0
    types: list[dict] | None = None  # types_not_worse: one row per CrowS type / StereoSet domain (gate/types.py)


@dataclass
class _Measured:
    """A metric of one model: reported value, and (when usable) its per-unit data and interval."""

    value: float
    samples: MetricSamples | None = None
    statistic: stats.Statistic | None = None
    interval: stats.Interval | None = None
    distribution: np.ndarray | None = None
    note: str = ""


def _measure(results: Results, task: str, key: str, gate: Gate) -> _Measured:
    config = gate.config
    value = reported_value(results, task, key)
    samples, note = metric_samples(results, task, key)
    if samples is None:
        return _Measured(value, note=f"{note}: point estimate only")
    statistic = samples.statistic()
    point = float(statistic(np.arange(samples.units)))
    if not same_point(point, value):
        return _Measured(value, note=f"per-sample data give {point:.6g}, not the reported {value:.6g}: "
                                     "point estimate only")
    if samples.kind == "proportion":
        ci = stats.clopper_pearson(int(round(samples.columns["outcome"].sum())), samples.units, config.alpha)
        interval = stats.Interval(ci.low * samples.scale, ci.high * samples.scale, ci.confidence, ci.method)
        return _Measured(value, samples, statistic, interval)
    if samples.units < 2:
        return _Measured(value, note=f"only {samples.units} {samples.unit_name}: point estimate only")
    result = samples.bootstrap(statistic, config.alpha, resamples=config.resamples, seed=config.seed)
    return _Measured(value, samples, statistic, result.interval, result.distribution)


def _resolve_metric(results: Results, check, index: int, gate: Gate, role: str) -> str:
    task, metric = check.task, check.metric_name
    where = ("checks", index, "metric") if role == "candidate" else ("baseline",)
    if task not in results.data["results"]:
        tasks = ", ".join(sorted(results.data["results"]))
        raise gate.error(where, f"a task in the {role} results ({tasks})", f"'{task}' in {results.source}")
    key = metric_key(results, task, metric)
    if key is None:
        available = ", ".join(metric_names(results, task))
        raise gate.error(where, f"a metric that {task} reports in the {role} results ({available})", f"'{metric}'")
    return key


def _bound_p(measured: _Measured, bound: float, side: stats.Side) -> float:
    """One-sided p-value that the metric is `side` the bound, from its per-sample data."""
    samples = measured.samples
    if samples.kind == "proportion":
        successes = int(round(samples.columns["outcome"].sum()))
        return stats.binomial_bound_p(successes, samples.units, bound / samples.scale, side)
    return stats.bootstrap_bound_p(measured.distribution, bound, side)


def _single(check, index: int, gate: Gate, candidate: Results) -> CheckResult:
    key = _resolve_metric(candidate, check, index, gate, "candidate")
    measured = _measure(candidate, check.task, key, gate)
    result = CheckResult(check.title, check.metric, check.kind, check.requirement, gate.line("checks", index),
                         True, measured.value, measured.interval, note=measured.note)
    if check.kind == "within":
        bounds = [(check.within[0], "below"), (check.within[1], "above")]
    else:
        bounds = [(check.min, "below")] if check.kind == "min" else [(check.max, "above")]
    if measured.samples is None:
        result.passed = all(measured.value >= bound if side == "below" else measured.value <= bound
                            for bound, side in bounds)
        result.method = "point estimate"
        return result
    result.p_value = stats.two_sided(min(_bound_p(measured, bound, side) for bound, side in bounds))
    result.passed = not result.p_value < gate.config.alpha
    result.method = ("exact binomial test" if measured.samples.kind == "proportion"
                     else f"bootstrap test over {measured.samples.unit_name}")
    return result


def _aligned(candidate: MetricSamples, baseline: MetricSamples, check, gate: Gate) -> np.ndarray:
    """Baseline unit order matching the candidate's; refuses a comparison on different items."""
    order, problem, key = paired_order(candidate, baseline)
    if problem == "items":
        raise DebiasError(
            f"{gate.path}, {gate.where('baseline')}: the candidate and the baseline were evaluated on different "
            f"items for {check.metric} ({candidate.units} vs {baseline.units} {candidate.unit_name}"
            f"{', e.g. ' + repr(key[0]) + ' only in the candidate' if key else ''}). Evaluate both with the "
            "same tasks and limit.")
    if problem == "document":
        raise DebiasError(
            f"{gate.path}, {gate.where('baseline')}: {check.metric}: {key[0]!r} is a different document "
            "in the candidate and the baseline results (their doc_hash differ). Evaluate both on the same data.")
    return order


def _reordered(samples: MetricSamples, order: np.ndarray) -> MetricSamples:
    return dataclasses.replace(samples, keys=[samples.keys[i] for i in order],
                               hashes=[samples.hashes[i] for i in order],
                               columns={name: column[order] for name, column in samples.columns.items()})


def _compared(check, index: int, gate: Gate, candidate: Results, baseline: Results) -> CheckResult:
    key = _resolve_metric(candidate, check, index, gate, "candidate")
    baseline_key = _resolve_metric(baseline, check, index, gate, "baseline")
    mine = _measure(candidate, check.task, key, gate)
    theirs = _measure(baseline, check.task, baseline_key, gate)
    result = CheckResult(check.title, check.metric, check.kind, check.requirement, gate.line("checks", index),
                         True, mine.value, mine.interval, theirs.value, theirs.interval)
    c, b = mine.value, theirs.value
    metric = find_spec(key)
    if check.kind == "max_relative_increase":
        label, bound, worse_side = "relative change", check.max_relative_increase, "above"
        delta = c / b - 1 if b else math.inf
        pairing = stats.relative_change
    elif metric is not None and metric.centered:
        label, bound, worse_side = f"Δ|x-{metric.center:g}|", 0.0, "above"
        delta = metric.distance(c) - metric.distance(b)
        pairing = functools.partial(stats.distance_change, center=metric.center)
    else:
        higher = metric.ideal == "high" if metric is not None else _results_say_higher(candidate, baseline, check, key,
                                                                                        baseline_key)
        if higher is None:
            raise gate.error(("checks", index, "metric"), "a metric whose results say whether higher is better "
                             "(lm-eval's higher_is_better), to tell which direction is worse", check.metric)
        label, bound, worse_side = "Δ", 0.0, "below" if higher else "above"
        delta = c - b
        pairing = stats.difference
    result.delta_label, result.delta = label, delta
    point_passes = not (delta > bound if worse_side == "above" else delta < bound)
    if mine.samples is None or theirs.samples is None:
        result.passed, result.method = point_passes, "point estimate"
        result.note = mine.note or f"baseline: {theirs.note}"
        return result
    order = _aligned(mine.samples, theirs.samples, check, gate)
    what = mine.samples.unit_name
    if mine.samples.units < 2:
        result.passed, result.method = point_passes, "point estimate"
        result.note = f"only {mine.samples.units} {what}: point estimate only"
        return result
    paired = pairing(mine.statistic, _reordered(theirs.samples, order).statistic())
    boot = mine.samples.bootstrap(paired, gate.config.alpha, resamples=gate.config.resamples, seed=gate.config.seed,
                                  what=f"paired {what}")
    result.delta_interval = boot.interval
    if mine.samples.spec.comparison == "exact_paired" and check.kind == "not_worse_than_baseline":
        table = stats.pair_table(mine.samples.columns["outcome"], theirs.samples.columns["outcome"][order])
        test = (stats.farther_from_half(table) if mine.samples.spec.centered
                else stats.mcnemar_worse(table, "lower" if worse_side == "below" else "higher"))
        result.p_value, result.method = test.p_value, test.method
    else:
        result.p_value = stats.two_sided(stats.bootstrap_bound_p(boot.distribution, bound, worse_side))
        result.method = f"paired bootstrap test over {what}"
    result.passed = not result.p_value < gate.config.alpha
    return result


def _results_say_higher(candidate: Results, baseline: Results, check, key: str, baseline_key: str) -> bool | None:
    """A metric with no spec: lm-eval's higher_is_better in the candidate's results, else in the baseline's."""
    higher = higher_is_better(candidate, check.task, key)
    return higher if higher is not None else higher_is_better(baseline, check.task, baseline_key)


def _types(check, index: int, gate: Gate, candidate: Results, baseline: Results) -> CheckResult:
    """types_not_worse: the family's verdict; value = how many types are worse, p = the smallest adjusted p."""
    from debias_plugin.gate.types import types_not_worse

    config = gate.config
    try:
        verdict = types_not_worse(candidate, baseline, config.alpha, resamples=config.resamples, seed=config.seed)
    except DebiasError as err:
        raise DebiasError(f"{gate.path}, {gate.where('checks', index, 'types_not_worse')}: {err}") from None
    worse = verdict.worse
    note = "" if worse else f"none of {len(verdict.rows)} worse"  # the report lists the worse rows
    return CheckResult(check.title, "crows_bias_<type>/pct_stereotype, stereoset_bias/ss_<domain>", check.kind,
                       check.requirement, gate.line("checks", index), verdict.passed, float(len(worse)),
                       p_value=min(row.adjusted_p for row in verdict.rows),
                       method="exact paired tests per CrowS type, paired bootstrap per StereoSet domain, Holm",
                       note=note, types=[dataclasses.asdict(row) for row in verdict.rows])


def run_check(check, index: int, gate: Gate, candidate: Results, baseline: Results | None) -> CheckResult:
    started = time.perf_counter()
    if check.kind == "types_not_worse":
        result = _types(check, index, gate, candidate, baseline)
    elif check.kind in ("within", "min", "max"):
        result = _single(check, index, gate, candidate)
    else:
        result = _compared(check, index, gate, candidate, baseline)
    result.seconds = time.perf_counter() - started
    return result
