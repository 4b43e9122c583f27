"""Pure metric functions against hand-worked examples."""

import math

import pytest

from debias_plugin.scoring.crows import mean_of_marked, pct_stereotype
from debias_plugin.scoring.stereoset import ScoredExample, stereoset_scores


def test_crows_ties_are_no_win_but_stay_in_denominator():
    assert pct_stereotype([(-1.0, -2.0), (-3.0, -3.0), (-5.0, -4.0), (-0.5, -0.6)]) == 50.0
    assert math.isnan(pct_stereotype([]))
    assert mean_of_marked([(100.0, True), (0.0, False), (0.0, True)]) == 50.0


def test_stereoset_macro_average_over_targets_with_ties_and_uneven_counts():
    examples = [
        # target "nurse", 3 examples: stereo wins twice (the tie goes to anti); related = 2 + 1 + 0 = 3 of 6
        ScoredExample("nurse", stereotype=-1.0, anti_stereotype=-2.0, unrelated=-3.0),   # pro, related 2
        ScoredExample("nurse", stereotype=-2.0, anti_stereotype=-2.0, unrelated=-2.0),   # tie: anti; related 0
        ScoredExample("nurse", stereotype=-0.5, anti_stereotype=-4.0, unrelated=-3.0),   # pro, related 1
        # target "chess player", 1 example: anti wins; both beat unrelated
        ScoredExample("chess player", stereotype=-3.0, anti_stereotype=-1.0, unrelated=-5.0),
    ]
    scores = stereoset_scores(examples)
    # per target: nurse SS = 2/3*100, LMS = 3/6*100; chess player SS = 0, LMS = 100
    ss = (200 / 3 + 0) / 2
    lms = (50 + 100) / 2
    assert scores.ss == pytest.approx(ss)  # a micro average would give 50
    assert scores.lms == pytest.approx(lms)  # a micro average would give 62.5
    assert scores.icat == pytest.approx(lms * min(ss, 100 - ss) / 50)
    assert scores.count == 4


def test_stereoset_empty_is_nan():
    assert math.isnan(stereoset_scores([]).ss)


def test_icat_is_one_formula_for_scalars_and_arrays():
    import numpy as np

    from debias_plugin.scoring.stereoset import icat

    assert icat(90.0, 50.0) == 90.0 and icat(90.0, 60.0) == icat(90.0, 40.0) == 72.0
    assert list(icat(np.array([90.0, 90.0]), np.array([60.0, 100.0]))) == [72.0, 0.0]


def test_type_mean_gap_is_the_mean_of_each_types_gap():
    from debias_plugin.scoring.gap import type_mean_gap

    assert type_mean_gap([40.0, 60.0]) == 10.0  # the mean percentage (50) would hide both leans
    assert type_mean_gap([50.0, 55.0, 35.0]) == pytest.approx(20 / 3)
    with pytest.raises(ValueError):
        type_mean_gap([])


def test_crows_type_tasks_are_the_bundled_task_files_and_the_groups_members():
    import yaml

    from debias_plugin.data.crows import CROWS_BIAS_TYPES, CROWS_TASK, CROWS_TYPE_TASKS, crows_type_task
    from debias_plugin.paths import tasks_dir

    assert crows_type_task("race-color") == "crows_bias_race_color"
    assert CROWS_TYPE_TASKS == tuple(crows_type_task(t) for t in CROWS_BIAS_TYPES)
    folder = tasks_dir() / CROWS_TASK
    for bias_type, task in zip(CROWS_BIAS_TYPES, CROWS_TYPE_TASKS):
        document = yaml.safe_load((folder / f"{task}.yaml").read_text())
        assert (document["task"], document["dataset_kwargs"]["bias_type"]) == (task, bias_type)
    assert yaml.safe_load((folder / f"{CROWS_TASK}.yaml").read_text())["task"] == list(CROWS_TYPE_TASKS)
