"""Statistics for pass/fail decisions on benchmark scores: pure functions, numbers and arrays in, dataclasses out.

Convention, used by every test here: a check "fails" only when a one-sided test in the failing direction rejects
at alpha / 2. That is a two-sided test at alpha, so a decision always agrees with the two-sided (1 - alpha)
interval shown next to it (Clopper-Pearson and percentile-bootstrap intervals are exactly those test inversions).
`two_sided(p)` turns the one-sided p-value into the reported one.

Bootstrap statistics are vectorized functions of *unit indices*: `statistic(idx)` with idx of shape (..., n)
returns the metric recomputed on the units idx (documents, pairs or target terms), so one resampling of indices
serves single-model intervals and paired (same-items) comparisons alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from debias_plugin.scoring.gap import gap
from debias_plugin.scoring.stereoset import icat

Side = Literal["below", "above"]
Statistic = Callable[[np.ndarray], np.ndarray]

DEFAULT_RESAMPLES = 2000
_BATCH = 256  # resamples per scipy batch: bounds memory to 256 x n indices


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    confidence: float
    method: str


@dataclass(frozen=True)
class BootstrapResult:
    estimate: float
    interval: Interval
    distribution: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class PairTable:
    """Paired binary outcomes on the same items (1 = the event, e.g. the stereotype wins)."""

    both: int  # baseline 1, candidate 1
    candidate_only: int  # baseline 0, candidate 1
    baseline_only: int  # baseline 1, candidate 0
    neither: int  # baseline 0, candidate 0


@dataclass(frozen=True)
class TestResult:
    p_value: float  # two-sided convention (see the module docstring)
    method: str


def two_sided(one_sided_p: float) -> float:
    return min(1.0, 2.0 * one_sided_p)


# --- exact binomial (a single model's proportion) -------------------------------------------------------------


def clopper_pearson(successes: int, trials: int, alpha: float) -> Interval:
    """Exact (Clopper-Pearson) two-sided interval for a proportion, on the 0-1 scale."""
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=1 - alpha, method="exact")
    return Interval(float(ci.low), float(ci.high), 1 - alpha, "Clopper-Pearson")


def binomial_bound_p(successes: int, trials: int, bound: float, side: Side) -> float:
    """One-sided exact p-value that the true proportion is `side` the bound (0-1 scale)."""
    from scipy.stats import binomtest

    if side == "below":
        if bound > 1:
            return 0.0  # every proportion is below a bound above 1
        if bound <= 0:
            return 1.0
        return float(binomtest(int(successes), int(trials), bound, alternative="less").pvalue)
    if bound < 0:
        return 0.0
    if bound >= 1:
        return 1.0
    return float(binomtest(int(successes), int(trials), bound, alternative="greater").pvalue)


# --- exact paired tests on binary outcomes (McNemar / sign test) ----------------------------------------------


def pair_table(candidate: np.ndarray, baseline: np.ndarray) -> PairTable:
    candidate, baseline = np.asarray(candidate, bool), np.asarray(baseline, bool)
    return PairTable(both=int(np.sum(candidate & baseline)), candidate_only=int(np.sum(candidate & ~baseline)),
                     baseline_only=int(np.sum(~candidate & baseline)), neither=int(np.sum(~candidate & ~baseline)))


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test that wins are more likely than losses (exact McNemar on discordant pairs)."""
    from scipy.stats import binomtest

    if wins + losses == 0:
        return 1.0
    return float(binomtest(int(wins), int(wins + losses), 0.5, alternative="greater").pvalue)


def mcnemar_worse(table: PairTable, worse: Literal["higher", "lower"]) -> TestResult:
    """Exact one-sided McNemar test that the candidate's proportion is `worse` (higher or lower) than the baseline's."""
    gained, lost = table.candidate_only, table.baseline_only
    p = sign_test_p(gained, lost) if worse == "higher" else sign_test_p(lost, gained)
    return TestResult(two_sided(p), "exact McNemar (sign test on discordant pairs)")


def farther_from_half(table: PairTable) -> TestResult:
    """Exact test that |p_candidate - 1/2| > |p_baseline - 1/2| on paired binary outcomes.

    Worse towards 1 means p_c > p_b (discordant pairs: candidate_only beats baseline_only) *and* p_c > 1 - p_b
    (concordant pairs: both beats neither); both are exact sign tests, combined as an intersection-union test
    (p = the larger). Worse towards 0 is the mirror image; the two directions share alpha (Bonferroni, the factor
    2 inside), and the result follows the module's two-sided convention (the second factor 2).
    """
    towards_one = max(sign_test_p(table.candidate_only, table.baseline_only), sign_test_p(table.both, table.neither))
    towards_zero = max(sign_test_p(table.baseline_only, table.candidate_only), sign_test_p(table.neither, table.both))
    p = min(1.0, 2.0 * min(towards_one, towards_zero))
    return TestResult(two_sided(p), "exact sign tests on discordant and concordant pairs (intersection-union)")


def overshoots_half(table: PairTable) -> TestResult:
    """Exact test that the candidate was pushed past 1/2: it significantly prefers one side (exact binomial test of
    its proportion against 1/2) *and* moved significantly towards that side from the baseline (exact McNemar).

    Intersection-union per side (p = the larger), the two sides Bonferroni-combined, two-sided convention: the
    overshoot a debiasing method can win an overall score with (a type at 49 moved to 41) is refused, even where
    |p - 1/2| did not grow significantly because the baseline was itself off 1/2.
    """
    successes = table.both + table.candidate_only
    trials = table.both + table.candidate_only + table.baseline_only + table.neither
    towards_one = max(binomial_bound_p(successes, trials, 0.5, "above"),
                      sign_test_p(table.candidate_only, table.baseline_only))
    towards_zero = max(binomial_bound_p(successes, trials, 0.5, "below"),
                       sign_test_p(table.baseline_only, table.candidate_only))
    p = min(1.0, 2.0 * min(towards_one, towards_zero))
    return TestResult(two_sided(p), "exact binomial test against 1/2 and McNemar towards that side (intersection-union)")


# --- bootstrap -------------------------------------------------------------------------------------------------


def bootstrap(statistic: Statistic, units: int, alpha: float, *, resamples: int = DEFAULT_RESAMPLES,
              seed: int = 0, what: str = "units", strata: np.ndarray | None = None) -> BootstrapResult:
    """Percentile bootstrap of statistic(idx) over `units` resampled with replacement (scipy.stats.bootstrap);
    with `strata` (a label per unit), stratified_bootstrap."""
    from scipy.stats import bootstrap as scipy_bootstrap

    if units < 2:
        raise ValueError(f"a bootstrap needs at least 2 {what}, got {units}")
    if strata is not None:
        return stratified_bootstrap(statistic, strata, alpha, resamples=resamples, seed=seed, what=what)
    indices = np.arange(units)
    result = scipy_bootstrap((indices,), lambda idx, axis=-1: statistic(idx), n_resamples=resamples,
                             batch=_BATCH, vectorized=True, confidence_level=1 - alpha, method="percentile",
                             rng=np.random.default_rng(seed))
    ci = result.confidence_interval
    return BootstrapResult(float(statistic(indices)), Interval(float(ci.low), float(ci.high), 1 - alpha,
                                                               f"percentile bootstrap over {what}, B={resamples}"),
                           result.bootstrap_distribution)


def stratified_indices(strata: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) unit indices, each stratum's units drawn with replacement from that stratum only, in place."""
    strata = np.asarray(strata)
    indices = np.empty((resamples, strata.size), dtype=np.intp)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        indices[:, members] = members[rng.integers(0, members.size, size=(resamples, members.size))]
    return indices


def stratified_bootstrap(statistic: Statistic, strata: np.ndarray, alpha: float, *,
                         resamples: int = DEFAULT_RESAMPLES, seed: int = 0, what: str = "units") -> BootstrapResult:
    """Percentile bootstrap resampling units within their strata (e.g. CrowS pairs within bias types), so every
    resample keeps each stratum's size: a per-type statistic never sees a type grow, shrink or vanish."""
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    distribution = np.concatenate([statistic(stratified_indices(strata, min(_BATCH, resamples - start), rng))
                                   for start in range(0, resamples, _BATCH)])
    low, high = np.percentile(distribution, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    method = f"stratified percentile bootstrap over {what} within {np.unique(strata).size} strata, B={resamples}"
    return BootstrapResult(float(statistic(np.arange(strata.size))),
                           Interval(float(low), float(high), 1 - alpha, method), distribution)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error at alpha when rejecting adjusted p < alpha)."""
    p_values = np.asarray(p_values, float)
    order = np.argsort(p_values, kind="stable")
    steps = (p_values.size - np.arange(p_values.size)) * p_values[order]
    adjusted = np.empty_like(p_values)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(steps))
    return adjusted


def bootstrap_bound_p(distribution: np.ndarray, bound: float, side: Side) -> float:
    """One-sided bootstrap p-value that the statistic is `side` the bound: the share of replicates that are not."""
    distribution = np.asarray(distribution, float)
    distribution = distribution[~np.isnan(distribution)]
    if distribution.size == 0:
        return 1.0
    against = np.sum(distribution >= bound) if side == "below" else np.sum(distribution <= bound)
    return float((1 + against) / (1 + distribution.size))


# --- statistics as functions of unit indices ------------------------------------------------------------------


def mean_statistic(values: np.ndarray) -> Statistic:
    values = np.asarray(values, float)
    return lambda idx: values[idx].mean(axis=-1)


def weighted_perplexity_statistic(loglikelihoods: np.ndarray, weights: np.ndarray) -> Statistic:
    """exp(-sum log-likelihood / sum words (or bytes)): lm-eval's weighted_perplexity over the chosen documents."""
    loglikelihoods, weights = np.asarray(loglikelihoods, float), np.asarray(weights, float)
    return lambda idx: np.exp(-loglikelihoods[idx].sum(axis=-1) / weights[idx].sum(axis=-1))


def bits_per_byte_statistic(loglikelihoods: np.ndarray, byte_counts: np.ndarray) -> Statistic:
    loglikelihoods, byte_counts = np.asarray(loglikelihoods, float), np.asarray(byte_counts, float)
    return lambda idx: -loglikelihoods[idx].sum(axis=-1) / byte_counts[idx].sum(axis=-1) / math.log(2)


def perplexity_statistic(loglikelihoods: np.ndarray) -> Statistic:
    """exp(-mean log-likelihood): lm-eval's `perplexity` aggregation."""
    loglikelihoods = np.asarray(loglikelihoods, float)
    return lambda idx: np.exp(-loglikelihoods[idx].mean(axis=-1))


def stereoset_statistic(ss_per_target: np.ndarray, lms_per_target: np.ndarray,
                        metric: Literal["ss", "lms", "icat"]) -> Statistic:
    """StereoSet's macro average over the chosen target terms: SS, LMS as means of per-target values, ICAT from those.

    A target drawn twice counts twice, as two distinct terms would (tests check this against
    debias_plugin.scoring.stereoset.stereoset_scores on relabelled resamples).
    """
    ss_per_target, lms_per_target = np.asarray(ss_per_target, float), np.asarray(lms_per_target, float)

    def statistic(idx):
        ss = ss_per_target[idx].mean(axis=-1)
        if metric == "ss":
            return ss
        lms = lms_per_target[idx].mean(axis=-1)
        if metric == "lms":
            return lms
        return icat(lms, ss)

    return statistic


def type_gap_statistic(outcomes: np.ndarray, strata: np.ndarray, worst: bool = False) -> Statistic:
    """Mean (or, worst=True, largest) over strata of |100 * mean outcome - 50| on the chosen units: CrowS's
    type_mean_gap / worst_type_gap (scoring.crows) recomputed per resample; outcomes are 0/1."""
    outcomes, strata = np.asarray(outcomes, float), np.asarray(strata)
    labels = np.unique(strata)

    def statistic(idx):
        chosen, kinds = outcomes[idx], strata[idx]
        gaps = []
        for label in labels:
            member = kinds == label
            gaps.append(gap(100.0 * (chosen * member).sum(axis=-1) / member.sum(axis=-1)))
        gaps = np.stack(gaps, axis=-1)
        return gaps.max(axis=-1) if worst else gaps.mean(axis=-1)

    return statistic


def distance_change(candidate: Statistic, baseline: Statistic, center: float) -> Statistic:
    """|candidate - center| - |baseline - center| on the same units: > 0 means the candidate is farther off."""
    return lambda idx: gap(candidate(idx), center) - gap(baseline(idx), center)


def difference(candidate: Statistic, baseline: Statistic) -> Statistic:
    return lambda idx: candidate(idx) - baseline(idx)


def relative_change(candidate: Statistic, baseline: Statistic) -> Statistic:
    """candidate / baseline - 1 on the same units (e.g. a perplexity increase of 0.02 = 2 %)."""
    return lambda idx: candidate(idx) / baseline(idx) - 1.0
