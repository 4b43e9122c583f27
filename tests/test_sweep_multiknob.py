"""Several knobs at once (`search: {sampler, trials, knobs}`): the file, the sampler replay, a 2-knob negate-and-retain
sweep on a tiny GPT-2 (runs, resumes after kill -9 with the same sweep.json, reports its front and a model card),
and NSGA-II's front checked by brute force."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import perturbed_copy

from debias_plugin.sweep.plan import load_sweep
from debias_plugin.sweep.schema import SweepFileError

BUDGET = 0.05
KNOBS_SWEEP = """\
base: {base}
method: negate
fixed: {{biased: {biased}, capability: {capability}}}
search:
  sampler: {sampler}
  trials: {trials}
  seed: 0
  knobs:
    lambda: {{low: 0.05, high: 1, step: 0.05}}
    mu: {{low: 0.05, high: 1, step: 0.05}}
evaluate: [crows_bias_gender, wikitext2_ppl{more_tasks}]
objective: crows_bias_gender/{objective}
target: {target}
budget: {{wikitext2_ppl/word_perplexity: {{max_relative_increase: {budget}}}}}
limit: 3
resamples: 200
"""


def _deterministic(path: Path) -> dict:
    content = json.loads(path.read_text())
    content.pop("run")
    return content


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEBIAS_CACHE_DIR", str(tmp_path_factory.mktemp("multiknob_cache")))
        patch.setenv("DEBIAS_SWEEP_POLL_SECONDS", "0.5")
        patch.setenv("DEBIAS_SWEEP_HEARTBEAT_SECONDS", "1")
        yield


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """(base, biased, capability): a tiny GPT-2 and two copies with every weight perturbed (two task vectors)."""
    base = tiny_model("gpt2")
    return (base, *(perturbed_copy(base, tmp_path_factory.mktemp("multiknob_models") / name, seed=seed)
                    for name, seed in (("biased", 3), ("capability", 4))))


def _sweep_file(folder: Path, models, *, sampler: str = "tpe", trials: int = 6, budget: float = BUDGET,
                target: float = 50, objective: str = "pct_stereotype", more_tasks: str = "") -> Path:
    base, biased, capability = models
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yml"
    path.write_text(KNOBS_SWEEP.format(base=base, biased=biased, capability=capability, sampler=sampler,
                                       trials=trials, budget=budget, target=target,
                                       objective=objective, more_tasks=more_tasks))
    return path


# ------------------------------------------------------------------------------------------------ the file

VALID = """\
base: /m
method: negate
fixed: {biased: /b, capability: /c}
search: {sampler: tpe, trials: 6, knobs: {lambda: {low: 0, high: 1}, mu: {low: 0.1, high: 1}}}
evaluate: [crows_bias, wikitext2_ppl]
objective: crows_bias/pct_stereotype
budget: {wikitext2_ppl/word_perplexity: {max_relative_increase: 0.02}}
"""


def _load(tmp_path, text: str):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    return load_sweep(path)


def test_a_knob_search_plans_the_reference_and_keeps_the_one_knob_hash(tmp_path):
    sweep = _load(tmp_path, VALID)
    assert sweep.config.search is None and sweep.search_knob is None and sweep.knob is None
    assert list(sweep.sampling.knobs) == ["lambda", "mu"] and sweep.sampling.batch_size == 1
    assert [job.name for job in sweep.jobs()] == ["base"]
    sweep.sampled = [{"lambda": 0.5, "mu": 0.25}, {"lambda": 0.5, "mu": 0.25}]
    assert [job.name for job in sweep.jobs()] == ["base", "lambda_0.5-mu_0.25"]  # a repeat is evaluated once
    one = _load(tmp_path, VALID.replace(VALID.splitlines()[3], "search: {lambda: [0, 1]}")
                .replace("capability: /c", "capability: /c, mu: 0.5"))
    assert "sampling" not in one.config.model_dump(mode="json")  # old sweeps hash as before


@pytest.mark.parametrize("edit, line, field, words", [
    (("sampler: tpe", "sampler: cmaes"), 4, "search.sampler", "'tpe', 'gp' or 'nsga2'"),
    (("trials: 6", "trials: 6, batchh: 2"), 4, "search.batchh", "allowed keys: sampler, trials, seed, batch"),
    (("mu: {low: 0.1, high: 1}", "mu: {low: 1, high: 0.1}"), 4, "search.knobs.mu", "low < high"),
    (("mu: {low: 0.1, high: 1}", "k: {low: 0, high: 1}"), 4, "search.knobs.k", "unknown option 'k' of negate"),
    (("mu: {low: 0.1, high: 1}", "template: {low: 0, high: 1}"), 4, "search.knobs.template", "needs a numeric knob"),
    (("fixed: {biased: /b, capability: /c}", "fixed: {biased: /b, capability: /c, mu: 0.5}"), 4,
     "search.knobs.mu", "also in fixed"),
    (("evaluate:", "grid: {lambda: [0.1]}\nevaluate:"), 4, "search", "not both"),
    (("evaluate:", "sampling: {trials: 2}\nevaluate:"), 5, "sampling", "unknown key 'sampling'"),
])
def test_knob_search_errors_name_line_and_field(tmp_path, edit, line, field, words):
    old, new = edit
    assert old in VALID
    with pytest.raises(SweepFileError) as caught:
        _load(tmp_path, VALID.replace(old, new))
    message = str(caught.value)
    assert f"line {line}, field '{field}'" in message and words in message, message


# ------------------------------------------------------------------------------------------------ the sampler

def _synthetic(params: dict) -> tuple[list[float], dict[str, float]]:
    """(distance, perplexity) and the budget constraint of a made-up 2-knob trade-off: bias falls with lambda,
    perplexity rises with lambda and falls with mu."""
    distance = abs(10 - 12 * params["lambda"] + 2 * params["mu"])
    perplexity = 100 * (1 + 0.3 * params["lambda"] ** 2 - 0.05 * params["mu"])
    return [distance, perplexity], {"wikitext2_ppl/word_perplexity": perplexity - 102.0}


@pytest.mark.parametrize("sampler", ["tpe", "gp", "nsga2"])
def test_the_replay_proposes_the_same_settings_from_the_results_alone(tmp_path, sampler):
    """Every process and every resume replays the seeded sampler over the recorded results: the same proposals,
    whichever order they were evaluated in, and exactly `trials` of them."""
    from debias_plugin.sweep.search import sample_step
    from debias_plugin.sweep.storage import distributions

    sweep = _load(tmp_path, VALID.replace("sampler: tpe, trials: 6", f"sampler: {sampler}, trials: 6, batch: 2"))
    knobs = distributions(sweep)
    results, rounds = {}, 0
    while True:
        state = sample_step(sweep.sampling, knobs, results, sweep.sampled_key, sweep.directions)
        if state.finished:
            break
        assert len(state.pending) <= 2 and len(state.proposals) <= 6
        for params in reversed(state.pending):  # evaluated in any order
            results[sweep.sampled_key(params)] = _synthetic(params)
        rounds += 1
    assert len(state.proposals) == 6 and rounds == 3
    again = sample_step(sweep.sampling, knobs, dict(reversed(list(results.items()))), sweep.sampled_key,
                        sweep.directions)
    assert again.proposals == state.proposals and again.finished
    partial = sample_step(sweep.sampling, knobs, {sweep.sampled_key(p): results[sweep.sampled_key(p)]
                                                  for p in state.proposals[:4]}, sweep.sampled_key, sweep.directions)
    assert partial.proposals == state.proposals[:6] and partial.pending == state.proposals[4:6]


@pytest.mark.parametrize("sampler", ["tpe", "gp", "nsga2"])
def test_a_stopped_screen_is_replayed_as_a_pruned_trial(tmp_path, sampler):
    """A setting the sequential screen stopped has no full-set values: the replay tells it as Optuna's pruned trial
    at its last look, and the proposals stay the same from the results alone, in any order."""
    from debias_plugin.sweep.search import Stopped, sample_step
    from debias_plugin.sweep.storage import distributions

    sweep = _load(tmp_path, VALID.replace("sampler: tpe, trials: 6", f"sampler: {sampler}, trials: 8, batch: 2"))
    knobs, results = distributions(sweep), {}
    while not (state := sample_step(sweep.sampling, knobs, results, sweep.sampled_key, sweep.directions)).finished:
        for params in state.pending:
            results[sweep.sampled_key(params)] = (Stopped(2, 0.05 * params["lambda"]) if params["lambda"] > 0.4
                                                  else _synthetic(params))
    assert any(isinstance(r, Stopped) for r in results.values()) and len(state.proposals) == 8
    again = sample_step(sweep.sampling, knobs, dict(reversed(list(results.items()))), sweep.sampled_key,
                        sweep.directions)
    assert again.proposals == state.proposals


# ------------------------------------------------------------------------------------------------ end to end

def _front_is_brute_force_non_dominated(content: dict) -> None:
    """The reported front = the feasible points no feasible point beats on (distance, budget metric)."""
    feasible = [p for p in content["points"] if p["feasible"]]

    def values(p):
        return (p["objective"]["distance"], p["budget"]["wikitext2_ppl/word_perplexity"]["value"])

    def beats(a, b):
        return all(x <= y for x, y in zip(a, b)) and a != b

    expected = {p["key"] for p in feasible if not any(beats(values(q), values(p)) for q in feasible)}
    assert set(content["pareto_front"]) == expected
    assert all(not p["pareto"] for p in content["points"] if not p["feasible"])


@pytest.fixture(scope="module")
def tpe_run(env, models, tmp_path_factory):
    from debias_plugin.sweep import run_sweep

    folder = tmp_path_factory.mktemp("tpe")
    return run_sweep(_sweep_file(folder, models), folder / "out")


def test_two_knob_tpe_sweep_reports_its_front_and_a_model_card(tpe_run):
    from huggingface_hub import ModelCard

    content = _deterministic(tpe_run / "sweep.json")
    sampling = content["sampling"]
    assert sampling["finished"] and len(sampling["proposals"]) == 6 and sampling["knobs"] == ["lambda", "mu"]
    stopped = {entry["name"] for entry in content["stopped"]}  # sequential screening stopped them: no values
    assert stopped and {p["name"] for p in content["points"]} | stopped == {"base", *sampling["proposals"]}
    assert not stopped & {p["name"] for p in content["points"]}
    assert all(p["role"] == "sampled" for p in content["points"][1:])
    _front_is_brute_force_non_dominated(content)
    report = (tpe_run / "report.md").read_text()
    assert "Optuna's TPE sampler" in report and "## Front" in report and "![front](plots/front.png)" in report
    assert (tpe_run / "plots" / "front.png").is_file()
    for point in content["points"]:
        if not point["pareto"]:  # every point off the front says why, in sweep.json and the report
            reason = sampling["ruled_out"][point["name"]]
            assert reason.startswith(("budget: ", "dominated by", "error: ")), reason
            assert f"| {point['name']} | {reason} |" in report
            if not point["feasible"]:
                assert reason.startswith("budget: `wikitext2_ppl/word_perplexity`")
    for name in stopped:
        reason = sampling["ruled_out"][name]
        assert reason.startswith(("stopped early: over budget on `wikitext2_ppl/word_perplexity`",
                                  "stopped early: dominated on `objective`")), reason
        assert f"| {name} | {reason} |" in report
    best = next(p for p in content["points"] if p["best"])
    assert (best["role"] == "reference") != (tpe_run / "best" / "README.md").is_file()  # never into the base's folder


def test_the_model_card_carries_the_reports_numbers(tpe_run, tmp_path):
    """best/README.md from sweep.json's records: ModelCard.load parses it and its model-index equals the numbers."""
    from huggingface_hub import ModelCard

    from debias_plugin.sweep.card import write_model_card

    content = json.loads((tpe_run / "sweep.json").read_text())
    chosen = next(p for p in content["points"] if p["role"] == "sampled" and not p["error"])
    for point in content["points"]:  # as if this setting had been chosen
        point["best"] = point is chosen
    card_path = write_model_card(tpe_run, content)
    assert card_path == tpe_run / chosen["model"] / "README.md"
    card = ModelCard.load(card_path)
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    expected = {tuple(k.split("/", 1)): v["value"] for k, v in chosen["metrics"].items() if v["value"] is not None}
    expected |= {(k.split("/", 1)[0], k.split("/", 1)[1] + "_relative_change"): c["relative_change"]
                 for k, c in chosen["budget"].items()}
    assert results == expected
    intervals = {(r.dataset_type, r.metric_type): r.metric_args for r in card.data.eval_results}
    entry = chosen["metrics"]["crows_bias_gender/pct_stereotype"]
    assert intervals[("crows_bias_gender", "pct_stereotype")]["low"] == entry["low"]
    assert card.data.tags == ["debiasing", "debias-negate"] and f"lambda = {chosen['params']['lambda']:g}" in card.text
    assert content["study"] in card.text and "| crows_bias_gender | pct_stereotype |" in card.text


def test_kill_mid_trial_then_rerun_gives_the_same_sweep_json(tpe_run, models, tmp_path):
    expected = _deterministic(tpe_run / "sweep.json")
    path = _sweep_file(tmp_path, models)
    args = ["sweep", str(path), "--out", str(tmp_path / "out")]
    killed = subprocess.run([sys.executable, str(Path(__file__).with_name("sweep_fault.py")), "3", *args],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    from debias_plugin.cli import main

    main(["sweep", "report", str(tmp_path / "out")])
    partial = _deterministic(tmp_path / "out" / "sweep.json")
    assert not partial["sampling"]["finished"] and partial["pending"]["screen"]
    assert partial["sampling"]["proposals"] == expected["sampling"]["proposals"][:len(partial["sampling"]["proposals"])]
    rerun = subprocess.run([sys.executable, "-c", "from debias_plugin.cli import main; main()", *args],
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _deterministic(tmp_path / "out" / "sweep.json") == expected


def test_nsga2_front_is_non_dominated(env, models, tmp_path):
    from debias_plugin.sweep import run_sweep

    out = run_sweep(_sweep_file(tmp_path, models, sampler="nsga2", trials=6, budget=0.25, target=0,
                                objective="likelihood_diff", more_tasks=", stereoset_bias"), tmp_path / "out")
    content = _deterministic(out / "sweep.json")
    assert content["sampling"]["sampler"] == "nsga2" and content["sampling"]["batch"] == 4
    assert len(content["sampling"]["proposals"]) == 6
    assert len(content["pareto_front"]) >= 2  # a front worth checking (likelihood_diff: continuous on 3 pairs)
    assert {p["key"] for p in content["points"] if p["suite"] == "full"} == set(content["pareto_front"])
    assert all(any(k.startswith("stereoset_bias/") for k in p["metrics"]) == p["pareto"] for p in content["points"])
    _front_is_brute_force_non_dominated(content)
    assert "Optuna's NSGA-II sampler (seed 0, populations of 4)" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ baselines as stages

DIRECTION = """\
base: /m
method: direction
fixed: {pairs: winogender, layers: ["0"], action: add}
search: {sampler: tpe, trials: 4, knobs: {coefficient: {low: -2, high: 2}}}
evaluate: [crows_bias, wikitext2_ppl]
objective: crows_bias/pct_stereotype
budget: {wikitext2_ppl/word_perplexity: {max_relative_increase: 0.02}}
"""


def test_a_direction_is_a_sweep_stage_scored_as_the_base_through_hf_steered_safe(tmp_path):
    """debias direction's output is a steering file: a sweep point is scored as the base model with it
    (stage.evaluated_as), a folded LEACE output as its own model folder."""
    from debias_plugin.sweep.stage import evaluated_as, stage_class

    assert stage_class("direction").name == "direction"
    sweep = _load(tmp_path, DIRECTION)
    assert sweep.knob == "coefficient" and [job.name for job in sweep.jobs()] == ["base"]
    made, base = tmp_path / "trials" / "coefficient_1" / "model", tmp_path / "base"
    assert evaluated_as(sweep, {"coefficient": 1.0}, made, base) == (
        base, "hf-steered-safe", {"steer_path": str(made / "steer.safetensors")})
    assert evaluated_as(sweep, {}, base, base) == (base, None, {})  # the reference point is the base itself
    folded = _load(tmp_path, DIRECTION.replace("layers: [\"0\"], action: add", "layers: [final], estimator: leace, "
                                               "affine: false, fold: true, max_pairs: 8")
                   .replace("knobs: {coefficient: {low: -2, high: 2}}", "knobs: {max_length: {low: 8, high: 64}}"))
    assert evaluated_as(folded, {"max_length": 16}, made, base) == (made, None, {})
    with pytest.raises(SweepFileError, match="line 3, field 'fixed': rank above 1 is pca's"):  # checked at the corners
        _load(tmp_path, DIRECTION.replace("coefficient: {low: -2, high: 2}", "rank: {low: 2, high: 4}"))
