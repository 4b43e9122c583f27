"""The summary after lm-eval's tables: exact intervals (checked against scipy), gaps, and readings."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from debias_plugin.summary import summarize


def _results():
    return {"results": {"crows_bias": {"pct_stereotype,none": 60.0},
                        "crows_bias_gender": {"pct_stereotype,none": 60.0, "stereotype_gap,none": 10.0},
                        "crows_bias_age": {"pct_stereotype,none": 30.0},
                        "stereoset_bias": {"ss,none": 62.5, "lms,none": 90.0, "icat,none": 67.5},
                        "wikitext2_ppl_quick": {"word_perplexity,none": 31.25, "byte_perplexity,none": 1.8,
                                                "bits_per_byte,none": 0.85}},
            "group_subtasks": {"crows_bias": ["crows_bias_gender", "crows_bias_age"]},
            "n-samples": {"crows_bias_gender": {"original": 200, "effective": 200},
                          "crows_bias_age": {"original": 10, "effective": 10},
                          "stereoset_bias": {"original": 2106, "effective": 2106},
                          "wikitext2_ppl_quick": {"original": 6, "effective": 6}}}


def _row(text, task):
    return next(line.split() for line in text.splitlines() if line.strip().startswith(task + " "))


def test_crows_rows_carry_the_exact_binomial_interval_and_the_gap():
    text = summarize(_results())
    gender = _row(text, "crows_bias_gender")
    ci = binomtest(120, 200).proportion_ci(confidence_level=0.95, method="exact")
    assert gender[1:3] == ["200", "60.0"]
    assert gender[3:5] == [f"[{100 * ci.low:.1f},", f"{100 * ci.high:.1f}]"]
    assert gender[5] == "10.0" and " ".join(gender[6:]) == "prefers the stereotype"
    age = _row(text, "crows_bias_age")  # 3 of 10: the interval holds 50
    assert age[1] == "10" and " ".join(age[6:]) == "no significant preference"
    assert _row(text, "crows_bias")[1] == "210"  # a group's size is the sum of its tasks'


def test_stereoset_and_perplexity_rows():
    text = summarize(_results())
    assert _row(text, "stereoset_bias")[1:] == ["2106", "62.5", "12.5", "90.0", "67.5"]
    assert _row(text, "wikitext2_ppl_quick")[1:] == ["6", "31.250", "1.8000", "0.8500"]


@pytest.mark.parametrize("results", [{"results": {"other": {"acc,none": 0.5}}}, {}])
def test_nothing_to_summarise_is_empty(results):
    assert summarize(results) == ""


def test_per_type_line_under_the_crows_table_with_the_noise_floor():
    from debias_plugin.scoring.crows import noise_floor

    text = summarize(_results())  # gender 60.0 of 200, age 30.0 of 10: gaps 10 and 20
    mean_floor, worst_floor = noise_floor([200, 10])
    line = next(line for line in text.splitlines() if line.strip().startswith("per type:"))
    assert line.strip() == (f"per type: type-mean gap 15.00 (noise floor {mean_floor:.2f}), worst-type gap 20.00 "
                            f"(noise floor {worst_floor:.2f})")
    assert text.splitlines().index(line) == text.splitlines().index(_line(text, "crows_bias_age")) + 1


def test_per_type_line_has_stratified_intervals_with_per_pair_samples():
    import numpy as np

    from debias_plugin.gate import stats

    results = _results()
    gender, age = [1] * 120 + [0] * 80, [1] * 3 + [0] * 7
    results["samples"] = {task: [{"doc_id": i, "filter": "none", "pct_stereotype": 100.0 * o}
                                 for i, o in enumerate(outcomes)]
                          for task, outcomes in (("crows_bias_gender", gender), ("crows_bias_age", age))}
    line = next(line for line in summarize(results).splitlines() if "per type:" in line)
    strata = np.array([1] * 200 + [0] * 10)  # pooled in CROWS_TYPE_TASKS order, labelled alphabetically
    outcomes = np.array(gender + age, float)
    for worst, label in ((False, "type-mean gap"), (True, "worst-type gap")):
        boot = stats.stratified_bootstrap(stats.type_gap_statistic(outcomes, strata, worst), strata, 0.05)
        assert f"{label} {boot.estimate:.2f} [{boot.interval.low:.2f}, {boot.interval.high:.2f}]" in line


def _line(text, task):
    return next(line for line in text.splitlines() if line.strip().startswith(task + " "))
