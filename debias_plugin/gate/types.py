"""`types_not_worse`: no CrowS bias type and no StereoSet domain made significantly worse than in the base.

One definition for the gate (a check kind), the sweep and the study. A CrowS type (its crows_bias_<type> task) is
worse when, by exact paired tests on its pair table, it is significantly farther from 50 than the base
(stats.farther_from_half) or it was pushed past 50: a significant preference the other way, towards which it moved
significantly (stats.overshoots_half); the two tests are Bonferroni-combined. A StereoSet domain (ss_<domain> on
stereoset_bias) is worse when a paired bootstrap over target terms finds it farther from 50. Holm's correction runs
over the family of the types and domains both results hold. Why both CrowS tests: an overall score can improve
while one type overshoots (issue 38: SmolLM2 unlearning moved race_color from 49.4, no preference, to 41.5, a
significant anti-stereotype preference); "farther from 50" alone does not refuse that (p = 0.063 there), because
the base's own distance is uncertain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from debias_plugin.data import STEREOSET_DOMAINS
from debias_plugin.data.crows import CROWS_BIAS_TYPES, crows_type_task
from debias_plugin.errors import DebiasError
from debias_plugin.gate import stats
from debias_plugin.gate.results import MetricSamples, Results, metric_samples, paired_order
from debias_plugin.scoring.gap import NO_PREFERENCE, gap

STEREOSET_TASK = "stereoset_bias"


@dataclass(frozen=True)
class TypeRow:
    """One CrowS type or StereoSet domain: both models' values, the distance change, raw and Holm-adjusted p."""

    name: str  # "crows race-color", "stereoset gender"
    metric: str  # task/metric the row is computed from
    candidate: float
    baseline: float
    distance_change: float  # |candidate - 50| - |baseline - 50|: > 0 is farther from no preference
    p_value: float
    adjusted_p: float
    worse: bool
    method: str


@dataclass(frozen=True)
class TypesVerdict:
    passed: bool
    alpha: float
    rows: list[TypeRow]

    @property
    def worse(self) -> list[TypeRow]:
        return [row for row in self.rows if row.worse]


def _family(candidate: Results, baseline: Results) -> list[tuple[str, str, str]]:
    """(name, task, metric) of every CrowS type and StereoSet domain both results report."""
    both = set(candidate.data["results"]) & set(baseline.data["results"])
    members = [(f"crows {bias_type}", crows_type_task(bias_type), "pct_stereotype")
               for bias_type in CROWS_BIAS_TYPES if crows_type_task(bias_type) in both]
    if STEREOSET_TASK in both:
        members += [(f"stereoset {domain}", STEREOSET_TASK, f"ss_{domain}") for domain in STEREOSET_DOMAINS]
    return members


def _samples(results: Results, task: str, metric: str, role: str) -> MetricSamples:
    samples, reason = metric_samples(results, task, metric)
    if samples is None:
        raise DebiasError(f"types_not_worse: {task}/{metric} of the {role} ({results.source}): {reason}. The per-type "
                          "tests need per-pair data: evaluate with --log_samples (the gate and the sweep do).")
    return samples


def _aligned(candidate: MetricSamples, baseline: MetricSamples, what: str) -> np.ndarray:
    """The baseline's unit order matching the candidate's; refuses different items."""
    order, problem, _ = paired_order(candidate, baseline)
    if problem == "items":
        raise DebiasError(f"types_not_worse: {what}: the candidate and the baseline were evaluated on different items "
                          f"({candidate.units} vs {baseline.units} {candidate.unit_name}). Evaluate both on the same "
                          "tasks and limit.")
    if problem == "document":
        raise DebiasError(f"types_not_worse: {what}: a document differs between the candidate and the baseline "
                          "(their doc_hash differ). Evaluate both on the same data.")
    return order


def _one(name: str, task: str, metric: str, candidate: Results, baseline: Results, resamples: int, seed: int):
    """(candidate value, baseline value, distance change, one-sided-convention p, method) of one family member."""
    what = f"{task}/{metric}"
    mine, theirs = _samples(candidate, task, metric, "candidate"), _samples(baseline, task, metric, "baseline")
    order = _aligned(mine, theirs, what)
    full = np.arange(mine.units)
    c, b = float(mine.statistic()(full)), float(theirs.statistic()(order))
    change = float(gap(c, NO_PREFERENCE) - gap(b, NO_PREFERENCE))
    if mine.spec.comparison == "exact_paired":
        table = stats.pair_table(mine.columns["outcome"], theirs.columns["outcome"][order])
        farther, overshoot = stats.farther_from_half(table), stats.overshoots_half(table)
        p = min(1.0, 2.0 * min(farther.p_value, overshoot.p_value))
        return c, b, change, p, f"{farther.method}; or {overshoot.method}; Bonferroni over the two"
    if mine.units < 2:
        return c, b, change, 1.0, f"only {mine.units} {mine.unit_name}: not testable"
    baseline_statistic = theirs.statistic()
    paired = stats.distance_change(mine.statistic(), lambda idx: baseline_statistic(order[idx]), NO_PREFERENCE)
    boot = stats.bootstrap(paired, mine.units, 0.05, resamples=resamples, seed=seed, what=f"paired {mine.unit_name}")
    p = stats.two_sided(stats.bootstrap_bound_p(boot.distribution, 0.0, "above"))
    return c, b, change, p, f"paired bootstrap over {mine.unit_name}, B={resamples}"


def types_not_worse(candidate: Results, baseline: Results, alpha: float = 0.05, *, resamples: int = 2000,
                    seed: int = 0) -> TypesVerdict:
    """Whether no CrowS type and no StereoSet domain is significantly worse than in the baseline (farther from 50,
    or pushed past it; Holm over the family both results hold); the rows say which are, with adjusted p-values."""
    family = _family(candidate, baseline)
    if not family:
        raise DebiasError("types_not_worse needs per-type results in both the candidate and the baseline: the "
                          f"crows_bias group (tasks {', '.join(crows_type_task(t) for t in CROWS_BIAS_TYPES[:2])}, "
                          f"...) or {STEREOSET_TASK}; found tasks {', '.join(sorted(candidate.data['results']))}.")
    measured = [_one(*member, candidate, baseline, resamples, seed) for member in family]
    adjusted = stats.holm([p for *_, p, _ in measured])
    rows = [TypeRow(name, f"{task}/{metric}", c, b, change, p, float(adj), bool(adj < alpha), method)
            for (name, task, metric), (c, b, change, p, method), adj in zip(family, measured, adjusted)]
    return TypesVerdict(not any(row.worse for row in rows), alpha, rows)
