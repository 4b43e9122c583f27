"""`debias sweep`: the sweep file, the budget search, and whole sweeps on a tiny GPT-2 (negation of a perturbed copy).

The end-to-end sweeps share one evaluation cache (models are evaluated once per content), so the kill/rerun and
two-process runs re-evaluate only what they rebuild. Every number the report shows is checked against its
definition here: lm-eval run directly, the Clopper-Pearson interval from scipy, the Pareto front and the choice
by brute force, the negated weights by their formula.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import perturbed_copy

from debias_plugin.sweep.plan import load_sweep
from debias_plugin.sweep.schema import SweepFileError
from debias_plugin.sweep.search import Observation, run_search

BUDGET = 0.05
LIMIT = 8
GRID_SWEEP = """\
base: {base}
method: negate
fixed: {{biased: {biased}, adapter: null}}
grid: {{lambda: [0.25, 0.5, 1.0]}}
evaluate: [crows_bias_gender, wikitext2_ppl, stereoset_bias]
objective: crows_bias_gender/pct_stereotype
budget: {{wikitext2_ppl/word_perplexity: {{max_relative_increase: {budget}}}}}
limit: {limit}
resamples: 200
evaluation: full
"""
SEARCH_SWEEP = """\
base: {base}
method: negate
fixed: {{biased: {biased}}}
search: {{lambda: [0, 1]}}
max_evaluations: 4
evaluate: [crows_bias_gender, wikitext2_ppl]
objective: crows_bias_gender/pct_stereotype
budget: {{wikitext2_ppl/word_perplexity: {{max_relative_increase: {budget}}}}}
limit: {limit}
resamples: 200
evaluation: full
"""


def _debias_command(*args) -> list[str]:
    return [sys.executable, "-c", "from debias_plugin.cli import main; main()", *args]


def _killed_command(at_evaluation: int, *args) -> list[str]:
    """The debias CLI, SIGKILLed at its at_evaluation-th model evaluation (tests/sweep_fault.py)."""
    return [sys.executable, str(Path(__file__).with_name("sweep_fault.py")), str(at_evaluation), *args]


def _deterministic(path: Path) -> dict:
    content = json.loads(path.read_text())
    content.pop("run")
    return content


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One evaluation cache for the module's sweeps (subprocesses inherit it), a short poll interval and a 1 s
    heartbeat (a killed process's claim goes stale after 6 s)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEBIAS_CACHE_DIR", str(tmp_path_factory.mktemp("sweep_cache")))
        patch.setenv("DEBIAS_SWEEP_POLL_SECONDS", "0.5")
        patch.setenv("DEBIAS_SWEEP_HEARTBEAT_SECONDS", "1")
        yield


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """(base, biased): a tiny GPT-2 and a copy with every weight perturbed (the 'bias vector')."""
    base = tiny_model("gpt2")
    return base, perturbed_copy(base, tmp_path_factory.mktemp("sweep_models") / "biased")


def _sweep_file(folder: Path, template: str, models, **extra) -> Path:
    base, biased = models
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yml"
    path.write_text(template.format(base=base, biased=biased, budget=BUDGET, limit=LIMIT, **extra))
    return path


@pytest.fixture(scope="module")
def grid_run(env, models, tmp_path_factory):
    """The 3-point grid, uninterrupted, in-process: (sweep file, output folder)."""
    from debias_plugin.sweep import run_sweep

    folder = tmp_path_factory.mktemp("grid")
    path = _sweep_file(folder, GRID_SWEEP, models)
    return path, run_sweep(path, folder / "out")


# ------------------------------------------------------------------------------------------------ the sweep file

def _load(tmp_path, text: str):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    return load_sweep(path)


VALID = """\
base: /m
method: negate
fixed: {biased: /b}
grid: {lambda: [0.1, 0.2]}
evaluate: [crows_bias, wikitext2_ppl]
objective: crows_bias/pct_stereotype
budget: {wikitext2_ppl/word_perplexity: {max_relative_increase: 0.02}}
"""


@pytest.mark.parametrize("edit, line, field, words", [
    (("budget: {", "budgit: {"), 7, "budgit", "unknown key 'budgit'"),
    (("[0.1, 0.2]", "[0.1, -1]"), 4, "grid.lambda[1]", "lambda must be a number >= 0"),
    (("fixed: {biased: /b}", "fixed: {}"), 3, "fixed", "exactly one of biased"),
    (("fixed: {biased: /b}", "fixed: {biased: /b, capability: /c}"), 3, "fixed", "needs both capability"),
    (("grid: {lambda: [0.1, 0.2]}", "grid: {k: [0.1]}"), 4, "grid.k", "unknown option 'k' of negate; known: adapter, "
     "biased, capability, lambda, lambda_2, lambda_3, lambda_4, lambda_5, lambda_6, method, mu, shard_size, template"),
    (("{max_relative_increase: 0.02}", "{max_relative_increase: 0.02, max: 3}"), 7,
     "budget.wikitext2_ppl/word_perplexity", "exactly one of"),
    (("objective: crows_bias/pct_stereotype", "objective: pct_stereotype"), 6, "objective",
     "expected task/metric, e.g. crows_bias/pct_stereotype (found 'pct_stereotype')"),
    (("budget: {wikitext2_ppl/word_perplexity:", "budget: {word_perplexity:"), 7, "budget.word_perplexity",
     "expected task/metric"),
    (("{max_relative_increase: 0.02}", "{max_relative_incr: 0.02}"), 7,
     "budget.wikitext2_ppl/word_perplexity.max_relative_incr", "allowed keys: max_relative_increase, max, min"),
    (("evaluate: [crows_bias, wikitext2_ppl]", "evaluate: [crows_bias, wikitext2_ppl]\nscreen: [stereoset_bias]"),
     6, "screen[0]", "not in evaluate"),
    (("grid: {lambda: [0.1, 0.2]}", "grid: {lambda: [0.1]}\nsearch: {lambda: [0, 1]}"), 5, "search", "not both"),
    (("grid: {lambda: [0.1, 0.2]}", "search: {lambda: [1, 0]}"), 4, "search.lambda", "low < high"),
    (("grid: {lambda: [0.1, 0.2]}", "grid: {lambda: [0.1]}\ncheckpoints: [10]"), 5, "checkpoints", "no training steps"),
])
def test_sweep_file_errors_name_line_and_field(tmp_path, edit, line, field, words):
    old, new = edit
    assert old in VALID
    with pytest.raises(SweepFileError) as caught:
        _load(tmp_path, VALID.replace(old, new))
    message = str(caught.value)
    assert f"line {line}, field '{field}'" in message and words in message, message
    assert str(tmp_path / "bad.yml") in message


def test_valid_file_plans_reference_then_one_job_per_lambda(tmp_path):
    sweep = _load(tmp_path, VALID.replace("[0.1, 0.2]", "[0, 0.1, 0.2, 0.1]"))
    jobs = sweep.jobs()
    assert [job.name for job in jobs] == ["base", "lambda_0.1", "lambda_0.2"]  # 0 is the base; repeats once
    assert sweep.screen_tasks == ["crows_bias", "wikitext2_ppl"] and sweep.full_tasks == []
    assert sweep.directions == ["minimize", "minimize"]
    reformatted = VALID.replace("grid: {lambda: [0.1, 0.2]}", "grid:\n  lambda: [0, 0.1, 0.2, 0.1]  # comment")
    assert _load(tmp_path, reformatted).sha256 == sweep.sha256  # one study per content, not per layout


def test_a_folder_holding_something_else_is_replaced_only_with_force(tmp_path):
    from debias_plugin.errors import DebiasError
    from debias_plugin.sweep.run import prepare_folder

    sweep, out = _load(tmp_path, VALID), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DebiasError, match="does not hold this sweep"):
        prepare_folder(sweep, out, force=False, inputs=[])
    assert (out / "notes.txt").read_text() == "mine"
    prepare_folder(sweep, out, force=True, inputs=[])
    assert sorted(path.name for path in out.iterdir()) == ["sweep.yml"]
    (out / "trials").mkdir()
    prepare_folder(sweep, out, force=False, inputs=[])  # the same sweep: resumed, nothing removed
    assert (out / "trials").is_dir()


def test_an_unusable_storage_fails_before_the_output_folder_is_made(tmp_path):
    from debias_plugin.errors import DebiasError
    from debias_plugin.sweep.run import SweepRun

    sweep, out = _load(tmp_path, VALID), tmp_path / "out"
    with pytest.raises(DebiasError, match="--storage nosuchdriver://x: Optuna could not open it"):
        SweepRun(sweep, out, storage="nosuchdriver://x").run()
    assert not out.exists()


def test_negate_and_retain_evaluates_its_own_lambda_zero(tmp_path):
    """Its lambda 0 is base + mu * capability, not the base: neither a grid nor a search may stand the base in."""
    retain = VALID.replace("fixed: {biased: /b}", "fixed: {biased: /b, capability: /c, mu: 0.5}")
    grid = _load(tmp_path, retain.replace("[0.1, 0.2]", "[0, 0.1]"))
    assert grid.reference_knob_value is None
    assert [job.name for job in grid.jobs()] == ["base", "lambda_0", "lambda_0.1"]
    search = _load(tmp_path, retain.replace("grid: {lambda: [0.1, 0.2]}", "search: {lambda: [0, 1]}"))
    assert search.reference_knob_value is None
    assert _load(tmp_path, VALID.replace("grid: {lambda: [0.1, 0.2]}", "search: {lambda: [0, 1]}")) \
        .reference_knob_value == 0.0


def test_input_files_come_from_the_option_types(tmp_path):
    """Every stage's file options are typed InputPath: the sweep refuses an output folder inside any of them, PCGU's
    pairs included when it names a file rather than a built-in data set."""
    from debias_plugin.merge.stage import NegateOptions
    from debias_plugin.methods import method_class
    from debias_plugin.options import input_options
    from debias_plugin.sweep.stage import input_paths

    assert set(input_options(NegateOptions)) == {"biased", "adapter", "template", "capability"}
    assert set(input_options(method_class("unlearn").Options)) == {"corpus", "words", "heldout", "retain"}
    assert set(input_options(method_class("finetune").Options)) == {"corpus"}
    assert set(input_options(method_class("pcgu").Options)) == {"pairs"}
    pcgu = VALID.replace("method: negate", "method: pcgu").replace("grid: {lambda: [0.1, 0.2]}", "grid: {k: [0.1]}")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("")
    assert input_paths(_load(tmp_path, pcgu.replace("fixed: {biased: /b}", f"fixed: {{pairs: {pairs}}}"))) == [pairs]
    assert input_paths(_load(tmp_path, pcgu.replace("fixed: {biased: /b}", "fixed: {pairs: crows}"))) == []
    negate = _load(tmp_path, VALID.replace("fixed: {biased: /b}", "fixed: {adapter: /a, capability: /c, mu: 0.5}"))
    assert input_paths(negate) == [Path("/a"), Path("/c")]


def test_negation_is_checked_by_its_options_like_any_stage(tmp_path):
    """The sweep's negate knobs are NegateOptions' names (mu too), and its values pass NegateOptions' checks."""
    retain = VALID.replace("fixed: {biased: /b}", "fixed: {biased: /b, capability: /c}")
    sweep = _load(tmp_path, retain.replace("grid: {lambda: [0.1, 0.2]}", "grid: {lambda: [0.1], mu: [0.25, 0.5]}"))
    assert [job.name for job in sweep.jobs()] == ["base", "lambda_0.1-mu_0.25", "lambda_0.1-mu_0.5"]
    with pytest.raises(SweepFileError) as caught:
        _load(tmp_path, retain.replace("grid: {lambda: [0.1, 0.2]}", "grid: {lambda: [0.1], mu: [0.5, -1]}"))
    assert "line 4, field 'grid.mu[1]': mu must be a positive number" in str(caught.value)
    with pytest.raises(SweepFileError) as caught:
        _load(tmp_path, VALID.replace("fixed: {biased: /b}", "fixed: {biased: /b, shard_size: 12XB}"))
    assert "field 'fixed.shard_size': shard size must look like 500MB" in str(caught.value)


def test_training_stage_options_are_checked_before_any_model_loads(tmp_path):
    text = """\
base: /m
method: unlearn
fixed: {corpus: /c.csv, domains: [gender], lr: 1e-5}
grid: {batch_size: [8, 0]}
checkpoints: [10, 20]
evaluate: [crows_bias]
objective: crows_bias/pct_stereotype
"""
    with pytest.raises(SweepFileError) as caught:
        _load(tmp_path, text)
    assert "line 4, field 'grid.batch_size[1]'" in str(caught.value), str(caught.value)
    with pytest.raises(SweepFileError) as caught:
        _load(tmp_path, text.replace("lr: 1e-5", "lr: 1e-5, learning_rate: 2").replace("[8, 0]", "[8]"))
    assert "line 3, field 'fixed.learning_rate'" in str(caught.value) and "unknown option" in str(caught.value)
    with pytest.raises(SweepFileError) as caught:
        _load(tmp_path, text.replace("lr: 1e-5", "lr: 1e-5, steps: 5").replace("[8, 0]", "[8]"))
    assert "fixed.steps" in str(caught.value) and "last checkpoint 20" in str(caught.value)
    sweep = _load(tmp_path, text.replace("[8, 0]", "[8, 16]"))
    assert [len(job.points) for job in sweep.jobs()] == [1, 2, 2]  # one run per batch size, two checkpoints each
    from debias_plugin.sweep.stage import stage_settings

    config, options = stage_settings(sweep, sweep.jobs()[2].settings, tmp_path / "o", base="/m")
    assert (config.batch_size, config.steps, config.snapshot_steps, config.lr) == (16, 20, [10, 20], 1e-5)
    assert options.domains == ["gender"] and options.corpus == "/c.csv"


def test_cli_error_exits_2_without_traceback(tmp_path):
    result = subprocess.run(_debias_command("sweep", str(tmp_path / "missing.yml"), "--out", str(tmp_path / "o")),
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the sweep file does not exist" in result.stderr


# ------------------------------------------------------------------------------------------------ budget search

def _synthetic(boundary: float, crossing: float | None = None, bias_start: float = 60.0):
    """Bias falls linearly from bias_start (reaching 50 at `crossing`); the budget holds up to `boundary`."""
    slope = 0.0 if crossing is None else (bias_start - 50.0) / crossing
    slope = slope or 5.0  # never reaches 50 inside [0, 1] when no crossing is given
    calls = []

    def evaluate(x: float) -> Observation:
        calls.append(x)
        value = bias_start - slope * x if crossing is not None else bias_start - 5.0 * x
        return Observation(value, x <= boundary)

    return evaluate, calls


@pytest.mark.parametrize("boundary", [0.013, 0.25, 0.3137, 0.5, 0.77, 0.999])
def test_search_finds_the_budget_boundary_within_tolerance_in_8_evaluations(boundary):
    evaluate, calls = _synthetic(boundary)
    result = run_search(evaluate, 0.0, 1.0, max_evaluations=8)
    assert result.evaluations == len(set(calls)) <= 8
    tolerance = 1.0 / 64  # the default reached with 8 evaluations on [0, 1]
    assert result.low <= boundary < result.high and result.high - result.low <= tolerance
    assert result.best == result.low and boundary - result.best <= tolerance  # the objective falls all the way
    assert "budget boundary" in result.reason and not result.violations


def test_search_stops_at_the_target_crossing_inside_the_budget():
    evaluate, calls = _synthetic(boundary=0.9, crossing=0.4)
    result = run_search(evaluate, 0.0, 1.0, max_evaluations=9, tolerance=0.01)  # 2 ends + 7 halvings
    assert result.low <= 0.4 <= result.high and result.high - result.low <= 0.01
    assert abs(result.best - 0.4) <= 0.01 and "target crossing" in result.reason
    assert len(set(calls)) == result.evaluations <= 2 + math.ceil(math.log2(1 / 0.01))


def test_search_end_cases_and_brute_force_agreement():
    evaluate, calls = _synthetic(boundary=2.0)  # the whole range keeps the budget, no crossing: take the high end
    result = run_search(evaluate, 0.0, 1.0)
    assert (result.best, result.evaluations) == (1.0, 2)
    evaluate, _ = _synthetic(boundary=-1.0)
    assert run_search(evaluate, 0.0, 1.0).best is None
    for boundary, crossing in [(0.2, 0.6), (0.6, 0.2), (0.45, 0.45), (0.07, 0.93)]:  # vs a dense grid
        evaluate, _ = _synthetic(boundary, crossing)
        result = run_search(evaluate, 0.0, 1.0, max_evaluations=10)
        grid = [i / 4000 for i in range(4001)]
        truth = min((x for x in grid if x <= boundary), key=lambda x: abs(60 - 10 / crossing * x - 50))
        assert abs(result.best - truth) <= 1.0 / 256 + 1e-12, (boundary, crossing, result)


def test_search_integer_knob_and_reported_violations():
    result = run_search(lambda x: Observation(160 - x, x <= 37), 0, 100, integer=True, max_evaluations=12)
    assert (result.low, result.high, result.best) == (37, 38, 37)
    result = run_search(lambda x: Observation(60 - 20 * x + 30 * x * x, x <= 1), 0.0, 1.0)  # not monotone
    assert result.violations


# ------------------------------------------------------------------------------------------------ end to end

def test_grid_sweep_end_to_end(grid_run, models):
    """3 lambdas + the base: metrics equal lm-eval run directly, intervals, front and choice by brute force."""
    import lm_eval
    import numpy as np
    from lm_eval.tasks import TaskManager
    from safetensors import safe_open
    from scipy.stats import binomtest

    from debias_plugin.paths import tasks_dir

    path, out = grid_run
    base, biased = models
    content = _deterministic(out / "sweep.json")
    points = {p["name"]: p for p in content["points"]}
    assert list(points) == ["base", "lambda_0.25", "lambda_0.5", "lambda_1"]
    objective, budget = "crows_bias_gender/pct_stereotype", "wikitext2_ppl/word_perplexity"

    # each model is the negation: base - lambda * (biased - base)
    name = "transformer.h.0.mlp.c_fc.weight"
    with safe_open(base / "model.safetensors", "np") as b, safe_open(biased / "model.safetensors", "np") as d:
        theta, tau = b.get_tensor(name), d.get_tensor(name) - b.get_tensor(name)
    for lam in (0.25, 0.5, 1.0):
        folder = out / points[f"lambda_{lam:g}"]["model"]
        with safe_open(folder / "model.safetensors", "np") as got:
            assert np.allclose(got.get_tensor(name), theta - lam * tau, atol=1e-6)

    # the objective equals lm-eval's own run on the chosen model; the interval is scipy's Clopper-Pearson
    best = points[content["best_name"]]
    direct = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(out / best["model"])},
                                     tasks=["crows_bias_gender"], limit=LIMIT, device="cpu", batch_size=16,
                                     task_manager=TaskManager(include_path=str(tasks_dir()), include_defaults=False))
    assert best["metrics"][objective]["value"] == direct["results"]["crows_bias_gender"]["pct_stereotype,none"]
    for point in points.values():
        entry = point["metrics"][objective]
        k = round(entry["value"] * entry["units"] / 100)
        ci = binomtest(k, entry["units"]).proportion_ci(0.95, method="exact")
        assert math.isclose(entry["low"], 100 * ci.low) and math.isclose(entry["high"], 100 * ci.high)

    # feasibility, Pareto front and the choice, recomputed from the reported values
    reference = points["base"]["metrics"][budget]["value"]
    score = {n: (abs(p["metrics"][objective]["value"] - 50), p["metrics"][budget]["value"]) for n, p in points.items()}
    feasible = [n for n in points if score[n][1] <= reference * (1 + BUDGET)]
    for n, point in points.items():
        assert point["feasible"] == (n in feasible)
        dominated = any(all(o <= s for o, s in zip(score[m], score[n])) and score[m] != score[n] for m in feasible)
        assert point["pareto"] == (n in feasible and not dominated), n  # the front of the points within budget
    assert content["best_name"] == min(feasible, key=lambda n: (score[n], list(points).index(n)))
    assert not points["lambda_1"]["feasible"], "the test's perturbation should put lambda 1 over the 5% budget"

    # the full suite (StereoSet) only on the Pareto front and the chosen point
    for n, point in points.items():
        on_front = point["pareto"] or point["best"]
        assert point["suite"] == ("full" if on_front else "screen"), n
        assert any(key.startswith("stereoset_bias/") for key in point["metrics"]) == on_front
    assert content["evaluations"] == {"screen": 4, "full": sum(p["suite"] == "full" for p in points.values())}
    assert content["pending"] == {"screen": [], "full": []}

    # the files: table, CSV, plots, best/ with its manifest
    report = (out / "report.md").read_text()
    assert f"**Chosen: `{best['name']}`**" in report and "crows_bias_gender: pct_stereotype per type" not in report
    assert "| stereoset_bias" not in report and "### stereoset_bias" in report and "Pareto" in report
    assert len((out / "sweep.csv").read_text().splitlines()) == 5
    for plot in ("bias_vs_budget", "bias_by_type"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000 and (out / "plots" / f"{plot}.svg").is_file()
    assert (out / "best").resolve() == (out / best["model"]).resolve()
    assert json.loads((out / "best" / "debias_manifest.json").read_text())["stage"] == "negate"


def test_a_gap_metric_gets_the_interval_of_its_distance_from_50(grid_run):
    """stereotype_gap / ss_gap = |x - 50|: their interval is every |x - 50| for x in x's interval, and holds the value."""
    content = json.loads((grid_run[1] / "sweep.json").read_text())
    checked = [0, 0]
    for point in content["points"]:
        for key, entry in point["metrics"].items():
            task, name = key.split("/", 1)
            source = {"stereotype_gap": "pct_stereotype"}.get(name, "ss" + name[6:] if name.startswith("ss_gap") else None)
            if source is None:
                continue
            x = point["metrics"][f"{task}/{source}"]
            if x.get("low") is None:
                assert entry.get("low") is None, key
                continue
            distances = sorted((abs(x["low"] - 50), abs(x["high"] - 50)))
            low = 0.0 if x["low"] <= 50 <= x["high"] else distances[0]
            assert (entry["low"], entry["high"]) == pytest.approx((low, distances[1])), key
            assert entry["low"] <= entry["value"] <= entry["high"], key
            assert entry["method"].endswith("mapped through |x - 50|")
            checked[name.startswith("ss_gap")] += 1
    assert checked[0] >= 3 and checked[1] >= 5  # CrowS gender on every point, StereoSet's five on the fully evaluated


def test_report_re_renders_from_the_study_without_evaluating(grid_run):
    import optuna

    from debias_plugin.cli import main

    _, out = grid_run
    before = _deterministic(out / "sweep.json")
    trials = len(optuna.load_study(study_name=before["study"], storage=f"sqlite:///{out / 'study.db'}").trials)
    plots = {path.name: path.read_bytes() for path in (out / "plots").iterdir()}
    for name in ("sweep.json", "report.md", "sweep.csv"):
        (out / name).unlink()
    main(["sweep", "report", str(out)])  # returns normally on success (errors exit 2)
    assert _deterministic(out / "sweep.json") == before and (out / "report.md").is_file()
    assert {path.name: path.read_bytes() for path in (out / "plots").iterdir()} == plots  # SVGs: no date, fixed ids
    assert len(optuna.load_study(study_name=before["study"], storage=f"sqlite:///{out / 'study.db'}").trials) == trials


def test_budget_search_end_to_end(env, models, tmp_path):
    from debias_plugin.sweep import run_sweep
    from debias_plugin.sweep.search import next_step

    out = run_sweep(_sweep_file(tmp_path, SEARCH_SWEEP, models), tmp_path / "out")
    content = _deterministic(out / "sweep.json")
    search = content["search"]
    assert search["finished"] and search["evaluations"] <= 4 and search["reference_used_as_low_end"]
    points = content["points"]
    assert len(points) == search["evaluations"]  # every evaluation is one point, the base (lambda 0) included
    objective, budget = "crows_bias_gender/pct_stereotype", "wikitext2_ppl/word_perplexity"
    reference = points[0]["metrics"][budget]["value"]
    seen = {float(p["params"].get("lambda", 0.0)): Observation(p["metrics"][objective]["value"],
                                                                 p["metrics"][budget]["value"] <= reference * (1 + BUDGET))
            for p in points}
    replay = next_step(0.0, 1.0, seen, max_evaluations=4)  # the same decision from the recorded values alone
    assert replay.proposal is None and replay.best == search["best_value"]
    chosen = next(p for p in points if p["best"])
    assert float(chosen["params"].get("lambda", 0.0)) == search["best_value"]
    from debias_plugin.sweep.plan import load_sweep
    from debias_plugin.sweep.render import markdown

    saved, sweep = json.loads((out / "sweep.json").read_text()), load_sweep(out / "sweep.yml")
    stopped = {**saved, "search": {**search, "finished": False, "next": 0.375}}  # as if killed before its last step
    report = markdown(sweep, stopped, saved["run"], [])
    assert "**Not finished**: the budget search not finished (next: lambda 0.375)." in report, report
    assert f"**Chosen so far: `{content['best_name']}`**" in report
    assert "**Not finished**" not in markdown(sweep, saved, saved["run"], [])


def test_kill_mid_sweep_then_rerun_gives_the_same_sweep_json(grid_run, models, tmp_path):
    import optuna

    expected = _deterministic(grid_run[1] / "sweep.json")
    path = _sweep_file(tmp_path, GRID_SWEEP, models)
    command = _debias_command("sweep", str(path), "--out", str(tmp_path / "out"))
    killed = subprocess.run(_killed_command(3, *command[3:]), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    jobs = optuna.load_study(study_name=expected["study"] + ".jobs", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    states = sorted(t.state.name for t in jobs.trials)
    assert states == ["COMPLETE", "COMPLETE", "RUNNING"], states  # base and one lambda done, one caught mid-job
    from debias_plugin.cli import main

    main(["sweep", "report", str(tmp_path / "out")])  # a report of the points so far says what is missing
    partial = _deterministic(tmp_path / "out" / "sweep.json")
    scored = {p["name"] for p in partial["points"]}
    assert partial["pending"]["screen"] == [p["name"] for p in expected["points"] if p["name"] not in scored]
    assert len(partial["pending"]["screen"]) == len(expected["points"]) - 2
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**Not finished**: " in report and f"**Chosen so far: `{partial['best_name']}`**" in report
    (line,) = [line for line in report.splitlines() if line.startswith("**Not finished**")]
    assert all(f"`{name}`" in line for name in partial["pending"]["screen"])
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _deterministic(tmp_path / "out" / "sweep.json") == expected


def test_a_live_claim_is_kept_and_a_dead_one_failed_by_optunas_heartbeat(tmp_path, monkeypatch):
    """Claims are jobs-study trials run by study.optimize: a rival looking while one runs (even before it names its
    job) sees it busy and cannot take it; once its heartbeat stops, fail_stale_trials fails it and the job is free."""
    import optuna

    from debias_plugin.sweep.storage import JobBoard, open_storage

    monkeypatch.setenv("DEBIAS_SWEEP_HEARTBEAT_SECONDS", "1")
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name="s.jobs")
    claimant, rival, seen = JobBoard(study), JobBoard(optuna.load_study(storage=open_storage(url), study_name="s.jobs")), []

    def work():
        seen.append((rival.status("job-1"), rival.run("job-1", lambda: pytest.fail("ran twice"))))

    assert claimant.run("job-1", work) and seen == [("busy", False)]
    assert rival.status("job-1") == "done" and not rival.run("job-1", lambda: pytest.fail("done already"))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "PRUNED"], states  # the rival's two tries gave way
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna beats only inside optimize: we beat once by hand
        dead = study.ask()  # a claim whose process died: one heartbeat, then none
    dead.set_user_attr("job", "job-2")
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name("s.jobs"), dead.number))
    assert rival.status("job-2") == "busy"
    time.sleep(8)  # past the grace period: 6 heartbeat intervals
    assert rival.status("job-2") == "free" and study.trials[dead.number].state.name == "FAIL"
    assert rival.run("job-2", lambda: None) and rival.status("job-2") == "done"


def test_a_worker_killed_mid_trial_is_taken_over_by_its_partner(grid_run, models, tmp_path):
    """Two processes share one storage; one is SIGKILLed holding a claim. Optuna's fail_stale_trials fails that
    claim once its heartbeat stops, the other process redoes the job and finishes the sweep: the same sweep.json
    as the uninterrupted run (and the killed worker, rerun, finds everything done)."""
    import optuna

    expected = _deterministic(grid_run[1] / "sweep.json")
    path = _sweep_file(tmp_path, GRID_SWEEP, models)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    args = [("sweep", str(path), "--out", str(tmp_path / f"out{i}"), "--storage", storage) for i in range(2)]
    doomed = subprocess.Popen(_killed_command(1, *args[0]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # the doomed worker claims first (the base model) and dies evaluating it
    survivor = subprocess.Popen(_debias_command(*args[1]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = doomed.communicate(timeout=600)
        assert doomed.returncode == -signal.SIGKILL, stderr[-3000:]
        _, stderr = survivor.communicate(timeout=600)
        assert survivor.returncode == 0, stderr[-3000:]
    finally:
        for worker in (doomed, survivor):
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert _deterministic(tmp_path / "out1" / "sweep.json") == expected
    claims = optuna.load_study(study_name=expected["study"] + ".jobs", storage=storage).trials
    (stale,) = [t for t in claims if t.state.name == "FAIL"]
    assert stale.user_attrs["pid"] == doomed.pid
    redone = [t for t in claims if t.state.name == "COMPLETE" and t.user_attrs["job"] == stale.user_attrs["job"]]
    assert [t.user_attrs["pid"] for t in redone] == [survivor.pid]
    rerun = subprocess.run(_debias_command(*args[0]), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _deterministic(tmp_path / "out0" / "sweep.json") == expected


def test_two_processes_sharing_one_storage_give_the_same_results(grid_run, models, tmp_path):
    import optuna

    expected = _deterministic(grid_run[1] / "sweep.json")
    path = _sweep_file(tmp_path, GRID_SWEEP, models)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [subprocess.Popen(_debias_command("sweep", str(path), "--out", str(tmp_path / f"out{i}"),
                                                "--storage", storage, "--shard", f"{i}/2"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for worker in workers:
            _, stderr = worker.communicate(timeout=600)
            assert worker.returncode == 0, stderr[-3000:]
    finally:  # a failed worker leaves its partner waiting for jobs that will not come
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for i in range(2):
        assert _deterministic(tmp_path / f"out{i}" / "sweep.json") == expected
    claims = optuna.load_study(study_name=expected["study"] + ".jobs", storage=storage).trials
    done = [t for t in claims if t.state.name == "COMPLETE"]
    assert len({t.user_attrs["job"] for t in done}) == len(done), "a job was done twice"
    assert {t.user_attrs["pid"] for t in done} == {w.pid for w in workers}, "both processes took jobs"


CHECKPOINT_SWEEP = """\
base: {base}
method: unlearn
fixed:
  corpus: {corpus}
  where: {{split: dev}}
  domains: [gender]
  batch_size: 4
  lr: 2.0e-3
  max_length: 32
  dropout: false
checkpoints: [1, 3]
evaluate: [crows_bias_gender]
objective: crows_bias_gender/pct_stereotype
limit: {limit}
evaluation: full
"""


def test_checkpoint_sweep_evaluates_the_steps_of_one_run(env, models, data_dir, tmp_path):
    """One unlearning run, snapshots at steps 1 and 3: each point's weights are those of a run stopped there."""
    import numpy as np
    from safetensors import safe_open

    from debias_plugin.methods import method_class
    from debias_plugin.sweep import run_sweep
    from debias_plugin.sweep.stage import stage_settings

    base, _ = models
    path = tmp_path / "sweep.yml"
    path.write_text(CHECKPOINT_SWEEP.format(base=base, corpus=data_dir / "dghs" / "dghs_women.csv", limit=LIMIT))
    out = run_sweep(path, tmp_path / "out")
    content = _deterministic(out / "sweep.json")
    assert [p["name"] for p in content["points"]] == ["base", "step_1", "step_3"]
    assert [p["model"] for p in content["points"][1:]] == ["runs/run/model.snapshots/step-1",
                                                          "runs/run/model.snapshots/step-3"]
    sweep = load_sweep(path)
    config, options = stage_settings(sweep, {}, tmp_path / "alone", base=str(base))
    from debias_plugin.training import train

    alone = train(config.model_copy(update={"steps": 1, "snapshot_steps": []}),
                  method_class("unlearn")(options))  # an independent run of one step
    name = "transformer.h.1.mlp.c_proj.weight"
    with safe_open(alone / "model.safetensors", "np") as a, \
            safe_open(out / "runs/run/model.snapshots/step-1/model.safetensors", "np") as s, \
            safe_open(base / "model.safetensors", "np") as b:
        assert np.array_equal(a.get_tensor(name), s.get_tensor(name))
        assert not np.array_equal(b.get_tensor(name), s.get_tensor(name))
    assert content["best"] in {p["key"] for p in content["points"]}
