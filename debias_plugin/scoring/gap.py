"""Gap metrics: the distance of a "50 = no preference" percentage from 50, so that lower is plainly better."""

from __future__ import annotations

from collections.abc import Iterable

NO_PREFERENCE = 50.0  # CrowS pct_stereotype and StereoSet SS: neither the stereotype nor its counterpart preferred


def gap(percentage: float) -> float:
    """|percentage - 50|: 0 is no preference, 50 always the same side (either side); NaN stays NaN."""
    return abs(percentage - NO_PREFERENCE)


def type_mean_gap(percentages: Iterable[float]) -> float:
    """The mean gap over per-type percentages: one type's 50 cannot hide another's lean as a mean percentage can."""
    gaps = [gap(percentage) for percentage in percentages]
    if not gaps:
        raise ValueError("type_mean_gap needs at least one percentage")
    return sum(gaps) / len(gaps)


def gap_source(metric: str) -> str | None:
    """The percentage a gap metric is computed from (stereotype_gap -> pct_stereotype, ss_gap_race -> ss_race)."""
    name = metric.split(",")[0]
    if name == "stereotype_gap":
        return "pct_stereotype"
    if name == "ss_gap" or name.startswith("ss_gap_"):
        return "ss" + name[len("ss_gap"):]
    return None


def gap_interval(low: float, high: float) -> tuple[float, float]:
    """The gaps of every percentage in [low, high]: a percentage's interval maps to this interval for its gap."""
    lowest = 0.0 if low <= NO_PREFERENCE <= high else min(gap(low), gap(high))
    return lowest, max(gap(low), gap(high))
