"""Sequential paired evaluation: simulated wrong-decision rates of the confidence sequences stay <= alpha at every
look (and a fixed-n interval looked at every chunk does not), far cases stop early, the full set gives the exact value,
and the Optuna pruner stops exactly the trials whose looks say so."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from debias_plugin.gate.sequential import (BoundedSequence, RatioSequence, bonferroni, bounded_cs, decide,
                                           distance_change, objective_verdict, progress_line, ratio_cs,
                                           record_look, relative_change)
from debias_plugin.gate.stats import Interval, clopper_pearson

ALPHA = 0.05
SIMULATIONS = 2000
WINDOWS = 300  # WikiText-2 scoring windows at 1024 tokens
WINDOW_LOOKS = np.arange(30, WINDOWS + 1, 30) - 1  # after every 10 % of the windows, as the sweep looks
PAIRS = 1508  # CrowS-Pairs
PAIR_LOOKS = np.linspace(PAIRS / 10, PAIRS, 10).round().astype(int) - 1
BUDGET = math.log(1.02)  # perplexity at most +2 % over the base, as a per-token log-likelihood drop
TOLERANCE = 1e-9  # at the full set the interval is the exact value; a rounding-level excess is not a decision


def upper_rate(wrong: np.ndarray) -> float:
    """One-sided 95 % Clopper-Pearson upper bound of a simulated rate."""
    return clopper_pearson(int(wrong.sum()), wrong.size, 0.10).high


def lower_rate(wrong: np.ndarray) -> float:
    return clopper_pearson(int(wrong.sum()), wrong.size, 0.10).low


def windows(relative: float, seed: int, spread: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """SIMULATIONS shuffled populations of (ll_base - ll_candidate, tokens) per window whose full-set perplexity
    ratio is exactly `relative`: 80 % full windows, short ones at article ends; per-token drops with t(3) tails,
    noisier in short windows."""
    rng = np.random.default_rng(seed)
    shape = (SIMULATIONS, WINDOWS)
    tokens = np.where(rng.random(shape) < 0.8, 1024.0, rng.integers(100, 1024, shape).astype(float))
    per_token = spread * rng.standard_t(3, shape) / math.sqrt(3) * np.sqrt(1024 / tokens)
    drops = (per_token - (per_token * tokens).sum(1, keepdims=True) / tokens.sum(1, keepdims=True)
             + math.log(relative)) * tokens
    order = np.argsort(rng.random(shape), axis=1)
    return np.take_along_axis(drops, order, 1), np.take_along_axis(tokens, order, 1)


def pair_differences(gained: int, lost: int, seed: int) -> np.ndarray:
    """SIMULATIONS random orders of candidate-minus-base CrowS outcomes: `gained` +1, `lost` -1, the rest 0."""
    population = np.zeros(PAIRS)
    population[:gained], population[gained:gained + lost] = 1, -1
    order = np.argsort(np.random.default_rng(seed).random((SIMULATIONS, PAIRS)), axis=1)
    return population[order]


def wrong_and_used(low, high, truth, limit, looks, total):
    """Per simulation: a wrong decision at any look, and the share of documents scored when it first decided."""
    low, high = low[:, looks], high[:, looks]
    holds = truth <= limit
    wrong = (low > limit + TOLERANCE).any(1) if holds else (high <= limit - TOLERANCE).any(1)
    decided = (low > limit + TOLERANCE) | (high <= limit - TOLERANCE)
    first = np.where(decided.any(1), decided.argmax(1), len(looks) - 1)
    return wrong, (looks[first] + 1) / total


def fixed_n_interval(drops, tokens, step):
    """The usual (1 - alpha) t interval for the ratio at one sample size, finite-population corrected."""
    from scipy.stats import t as student

    n = step + 1
    ratio = drops[:, :n].sum(1) / tokens[:, :n].sum(1)
    residuals = drops[:, :n] - ratio[:, None] * tokens[:, :n]
    error = residuals.std(1, ddof=1) / math.sqrt(n) / tokens[:, :n].mean(1) * math.sqrt(1 - n / WINDOWS)
    quantile = student.ppf(1 - ALPHA / 2, n - 1)
    return ratio - quantile * error, ratio + quantile * error


# --- perplexity budget: per-window log-likelihood differences (unbounded, asymptotic CS) -----------------------


@pytest.mark.parametrize("relative, seed", [(1.02, 1), (1.015, 2), (1.025, 3)],
                         ids=["at the budget", "just inside", "just outside"])
def test_the_perplexity_decision_is_wrong_at_any_look_at_most_alpha(relative, seed):
    drops, tokens = windows(relative, seed)
    low, high, _ = ratio_cs(drops, tokens, ALPHA, WINDOWS)
    wrong, used = wrong_and_used(low, high, math.log(relative), BUDGET, WINDOW_LOOKS, WINDOWS)
    print(f"\nperplexity x{relative}: wrong {wrong.mean():.4f} (95 % upper {upper_rate(wrong):.4f}), "
          f"mean share of windows {used.mean():.3f}")
    assert upper_rate(wrong) <= ALPHA
    if relative != 1.02:
        assert used.mean() < 0.6  # 0.5 % from the budget is mostly decided on part of the windows


@pytest.mark.parametrize("relative, seed", [(1.10, 4), (1.0, 5)], ids=["far over", "no change"])
def test_far_cases_are_decided_at_the_first_looks(relative, seed):
    drops, tokens = windows(relative, seed)
    low, high, _ = ratio_cs(drops, tokens, ALPHA, WINDOWS)
    wrong, used = wrong_and_used(low, high, math.log(relative), BUDGET, WINDOW_LOOKS, WINDOWS)
    print(f"\nperplexity x{relative}: wrong {wrong.mean():.4f}, mean share of windows {used.mean():.3f}")
    assert wrong.sum() == 0 and used.mean() <= 0.15


def test_a_fixed_n_interval_looked_at_after_every_chunk_exceeds_alpha():
    """The same simulation at the budget, decided by the usual interval at each look: wrong far more than alpha."""
    drops, tokens = windows(1.02, 1)
    low, high = np.full(drops.shape, -np.inf), np.full(drops.shape, np.inf)
    for step in WINDOW_LOOKS[:-1]:  # the last look is the full set, where any interval is exact
        low[:, step], high[:, step] = fixed_n_interval(drops, tokens, step)
    wrong, _ = wrong_and_used(low, high, BUDGET, BUDGET, WINDOW_LOOKS, WINDOWS)
    single, _ = wrong_and_used(low, high, BUDGET, BUDGET, WINDOW_LOOKS[4:5], WINDOWS)
    print(f"\nfixed-n interval at every look: wrong {wrong.mean():.4f} (95 % lower {lower_rate(wrong):.4f}); "
          f"at one look {single.mean():.4f}")
    assert lower_rate(wrong) > ALPHA
    assert upper_rate(single) <= ALPHA  # one look alone is fine: the repeated looks are what breaks it


def test_the_interval_contains_the_value_and_is_exact_at_the_full_set():
    drops, tokens = windows(1.03, 6)
    drops, tokens = drops[0], tokens[0]
    exact = math.expm1(drops.sum() / tokens.sum())
    sequence = RatioSequence(ALPHA, population=WINDOWS)
    for start in range(0, WINDOWS, 30):
        interval = relative_change(sequence.update(drops[start:start + 30], tokens[start:start + 30]))
        assert interval.low - TOLERANCE <= exact <= interval.high + TOLERANCE
        low, high, _ = ratio_cs(drops[:start + 30], tokens[:start + 30], ALPHA, WINDOWS)
        assert (interval.low, interval.high) == (math.expm1(low[-1]), math.expm1(high[-1]))  # chunks = one pass
    assert interval.low == pytest.approx(exact, abs=1e-12) and interval.high == pytest.approx(exact, abs=1e-12)
    assert sequence.fraction == 1.0 and math.expm1(sequence.estimate) == pytest.approx(exact)


def test_without_replacement_is_narrower_than_with_it():
    drops, tokens = windows(1.03, 7)
    for population in (WINDOWS, None):
        low, high, _ = ratio_cs(drops, tokens, ALPHA, population)
        width = np.median(high[:, WINDOW_LOOKS[-2]] - low[:, WINDOW_LOOKS[-2]])
        if population:
            finite = width
    assert finite < 0.8 * width


# --- CrowS pairs: bounded paired outcomes (empirical-Bernstein CS) and the objective against an incumbent ------


@pytest.mark.parametrize("gained, lost, seed", [(150, 150, 8), (200, 50, 9)], ids=["no change", "far worse"])
def test_paired_outcome_decisions(gained, lost, seed):
    differences = pair_differences(gained, lost, seed)
    low, high, _ = bounded_cs(differences, ALPHA, PAIRS, bounds=(-1, 1))
    wrong, used = wrong_and_used(low, high, (gained - lost) / PAIRS, 0.0, PAIR_LOOKS, PAIRS)
    print(f"\nCrowS +{gained}/-{lost}: wrong {wrong.mean():.4f} (95 % upper {upper_rate(wrong):.4f}), "
          f"mean share of pairs {used.mean():.3f}")
    assert upper_rate(wrong) <= ALPHA
    if gained - lost > 100:
        assert used.mean() < 0.3


def test_the_bounded_interval_is_exact_at_the_full_set_and_checks_its_input():
    differences = pair_differences(120, 80, 10)[0]
    sequence = BoundedSequence(ALPHA, population=PAIRS, bounds=(-1, 1))
    for start in range(0, PAIRS, 151):
        interval = sequence.update(differences[start:start + 151])
        assert interval.low - TOLERANCE <= 40 / PAIRS <= interval.high + TOLERANCE
    assert interval.low == interval.high == pytest.approx(40 / PAIRS)
    with pytest.raises(ValueError, match="outside the bounds"):
        BoundedSequence(ALPHA, PAIRS, bounds=(-1, 1)).update([0, 2])
    with pytest.raises(ValueError, match="population of 2"):
        BoundedSequence(ALPHA, 2).update([0, 1, 1])
    with pytest.raises(ValueError, match="equal length"):
        RatioSequence(ALPHA).update([0.1, 0.2], [1024.0])


def test_the_candidate_is_dominated_only_when_surely_farther_from_half():
    """Incumbent fully scored (905 of 1508 pairs stereotyped, exact); the candidate paired with it on the same pairs,
    once exactly as far from 50 % on the other side (603 of 1508) and once far worse (70 %)."""
    incumbent = Interval(905 / PAIRS, 905 / PAIRS, 1.0, "exact")
    for gained, lost in ((0, 302), (150, 0)):
        differences = pair_differences(gained, lost, 11)
        low, high, _ = bounded_cs(differences, ALPHA, PAIRS, bounds=(-1, 1))
        dominated = np.array([[distance_change(Interval(lo, hi, 0.95, ""), incumbent, 0.5).low > TOLERANCE
                               for lo, hi in zip(row_low, row_high)]
                              for row_low, row_high in zip(low[:, PAIR_LOOKS], high[:, PAIR_LOOKS])])
        first = np.where(dominated.any(1), dominated.argmax(1), len(PAIR_LOOKS) - 1)
        used = (PAIR_LOOKS[first] + 1) / PAIRS
        print(f"\nCrowS candidate +{gained}/-{lost} against the incumbent: dominated {dominated.any(1).mean():.4f}, "
              f"mean share of pairs {used.mean():.3f}")
        if lost:
            assert upper_rate(dominated.any(1)) <= ALPHA
        else:
            assert dominated[:, -1].all() and used.mean() < 0.3
    assert objective_verdict(Interval(0.1, 0.2, 0.95, ""), incumbent, 0.5) == "dominated"
    assert objective_verdict(Interval(-0.3, 0.2, 0.95, ""), incumbent, 0.5) == "undecided"


def test_distance_change_bounds_match_a_brute_force_grid():
    rng = np.random.default_rng(12)
    for _ in range(200):
        p_low, d_low = rng.uniform(0.3, 0.7), rng.uniform(-0.3, 0.2)
        incumbent = Interval(p_low, p_low + rng.uniform(0, 0.2), 0.95, "")
        difference = Interval(d_low, d_low + rng.uniform(0, 0.3), 0.95, "")
        p, d = np.meshgrid(np.linspace(incumbent.low, incumbent.high, 201),
                           np.linspace(difference.low, difference.high, 201))
        grid = np.abs(p + d - 0.5) - np.abs(p - 0.5)
        bounds = distance_change(difference, incumbent, 0.5)
        assert bounds.low <= grid.min() + 1e-12 and bounds.high >= grid.max() - 1e-12
        assert bounds.low == pytest.approx(grid.min(), abs=3e-3) and bounds.high == pytest.approx(grid.max(), abs=3e-3)


# --- decisions, text, Optuna --------------------------------------------------------------------------------


def test_decisions_and_the_progress_line():
    interval = Interval(0.026, 0.037, 0.95, "")
    assert decide(interval, 0.02, "below") == "violated"
    assert decide(interval, 0.04, "below") == "holds"
    assert decide(interval, 0.03, "below") == decide(interval, 0.03, "above") == "undecided"
    assert decide(interval, 0.02, "above") == "holds" and decide(interval, 0.04, "above") == "violated"
    assert bonferroni(0.05, 2) == 0.025
    assert progress_line("λ=0.25", "perplexity", 0.031, interval, 0.12, "windows", "violated") == (
        "λ=0.25: perplexity +3.1 % [+2.6, +3.7] after 12 % of windows → over budget")
    assert relative_change(Interval(0.0, math.log(1.02), 0.95, "")).high == pytest.approx(0.02)


def test_the_pruner_stops_a_violated_or_dominated_trial_and_not_an_undecided_one():
    import optuna

    from debias_plugin.gate.sequential import SequentialPruner
    from debias_plugin.sweep.storage import quiet_optuna

    def objective(trial):
        verdict = trial.suggest_categorical("verdict", ["violated", "dominated", "undecided"])
        for step in range(3):
            record_look(trial, step, 0.01 * step, {"perplexity": verdict if step == 1 else "undecided"},
                        fraction=(step + 1) / 3, intervals={"perplexity": Interval(0.0, 0.1, 0.95, "")})
            if trial.should_prune():
                raise optuna.TrialPruned()
        return 1.0

    with quiet_optuna():
        study = optuna.create_study(pruner=SequentialPruner())
        for verdict in ("violated", "dominated", "undecided"):
            study.enqueue_trial({"verdict": verdict})
        study.optimize(objective, n_trials=3)
    states = {trial.params["verdict"]: trial for trial in study.trials}
    assert states["violated"].state == states["dominated"].state == optuna.trial.TrialState.PRUNED
    assert states["violated"].intermediate_values == {0: 0.0, 1: 0.01}
    assert states["violated"].user_attrs["sequential.1"] == {
        "fraction": 2 / 3, "verdicts": {"perplexity": "violated"}, "intervals": {"perplexity": [0.0, 0.1]}}
    assert states["undecided"].state == optuna.trial.TrialState.COMPLETE
    assert isinstance(SequentialPruner(), optuna.pruners.BasePruner)


def test_importing_the_module_does_not_import_optuna():
    code = "import sys, debias_plugin.gate.sequential; sys.exit('optuna' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
