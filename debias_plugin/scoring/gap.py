"""Gap metrics: the distance of a "50 = no preference" percentage from 50, so that lower is plainly better."""

from __future__ import annotations

from collections.abc import Iterable

from debias_plugin.data import STEREOSET_DOMAINS

NO_PREFERENCE = 50.0  # CrowS pct_stereotype and StereoSet SS: neither the stereotype nor its counterpart preferred
# Each gap metric our tasks report and the percentage it is the gap of (their specs' gap_of comes from here).
GAP_SOURCES = {"stereotype_gap": "pct_stereotype",
               **{f"ss_gap{suffix}": f"ss{suffix}" for suffix in ("", *(f"_{d}" for d in STEREOSET_DOMAINS))}}


def gap(percentage, center: float = NO_PREFERENCE):
    """|percentage - 50| (or another center): 0 is no preference, 50 always one side; NaN stays NaN; arrays work."""
    return abs(percentage - center)


def type_mean_gap(percentages: Iterable[float]) -> float:
    """The mean gap over per-type percentages: one type's 50 cannot hide another's lean as a mean percentage can."""
    gaps = [gap(percentage) for percentage in percentages]
    if not gaps:
        raise ValueError("type_mean_gap needs at least one percentage")
    return sum(gaps) / len(gaps)


def gap_source(metric: str) -> str | None:
    """The percentage a gap metric is computed from (stereotype_gap -> pct_stereotype); None for other metrics."""
    return GAP_SOURCES.get(metric.split(",")[0])


def gap_interval(low: float, high: float, center: float = NO_PREFERENCE) -> tuple[float, float]:
    """The gaps of every percentage in [low, high]: a percentage's interval maps to this interval for its gap."""
    lowest = 0.0 if low <= center <= high else min(gap(low, center), gap(high, center))
    return lowest, max(gap(low, center), gap(high, center))
