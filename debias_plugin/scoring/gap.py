"""Gap metrics: the distance of a "50 = no preference" percentage from 50, so that lower is plainly better."""

from __future__ import annotations

from collections.abc import Iterable

NO_PREFERENCE = 50.0  # CrowS pct_stereotype and StereoSet SS: neither the stereotype nor its counterpart preferred


def gap(percentage, center: float = NO_PREFERENCE):
    """|percentage - 50| (or another center): 0 is no preference, 50 always the same side; NaN stays NaN; arrays work."""
    return abs(percentage - center)


def type_mean_gap(percentages: Iterable[float]) -> float:
    """The mean gap over per-type percentages: one type's 50 cannot hide another's lean as a mean percentage can."""
    gaps = [gap(percentage) for percentage in percentages]
    if not gaps:
        raise ValueError("type_mean_gap needs at least one percentage")
    return sum(gaps) / len(gaps)


def gap_source(metric: str) -> str | None:
    """The percentage a gap metric is computed from (stereotype_gap -> pct_stereotype), as its spec declares."""
    from debias_plugin.scoring.specs import find_spec

    found = find_spec(metric)
    return found.gap_of if found else None


def gap_interval(low: float, high: float, center: float = NO_PREFERENCE) -> tuple[float, float]:
    """The gaps of every percentage in [low, high]: a percentage's interval maps to this interval for its gap."""
    lowest = 0.0 if low <= center <= high else min(gap(low, center), gap(high, center))
    return lowest, max(gap(low, center), gap(high, center))
