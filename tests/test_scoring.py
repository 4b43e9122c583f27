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
