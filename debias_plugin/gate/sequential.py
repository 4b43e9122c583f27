"""Anytime-valid decisions on paired evaluations that grow chunk by chunk: confidence sequences, verdicts, a pruner.

A candidate and its base are scored on the same documents, taken in one fixed seeded (uniformly random) order, so
the documents seen after t steps are a simple random sample *without replacement* from the N of the full set, and
the target is the full-set value. A confidence sequence (CS) holds for every t at once: P(some look excludes the
full-set value) <= alpha however often it is looked at, so a point may stop at the first decided look.

    cs = RatioSequence(alpha=0.05, population=len(windows))
    interval = relative_change(cs.update(ll_base - ll_candidate, tokens))    # after every chunk
    decide(interval, 0.02, "below")                                          # "holds" | "violated" | "undecided"

Every interval is two-sided at 1 - alpha, so one CS serves both wrong decisions (a false "violated" and a false
"holds"). Several constraints and the objective share alpha by Bonferroni: each gets `bonferroni(alpha, k)`.
At t = N the full set has been seen and every interval is the exact full-set value.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Literal

import numpy as np

from debias_plugin.gate.stats import Interval, Side
from debias_plugin.scoring.gap import gap

Verdict = Literal["holds", "violated", "dominated", "undecided"]
STOP: tuple[Verdict, ...] = ("violated", "dominated")  # verdicts after which a point's evaluation ends
ATTR = "sequential"  # trial user attribute prefix: "sequential.<step>" holds that chunk's look
RATIO_METHOD = "asymptotic normal-mixture CS of a ratio, without replacement"
MIN_RATIO_COUNT = 10  # the normal approximation needs a few observations: no bound before that
BOUNDED_METHOD = "predictable-mixture empirical-Bernstein CS, without replacement"
VERDICT_TEXT = {"holds": "within budget", "violated": "over budget", "dominated": "dominated",
                 "undecided": "undecided"}


# --- confidence sequences as pure functions over the last axis (vectorized for simulation) ----------------------


def _without_replacement(x: np.ndarray, population: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per step i: x_i + S_{i-1}/(N-i+1) and 1 + (i-1)/(N-i+1), the terms of the without-replacement martingale
    (Waudby-Smith & Ramdas 2020, "Confidence sequences for sampling without replacement", Sec. 3)."""
    steps = np.arange(1, x.shape[-1] + 1)
    if population is None:
        return x, np.ones_like(x)
    left = population - steps + 1.0
    before = np.cumsum(x, axis=-1) - x
    return x + before / left, np.broadcast_to(1.0 + (steps - 1) / left, x.shape)


def _check(count: int, population: int | None) -> None:
    if population is not None and count > population:
        raise ValueError(f"{count} observations from a population of {population}")


def ratio_cs(differences, weights, alpha: float, population: int | None = None, horizon: float | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Running (low, high, estimate) for sum(d)/sum(w) over the full set, per step (last axis).

    Asymptotic CS (Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas 2021, "Time-uniform central limit theory and
    asymptotic confidence sequences", Thm 2.2) with the two-sided normal-mixture boundary (Howard, Ramdas,
    McAuliffe & Sekhon 2021, eq. (14)), inverted as a Fieller set: m is kept while the without-replacement sum of
    z_i(m) = d_i - m w_i satisfies |sum| <= c_t sigma_hat_t(m), a quadratic in m. `horizon`: the step the width is
    tuned for (default N/4, or 100 without N). (-inf, inf) before MIN_RATIO_COUNT observations.
    """
    d, w = np.asarray(differences, float), np.asarray(weights, float)
    count = d.shape[-1]
    _check(count, population)
    steps = np.arange(1, count + 1)
    a_sum = np.cumsum(_without_replacement(d, population)[0], axis=-1)
    b_sum = np.cumsum(_without_replacement(w, population)[0], axis=-1)
    # Running sample (co)variances of (d, w); shifted by the first observation against cancellation.
    dc, wc = d - d[..., :1], w - w[..., :1]
    n_1 = np.maximum(steps - 1, 1)
    mean_d, mean_w = np.cumsum(dc, axis=-1) / steps, np.cumsum(wc, axis=-1) / steps
    s_dd = np.maximum(np.cumsum(dc * dc, axis=-1) - steps * mean_d ** 2, 0) / n_1
    s_ww = np.maximum(np.cumsum(wc * wc, axis=-1) - steps * mean_w ** 2, 0) / n_1
    s_dw = (np.cumsum(dc * wc, axis=-1) - steps * mean_d * mean_w) / n_1
    horizon = horizon or (population / 4 if population else 100.0)
    rho = horizon / (-2 * math.log(alpha) + math.log(1 - 2 * math.log(alpha)))
    c2 = (steps + rho) * np.log((steps + rho) / (rho * alpha ** 2))
    quad, half, const = b_sum ** 2 - c2 * s_ww, a_sum * b_sum - c2 * s_dw, a_sum ** 2 - c2 * s_dd
    bounded = (quad > 0) & (steps >= MIN_RATIO_COUNT)
    root = np.sqrt(np.maximum(half ** 2 - quad * const, 0))
    safe = np.where(bounded, quad, 1.0)
    low = np.where(bounded, (half - root) / safe, -np.inf)
    high = np.where(bounded, (half + root) / safe, np.inf)
    estimate = np.cumsum(d, axis=-1) / np.cumsum(w, axis=-1)
    # No running intersection: an asymptotic CS misses mostly at small t, and intersecting would keep those misses.
    return _finish(low, high, estimate, population, intersect=False)


def bounded_cs(values, alpha: float, population: int | None = None, bounds: tuple[float, float] = (0.0, 1.0),
               truncation: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Running (low, high, estimate) for the mean of values in `bounds` over the full set, per step (last axis).

    Predictable-plug-in empirical-Bernstein CS (Waudby-Smith & Ramdas 2023, "Estimating means of bounded random
    variables by betting", Thm 2) in its without-replacement form (Waudby-Smith & Ramdas 2020, "Confidence sequences
    for sampling without replacement", Thm 4), intersected with what the seen values alone imply about the rest.
    """
    lo, hi = bounds
    x = (np.asarray(values, float) - lo) / (hi - lo)
    count = x.shape[-1]
    _check(count, population)
    steps = np.arange(1, count + 1)
    mean = (0.5 + np.cumsum(x, axis=-1)) / (steps + 1)  # regularized running mean and variance (the paper's)
    variance = (0.25 + np.cumsum((x - mean) ** 2, axis=-1)) / (steps + 1)
    mean_before = np.concatenate([np.full(x.shape[:-1] + (1,), 0.5), mean[..., :-1]], axis=-1)
    variance_before = np.concatenate([np.full(x.shape[:-1] + (1,), 0.25), variance[..., :-1]], axis=-1)
    log_term = math.log(2 / alpha)
    bets = np.minimum(np.sqrt(2 * log_term / (variance_before * steps * np.log1p(steps))), truncation)
    psi = -np.log1p(-bets) - bets  # 4 psi_E of the paper, paired with v_i / 4 = (x_i - mean_{i-1})^2
    centred, scale = _without_replacement(x, population)
    denominator = np.cumsum(bets * scale, axis=-1)
    centre = np.cumsum(bets * centred, axis=-1) / denominator
    margin = (log_term + np.cumsum((x - mean_before) ** 2 * psi, axis=-1)) / denominator
    low, high = centre - margin, centre + margin
    if population is not None:  # the unseen values lie in [0, 1]
        seen = np.cumsum(x, axis=-1)
        low, high = np.maximum(low, seen / population), np.minimum(high, (seen + population - steps) / population)
    low, high = np.clip(low, 0, 1), np.clip(high, 0, 1)
    estimate = np.cumsum(x, axis=-1) / steps
    low, high, estimate = _finish(low, high, estimate, population)
    return lo + (hi - lo) * low, lo + (hi - lo) * high, lo + (hi - lo) * estimate


def _finish(low, high, estimate, population, intersect=True):
    """Running intersection (a CS holds at every step at once) and the exact value once the full set is seen."""
    if intersect:
        low, high = np.maximum.accumulate(low, axis=-1), np.minimum.accumulate(high, axis=-1)
    if population is not None and low.shape[-1] == population:
        low[..., -1] = high[..., -1] = estimate[..., -1]
    return low, high, estimate


# --- running confidence sequences, updated chunk by chunk ----------------------------------------------------


class _Sequence:
    def __init__(self, alpha: float, population: int | None = None):
        self.alpha, self.population = alpha, population
        self._columns: list[list[float]] = []
        self.estimate = math.nan  # the running point estimate, set by each update

    @property
    def count(self) -> int:
        return len(self._columns[0]) if self._columns else 0

    @property
    def fraction(self) -> float | None:
        """Share of the full set seen so far (None without a known population)."""
        return self.count / self.population if self.population else None

    def _extend(self, *chunks) -> None:
        arrays = [np.atleast_1d(np.asarray(chunk, float)) for chunk in chunks]
        if len({array.shape for array in arrays}) != 1 or arrays[0].ndim != 1:
            raise ValueError("a chunk's columns must be 1-D and of equal length")
        if not np.all([np.isfinite(array).all() for array in arrays]):
            raise ValueError("a chunk holds a value that is not finite")
        self._columns = self._columns or [[] for _ in arrays]
        for column, array in zip(self._columns, arrays):
            column.extend(array.tolist())
        _check(self.count, self.population)

    def _interval(self, low, high, estimate, method: str) -> Interval:
        self.estimate = float(estimate[-1])
        return Interval(float(low[-1]), float(high[-1]), 1 - self.alpha, method)


class RatioSequence(_Sequence):
    """CS for sum(d)/sum(w) over the full set, e.g. d = ll_base - ll_candidate per window, w = its tokens."""

    def __init__(self, alpha: float, population: int | None = None, horizon: float | None = None):
        super().__init__(alpha, population)
        self.horizon = horizon

    def update(self, differences, weights) -> Interval:
        self._extend(differences, weights)
        return self._interval(*ratio_cs(*self._columns, self.alpha, self.population, self.horizon), RATIO_METHOD)


class BoundedSequence(_Sequence):
    """CS for the mean of bounded values over the full set, e.g. candidate minus base outcome per CrowS pair."""

    def __init__(self, alpha: float, population: int | None = None, bounds: tuple[float, float] = (0.0, 1.0)):
        super().__init__(alpha, population)
        self.bounds = bounds

    def update(self, values) -> Interval:
        if np.any((np.asarray(values) < self.bounds[0]) | (np.asarray(values) > self.bounds[1])):
            raise ValueError(f"a value lies outside the bounds {self.bounds}")
        self._extend(values)
        return self._interval(*bounded_cs(self._columns[0], self.alpha, self.population, self.bounds), BOUNDED_METHOD)


# --- decisions ------------------------------------------------------------------------------------------------


def bonferroni(alpha: float, decisions: int) -> float:
    """Each of k simultaneous decisions at alpha / k: P(any wrong) <= alpha whatever their dependence."""
    return alpha / max(decisions, 1)


def relative_change(log_ratio: Interval) -> Interval:
    """exp(x) - 1 of a mean log ratio: a per-token log-likelihood drop as a relative perplexity change (monotone)."""
    return Interval(math.expm1(log_ratio.low), math.expm1(log_ratio.high), log_ratio.confidence, log_ratio.method)


def decide(interval: Interval, limit: float, side: Side) -> Verdict:
    """A constraint `value <= limit` (side "below") or `>= limit` ("above"): decided once the CS is on one side."""
    if side == "below":
        return "holds" if interval.high <= limit else "violated" if interval.low > limit else "undecided"
    return "holds" if interval.low >= limit else "violated" if interval.high < limit else "undecided"


def distance_change(difference: Interval, incumbent: Interval, center: float) -> Interval:
    """Bounds of |p_i + delta - center| - |p_i - center| over p_i in `incumbent`, delta (candidate - incumbent,
    paired) in `difference`: piecewise linear, so its extremes lie on corners or on its kink lines."""
    deltas = [difference.low, difference.high, center - incumbent.low, center - incumbent.high, 0.0]
    points = [incumbent.low, incumbent.high, center, center - difference.low, center - difference.high]
    grid_p, grid_d = np.meshgrid(np.clip(points, incumbent.low, incumbent.high),
                                 np.clip(deltas, difference.low, difference.high))
    change = gap(grid_p + grid_d, center) - gap(grid_p, center)
    joint = difference.confidence + incumbent.confidence - 1  # Bonferroni: both hold with at least this
    return Interval(float(change.min()), float(change.max()), joint, f"{difference.method}; {incumbent.method}")


def objective_verdict(difference: Interval, incumbent: Interval, center: float) -> Verdict:
    """"dominated" once the candidate is surely farther from `center` (e.g. CrowS 50 %) than the incumbent."""
    return "dominated" if distance_change(difference, incumbent, center).low > 0 else "undecided"


def progress_line(point: str, name: str, estimate: float, interval: Interval, fraction: float, documents: str,
                  verdict: Verdict) -> str:
    """`λ=0.25: perplexity +3.1 % [+2.6, +3.7] after 12 % of windows → over budget` (relative values as percent)."""
    return (f"{point}: {name} {100 * estimate:+.1f} % [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}] "
            f"after {100 * fraction:.0f} % of {documents} → {VERDICT_TEXT[verdict]}")


# --- Optuna: the looks are a trial's intermediate values, the early stop is a pruner ----------------------------


def record_look(trial, step: int, value: float, verdicts: dict[str, Verdict], *, fraction: float,
                intervals: dict[str, Interval] | None = None) -> None:
    """Store a chunk's verdicts as user attribute `sequential.<step>` (read by the pruner), then report its value."""
    trial.set_user_attr(f"{ATTR}.{step}", {
        "fraction": fraction, "verdicts": dict(verdicts),
        "intervals": {name: [i.low, i.high] for name, i in (intervals or {}).items()}})
    trial.report(value, step)


@cache
def _pruner_class():
    import optuna

    class SequentialPruner(optuna.pruners.BasePruner):
        """Prunes a trial once its latest look (`record_look`) holds a stopping verdict: violated or dominated."""

        def prune(self, study, trial) -> bool:
            look = trial.user_attrs.get(f"{ATTR}.{trial.last_step}") if trial.last_step is not None else None
            return bool(look) and any(verdict in STOP for verdict in look["verdicts"].values())

    SequentialPruner.__module__ = __name__
    return SequentialPruner


def __getattr__(name: str):
    """SequentialPruner is built on first use, so importing this module does not import Optuna."""
    if name == "SequentialPruner":
        return _pruner_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
