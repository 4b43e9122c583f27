"""The seeded CrowS-Pairs split stratified by bias type (selection / held-out halves) and its lm-eval tasks."""

from __future__ import annotations

from collections import Counter

import pytest

from debias_plugin.data.crows import CROWS_BIAS_TYPES, CROWS_HALVES, crows_split, load_crows_pairs
from debias_plugin.errors import DebiasError
from debias_plugin.paths import tasks_dir


@pytest.fixture(scope="module")
def pairs(data_dir):
    return load_crows_pairs()


def _ids(halves):
    return {half: [pair.index for pair in halves[half]] for half in CROWS_HALVES}


def test_each_type_is_halved_disjointly_and_covers_every_pair(pairs):
    halves = crows_split(pairs, seed=0)
    ids = _ids(halves)
    assert not set(ids["selection"]) & set(ids["heldout"])
    assert sorted(ids["selection"] + ids["heldout"]) == sorted(pair.index for pair in pairs)
    assert (len(pairs), len(ids["selection"]), len(ids["heldout"])) == (1508, 755, 753)
    counts = {half: Counter(pair.bias_type for pair in halves[half]) for half in CROWS_HALVES}
    for bias_type in CROWS_BIAS_TYPES:
        assert abs(counts["selection"][bias_type] - counts["heldout"][bias_type]) <= 1, bias_type


def test_the_split_is_stable_and_changes_with_the_seed(pairs):
    assert _ids(crows_split(pairs, seed=0)) == _ids(crows_split(list(pairs), seed=0))
    assert _ids(crows_split(pairs, seed=1)) != _ids(crows_split(pairs, seed=0))
    quarter = crows_split(pairs, seed=0, fraction=0.25)
    assert len(quarter["selection"]) == sum(round(0.25 * n) for n in Counter(p.bias_type for p in pairs).values())
    with pytest.raises(DebiasError, match="fraction"):
        crows_split(pairs, fraction=1.0)


def test_the_committed_seed0_ids_are_the_split(pairs):
    """tasks/crows_bias/split_seed0.txt lets anyone check the halves without running the code."""
    halves = crows_split(pairs, seed=0)
    written = {}
    for line in (tasks_dir() / "crows_bias" / "split_seed0.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        head, _, ids = line.partition(": ")
        bias_type, half, count = head.split()
        written[bias_type, half] = [int(i) for i in ids.split()]
        assert len(written[bias_type, half]) == int(count)
    assert written == {(t, h): [p.index for p in halves[h] if p.bias_type == t]
                       for t in CROWS_BIAS_TYPES for h in CROWS_HALVES}


def test_the_half_tasks_load_their_pairs(pairs):
    import importlib.util

    spec = importlib.util.spec_from_file_location("crows_utils", tasks_dir() / "crows_bias" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    halves = crows_split(pairs, seed=0)
    for half in CROWS_HALVES:
        rows = utils.load(split=half, split_seed=0)["test"]
        assert sorted(rows["pair_id"]) == sorted(p.index for p in halves[half])
        gender = utils.load(bias_type="gender", split=half)["test"]
        assert sorted(gender["pair_id"]) == sorted(p.index for p in halves[half] if p.bias_type == "gender")


def test_the_halves_outcomes_are_crows_bias_outcomes(tiny_model):
    """Every pair's outcome on a half's per-type task equals its outcome on crows_bias (all 1,508 pairs)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = str(tiny_model("gpt2"))
    lm = HFLM(pretrained=model, device="cpu", batch_size=64, dtype="float32")
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata={"pretrained": model})
    out = lm_eval.simple_evaluate(model=lm, tasks=["crows_bias", "crows_bias_selection", "crows_bias_heldout",
                                                   "crows_bias_overall_selection", "crows_bias_overall_heldout"],
                                  task_manager=manager, log_samples=True, bootstrap_iters=0)
    samples = out["samples"]

    def outcomes(task):
        return {row["doc"]["pair_id"]: row["pct_stereotype"] for row in samples[task]}

    for bias_type in CROWS_BIAS_TYPES:
        leaf = bias_type.replace("-", "_")
        full = outcomes(f"crows_bias_{leaf}")
        selection, heldout = outcomes(f"crows_bias_selection_{leaf}"), outcomes(f"crows_bias_heldout_{leaf}")
        assert abs(len(selection) - len(heldout)) <= 1
        assert not selection.keys() & heldout.keys()
        assert {**selection, **heldout} == full, bias_type
    for half in CROWS_HALVES:
        overall = outcomes(f"crows_bias_overall_{half}")
        per_type = {pair: outcome for t in CROWS_BIAS_TYPES
                    for pair, outcome in outcomes(f"crows_bias_{half}_{t.replace('-', '_')}").items()}
        assert overall == per_type
        results = out["results"][f"crows_bias_overall_{half}"]
        assert results["pct_stereotype,none"] == pytest.approx(sum(overall.values()) / len(overall))
        assert {"type_mean_gap,none", "worst_type_gap,none"} <= results.keys()
