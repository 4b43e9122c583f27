"""Budget search: bisection for the knob value closest to the bias target that keeps the quality budget; and
the several-knob search, Optuna's sampler replayed over the recorded results.

Assumptions (checked, and reported when an observation contradicts them): over [low, high] the signed bias
metric moves monotonically towards (and possibly past) the target, and the budget metric gets monotonically worse.
Then "go further" (feasible and still on the starting side of the target) holds on an interval [low, t) and the
best setting sits at t: either the budget boundary or the parity crossing. Bisection on that predicate halves the
bracket with every evaluation, so width w needs ceil(log2(w / tolerance)) midpoints after the two ends.

The search is stateless: `next_step` replays the deterministic sequence of proposals against the observations
made so far (from any process, in any order) and returns the first one not yet observed, so a killed or shared
search resumes from its Optuna study alone.
"""

from __future__ import annotations

import math
from itertools import pairwise
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Observation:
    """One evaluated knob value: the signed bias metric and whether every budget rule holds."""

    value: float
    feasible: bool


@dataclass(frozen=True)
class SearchResult:
    """Where the search stands: the next value to evaluate (None when done) and what it found so far."""

    proposal: float | None
    low: float  # bracket: "go further" holds at low ...
    high: float  # ... and fails at high (or high is the end of the range)
    best: float | None  # feasible observed value closest to the target (None: nothing feasible)
    reason: str
    evaluations: int  # distinct knob values the search has used
    violations: list[str] = field(default_factory=list)


def default_tolerance(low: float, high: float, max_evaluations: int) -> float:
    """The bracket width bisection reaches with max_evaluations (the two ends plus the midpoints)."""
    return (high - low) / 2 ** max(max_evaluations - 2, 0)


def _key(x: float) -> float:
    return float(f"{x:.12g}")  # midpoints of decimal ends are printed and stored; compare them rounded


def next_step(low: float, high: float, observations: Mapping[float, Observation], *, target: float = 50.0,
              tolerance: float | None = None, max_evaluations: int = 8, integer: bool = False) -> SearchResult:
    """The next knob value to evaluate for a bias target subject to the budget, or the result once done."""
    if not low < high:
        raise ValueError(f"the search range needs low < high, got [{low}, {high}]")
    tolerance = default_tolerance(low, high, max_evaluations) if tolerance is None else tolerance
    if integer:
        tolerance = max(tolerance, 1.0)
    seen = {_key(x): obs for x, obs in observations.items()}
    used: list[float] = []

    def look(x: float) -> Observation | None:
        x = _key(x)
        if x in seen and x not in used:
            used.append(x)
        return seen.get(x)

    def finish(proposal, a, b, reason):
        best = _closest(used, seen, target)
        return SearchResult(proposal, a, b, best, reason, len(used), _violations(used, seen, target, low))

    start = look(low)
    if start is None:
        return finish(low, low, high, "evaluating the low end")
    if not start.feasible:
        return finish(None, low, low, "the low end already breaks the budget: nothing in range is feasible")
    side = math.copysign(1.0, start.value - target)
    if start.value == target:
        return finish(None, low, low, "the low end is already at the target")

    def further(obs: Observation) -> bool:
        return obs.feasible and math.copysign(1.0, obs.value - target) == side and obs.value != target

    end = look(high)
    if end is None:
        return finish(high, low, high, "evaluating the high end")
    if further(end):
        return finish(None, high, high, "the high end keeps the budget and has not reached the target")
    a, b = low, high
    while b - a > tolerance:
        if len(used) >= max_evaluations:
            return finish(None, a, b, f"stopped after max_evaluations = {max_evaluations}")
        m = (a + b) / 2
        if integer:
            m = float(math.floor(m))
            if m <= a:
                break
        obs = look(m)
        if obs is None:
            return finish(_key(m), a, b, "bisecting")
        if further(obs):
            a = m
        else:
            b = m
    stop = seen[_key(b)]
    what = "the budget boundary" if not stop.feasible else "the target crossing"
    return finish(None, a, b, f"{what} lies in ({a:.6g}, {b:.6g}] (width {b - a:.3g} <= tolerance {tolerance:.3g})")


def _closest(used: list[float], seen: Mapping[float, Observation], target: float) -> float | None:
    return min((x for x in used if seen[x].feasible), key=lambda x: (abs(seen[x].value - target), x), default=None)


def _violations(used: list[float], seen: Mapping[float, Observation], target: float, low: float) -> list[str]:
    """Observations that contradict the monotonicity the bisection relies on (the result may then be local)."""
    problems = []
    ordered = sorted(used)
    for left, right in pairwise(ordered):
        if not seen[left].feasible and seen[right].feasible:
            problems.append(f"the budget holds at {right:g} but not at the smaller {left:g}")
    start = seen.get(_key(low))
    if start is not None:
        side = math.copysign(1.0, start.value - target)
        for left, right in pairwise(ordered):
            if side * (seen[right].value - seen[left].value) > 0:
                problems.append(f"the bias metric moves away from the target between {left:g} and {right:g}")
    return problems


def run_search(evaluate: Callable[[float], Observation], low: float, high: float, **options) -> SearchResult:
    """Drive next_step with a function (tests, synthetic objectives): evaluate until the search is done."""
    observations: dict[float, Observation] = {}
    while True:
        result = next_step(low, high, observations, **options)
        if result.proposal is None:
            return result
        observations[result.proposal] = evaluate(result.proposal)


# ------------------------------------------------------------------------------------------ several knobs

@dataclass(frozen=True)
class Sampled:
    """Where a sampled search stands: every proposal so far (the trial budget counts them), those of the current
    batch without a result yet, and whether the budget of trials is spent."""

    proposals: list[dict]
    pending: list[dict]
    finished: bool


def make_sampler(sampling, objectives: int):
    """TPE or GP on |objective - target| under the budget constraints, or NSGA-II on it and the budget metrics;
    seeded, startup (random) trials as the sweep says. The samplers read each trial's constraints (Optuna 5's
    `Trial.set_constraint`, one per budget rule, <= 0 where it holds)."""
    import optuna

    if sampling.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(2, sampling.batch_size), seed=sampling.seed)
    if sampling.sampler == "gp":
        return optuna.samplers.GPSampler(seed=sampling.seed, n_startup_trials=sampling.startup_trials,
                                         deterministic_objective=True)
    return optuna.samplers.TPESampler(seed=sampling.seed, n_startup_trials=sampling.startup_trials,
                                      multivariate=True)


@dataclass(frozen=True)
class Stopped:
    """A sampled setting whose sequential screen stopped it: its last look, told to the sampler as Optuna's pruned
    trial (TPE ranks pruned trials below the complete ones; GP and NSGA-II read complete trials only)."""

    step: int
    value: float


def sample_step(sampling, distributions: dict, results: Mapping[str, tuple | Stopped | None],
                key_of: Callable[[dict], str], directions: list[str]) -> Sampled:
    """Replay the seeded sampler over an in-memory study from the first trial: ask a batch, tell it the recorded
    results of its settings (key_of(params) -> results[key] = (values, constraints), a Stopped screen, None for a
    failed point), until a batch has settings without results or the trials are spent. constraints: {budget
    metric: value}.

    Each batch is proposed from the batches before it only, so the proposals are the same in every process and
    after any resume, whichever workers evaluated which point and in what order (the sampler is stateless, like
    next_step); a batch's settings can be evaluated at the same time by several workers."""
    import warnings

    import optuna

    objectives = len(directions) if sampling.sampler == "nsga2" else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(directions=directions[:objectives], sampler=make_sampler(sampling, objectives))
        proposals: list[dict] = []
        while len(proposals) < sampling.trials:
            batch = [study.ask(distributions) for _ in range(min(sampling.batch_size, sampling.trials - len(proposals)))]
            settings = [{name: _key(value) if isinstance(value := trial.params[name], float) else value
                         for name in distributions} for trial in batch]  # 0.75, not a step's 0.7500000000000001
            proposals += settings
            missing = {key_of(params): params for params in settings if key_of(params) not in results}
            if missing:
                return Sampled(proposals, list(missing.values()), False)
            for trial, params in zip(batch, settings):
                outcome = results[key_of(params)]
                if outcome is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
                if isinstance(outcome, Stopped):
                    if objectives == 1:  # Optuna keeps intermediate values of single-objective trials only
                        trial.report(outcome.value, outcome.step)
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    continue
                values, constraints = outcome
                for name, value in constraints.items():
                    trial.set_constraint(name, value)
                study.tell(trial, list(values)[:objectives])
    return Sampled(proposals, [], True)
