"""Sequential paired evaluation in `debias sweep` on a tiny GPT-2: per-window scores that sum to lm-eval's
WikiText-2 numbers, a far-over-budget point stopped early (a pruned Optuna trial, never reported as a number) while
the choice and its numbers equal an `evaluation: full` run, and a screen killed mid-chunk that resumes without
re-scoring the chunks it saved.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import perturbed_copy

BUDGET = 0.05
SWEEP = """\
base: {base}
method: negate
fixed: {{biased: {biased}, adapter: null}}
grid: {{lambda: [{lambdas}]}}
evaluate: [crows_bias_gender, wikitext2_ppl]
objective: crows_bias_gender/pct_stereotype
budget: {{wikitext2_ppl/word_perplexity: {{max_relative_increase: {budget}}}}}
limit: 8
resamples: 200
evaluation: {evaluation}
"""
# the debias CLI, SIGKILLed at the point's K-th chunk scoring (after earlier chunks were saved)
KILL_AT_CHUNK = """\
import os, signal, sys
from debias_plugin.sweep import sequential_eval
kill_at, calls, score = int(sys.argv[1]), [], sequential_eval.UnitScorer._score
def score_or_die(self, task, unit, indices):
    if self.model_dir.name == "model":  # a sweep point's model, not the base
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return score(self, task, unit, indices)
sequential_eval.UnitScorer._score = score_or_die
from debias_plugin.cli import main
main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEBIAS_CACHE_DIR", str(tmp_path_factory.mktemp("sequential_cache")))
        patch.setenv("DEBIAS_SWEEP_POLL_SECONDS", "0.5")
        yield


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """(base, biased): a tiny GPT-2 and a perturbed copy; negating 4x the difference ruins its perplexity."""
    base = tiny_model("gpt2")
    return base, perturbed_copy(base, tmp_path_factory.mktemp("sequential_models") / "biased")


def _sweep_file(folder: Path, models, evaluation: str, lambdas: str = "0.5, 4.0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yml"
    path.write_text(SWEEP.format(base=models[0], biased=models[1], budget=BUDGET, evaluation=evaluation,
                                 lambdas=lambdas))
    return path


def _content(out: Path) -> dict:
    content = json.loads((out / "sweep.json").read_text())
    content.pop("run")
    return content


@pytest.fixture(scope="module")
def runs(env, models, tmp_path_factory):
    """The same sweep, sequential (the default) and `evaluation: full`: their output folders."""
    from debias_plugin.sweep import run_sweep

    folder = tmp_path_factory.mktemp("sequential")
    return {mode: run_sweep(_sweep_file(folder / mode, models, mode), folder / mode / "out")
            for mode in ("sequential", "full")}


def test_window_log_likelihoods_sum_to_lm_evals_wikitext_numbers(env, models):
    """Per-window scores (the sequential unit) summed per article give exactly lm-eval's word and byte perplexity."""
    from debias_plugin.lm_eval.run import evaluate_loaded, load_model, task_documents

    loaded = load_model(models[0], model_class=None, model_args={}, batch_size=16, device="cpu")
    reported = evaluate_loaded(loaded, ["wikitext2_ppl"], limit=4)["results"]["wikitext2_ppl"]
    task, documents = task_documents(loaded, "wikitext2_ppl", 4)
    windows, owners = [], []
    for index, document in enumerate(documents):
        for window in loaded.lm.rolling_windows(task.doc_to_target(document)):
            windows.append(window)
            owners.append(index)
    assert len(windows) > len(documents)  # several windows per article: the unit is the window
    totals = [0.0] * len(documents)
    for owner, log_likelihood in zip(owners, loaded.lm.score_windows(windows)):
        totals[owner] += log_likelihood
    for metric in ("word_perplexity", "byte_perplexity"):
        units = sum(task.process_results(document, [0.0])[metric][1] for document in documents)
        assert math.exp(-sum(totals) / units) == reported[f"{metric},none"], metric


def test_far_over_budget_point_stops_early_and_the_choice_equals_a_full_run(runs):
    import optuna

    sequential, full = _content(runs["sequential"]), _content(runs["full"])
    # lambda 4 is stopped: a pruned trial of the screen study, with its verdict and the documents it cost
    (stopped,) = sequential["stopped"]
    assert stopped["name"] == "lambda_4" and stopped["verdict"] == "violated"
    assert stopped["metric"] == "wikitext2_ppl/word_perplexity" and stopped["interval"][0] > BUDGET
    assert stopped["documents_scored"]["wikitext2_ppl"] < stopped["population"]["wikitext2_ppl"]
    storage = f"sqlite:///{runs['sequential'] / 'study.db'}"
    study = optuna.load_study(study_name=sequential["study"] + ".screen", storage=storage)
    states = {t.user_attrs["name"]: t.state.name for t in study.trials}
    assert states == {"lambda_4": "PRUNED", "lambda_0.5": "COMPLETE"}
    pruned = next(t for t in study.trials if t.state.name == "PRUNED")
    assert pruned.intermediate_values and any(k.startswith("sequential.") for k in pruned.user_attrs)
    # never reported as a number: not a point, not in the tables, the CSV or the plots' data
    assert [p["name"] for p in sequential["points"]] == ["base", "lambda_0.5"]
    report = (runs["sequential"] / "report.md").read_text()
    assert "| lambda_4 |" not in report and "lambda_4" not in (runs["sequential"] / "sweep.csv").read_text()
    assert "- `lambda_4`: stopped at look" in report and "## Sequential screening" in report
    assert sequential["pending"] == {"screen": [], "full": []}
    # the full run evaluates lambda 4 in full and finds it over budget too; the choice and its numbers are equal
    assert not next(p for p in full["points"] if p["name"] == "lambda_4")["feasible"]
    assert sequential["best_name"] == full["best_name"] == "lambda_0.5"
    chosen = {mode: next(p for p in content["points"] if p["best"])
              for mode, content in (("sequential", sequential), ("full", full))}
    assert chosen["sequential"]["metrics"] == chosen["full"]["metrics"]
    for name in ("base", "lambda_0.5"):
        got, expected = (next(p for p in c["points"] if p["name"] == name) for c in (sequential, full))
        assert got["metrics"] == expected["metrics"] and got["budget"] == expected["budget"], name
    assert "stopped" not in full and "screening" not in json.loads((runs["full"] / "sweep.json").read_text())["run"]


def test_a_screen_killed_mid_chunk_resumes_without_rescoring_saved_chunks(runs, models, tmp_path, monkeypatch):
    """A new setting (the base's evaluation and windows come from the module's cache): killed at its third chunk
    scoring (its first look saved), the rerun scores only what was not saved."""
    import os

    from debias_plugin.sweep import run_sweep, sequential_eval

    cache = Path(os.environ["DEBIAS_CACHE_DIR"])
    path = _sweep_file(tmp_path, models, "sequential", lambdas="0.6")
    command = ["sweep", str(path), "--out", str(tmp_path / "out")]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_CHUNK, "3", *command], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    from debias_plugin.evaluation import cache_key

    def point_files() -> dict[str, set]:
        """The screened point's saved units per store file (its model by content, as the cache keys it)."""
        model = tmp_path / "out" / "trials" / "lambda_0.6" / "model"
        found = {}
        for task in ("crows_bias_gender", "wikitext2_ppl"):
            folder = cache / "documents" / cache_key(model, [task], model_args={}, limit=8)
            for file in folder.glob("*.json"):
                found[file.name] = {int(index) for index in json.loads(file.read_text())}
        return found

    saved = point_files()
    assert saved and all(saved.values()), "the killed run saved the point's first chunk"
    rescored, score = [], sequential_eval.UnitScorer._score

    def counting(self, task, unit, indices):
        if self.model_dir.name == "model":
            rescored.append((f"{task}.{unit}.json", set(indices)))
        return score(self, task, unit, indices)

    monkeypatch.setattr(sequential_eval.UnitScorer, "_score", counting)
    run_sweep(path, tmp_path / "out")
    assert rescored, "the rerun scores the chunks the killed run had not saved"
    for name, indices in rescored:  # a saved chunk is never scored again
        assert not indices & saved.get(name, set()), name
    content = _content(tmp_path / "out")
    screened = content["stopped"] + [p["screening"] for p in content["points"] if "screening" in p]
    assert len(screened) == 1 and screened[0]["documents_scored"]["wikitext2_ppl"] > max(
        len(indices) for name, indices in saved.items() if name.startswith("wikitext2_ppl"))


def test_budget_search_reads_a_stopped_point_as_over_budget(runs, models, tmp_path):
    """The bisection's points are screened on the budget: lambda 1 stops over budget (an infeasible observation,
    no values), and the search ends where the `evaluation: full` search ends, with the same numbers."""
    from debias_plugin.sweep import run_sweep

    found = {}
    for mode in ("sequential", "full"):
        (tmp_path / mode).mkdir()
        path = tmp_path / mode / "sweep.yml"
        path.write_text(SWEEP.format(base=models[0], biased=models[1], budget=BUDGET, evaluation=mode, lambdas="0")
                        .replace("grid: {lambda: [0]}", "search: {lambda: [0, 1]}\nmax_evaluations: 3"))
        found[mode] = _content(run_sweep(path, tmp_path / mode / "out"))
    sequential, full = found["sequential"], found["full"]
    assert [(p["name"], p["verdict"]) for p in sequential["stopped"]] == [("lambda_1", "violated")]
    assert not next(p for p in full["points"] if p["name"] == "lambda_1")["feasible"]
    keys = ("finished", "evaluations", "bracket", "best_value", "reason")
    assert {k: sequential["search"][k] for k in keys} == {k: full["search"][k] for k in keys}
    assert sequential["search"]["finished"]
    assert sequential["best_name"] == full["best_name"]
    for point in sequential["points"]:
        assert point["metrics"] == next(p for p in full["points"] if p["name"] == point["name"])["metrics"]
