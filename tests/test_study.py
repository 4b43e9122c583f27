"""`debias study`: two tiny models x (a prepared bias fine-tune negated, a checkpoint sweep), one table.

The table's numbers are checked against the lm-eval results files the sweeps wrote (not against the sweep's own
summary), the gap reductions against |x - 50| computed here, and a rerun resumes without training or evaluating.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from debias_plugin.errors import DebiasError
from debias_plugin.study import load_study, render_study, run_study
from debias_plugin.data.crows import CROWS_TYPE_TASKS

EVALUATION = """\
evaluate: [crows_bias, wikitext2_ppl]
objective: crows_bias/pct_stereotype
budget: {wikitext2_ppl/word_perplexity: {max_relative_increase: 10.0}}
limit: 4
resamples: 100
"""
NEGATE_SWEEP = "base: default\nmethod: negate\nfixed: {biased: /not/yet}\ngrid: {lambda: [0.5, 1.0]}\n" + EVALUATION
FINETUNE_SWEEP = ("base: default\nmethod: finetune\nfixed: {corpus: CORPUS, batch_size: 2, max_length: 16, "
                  "lr: 1.0e-3}\ncheckpoints: [1, 2]\n" + EVALUATION)
STUDY = """\
name: tiny
models: {{gpt2: {gpt2}, llama: {llama}}}
prepare:
  biased: {{method: finetune, options: {{corpus: {corpus}, steps: 2, batch_size: 2, max_length: 16, lr: 1.0e-2}}}}
  capable: {{method: finetune, options: {{corpus: {corpus}, steps: 1, batch_size: 2, max_length: 16, lr: 1.0e-3}}}}
sweeps:
  negate: {{file: sweeps/negate.yml, fixed: {{biased: "@biased"}}}}
  finetune: {{file: sweeps/finetune.yml}}
  retain: {{file: sweeps/negate.yml, fixed: {{biased: "@biased", capability: "@capable", mu: 0.5}}}}
"""


@pytest.fixture(scope="module")
def study_run(tiny_model, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEBIAS_CACHE_DIR", str(tmp_path_factory.mktemp("study_cache")))
        folder = tmp_path_factory.mktemp("study")
        corpus = folder / "corpus.txt"
        corpus.write_text("\n".join(f"She said the {w} was ready at {i}." for i, w in enumerate(["cake", "car"] * 4)))
        (folder / "sweeps").mkdir()
        (folder / "sweeps" / "negate.yml").write_text(NEGATE_SWEEP)
        (folder / "sweeps" / "finetune.yml").write_text(FINETUNE_SWEEP.replace("CORPUS", str(corpus)))
        path = folder / "study.yml"
        path.write_text(STUDY.format(gpt2=tiny_model("gpt2"), llama=tiny_model("llama"), corpus=corpus))
        report = run_study(path, folder / "out")
        yield path, folder / "out", report


def _lm_eval_value(sweep_dir: Path, point_name: str, task: str) -> float:
    """pct_stereotype straight from the lm-eval results JSON the sweep's evaluation wrote for that point."""
    for name in ("results", "results_full"):
        for file in (sweep_dir / "trials" / point_name / name).rglob("results*.json"):
            results = json.loads(file.read_text())["results"]
            if task in results:
                return results[task]["pct_stereotype,none"]
    raise AssertionError(f"no {task} result for {point_name}")


def _copy_sweep_files(out: Path, folder: Path, keep=lambda model, label: True) -> None:
    """What docs/results keeps of a study (each sweep.json), laid out as a study folder."""
    for saved in out.glob("*/*/sweep.json"):
        if keep(saved.parent.parent.name, saved.parent.name):
            target = folder / saved.relative_to(out)
            target.parent.mkdir(parents=True)
            shutil.copy(saved, target)


def test_study_table_matches_the_sweeps_results(study_run):
    path, out, report = study_run
    rows = json.loads((out / "study.json").read_text())["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [(m, s) for m in ("gpt2", "llama")
                                                         for s in ("base", "negate", "finetune", "retain")]
    for row in rows:
        sweep_dir = out / row["model"] / ("negate" if row["method"] == "base" else row["method"])
        content = json.loads((sweep_dir / "sweep.json").read_text())
        name = "base" if row["method"] == "base" else content["best_name"]
        base_all = _lm_eval_value(sweep_dir, "base", "crows_bias")
        value = _lm_eval_value(sweep_dir, name, "crows_bias")
        assert row["metrics"]["crows_bias/pct_stereotype"]["value"] == pytest.approx(value)
        for task in CROWS_TYPE_TASKS:
            assert row["metrics"][f"{task}/pct_stereotype"]["value"] == pytest.approx(
                _lm_eval_value(sweep_dir, name, task))
        if row["method"] != "base" and abs(base_all - 50) > 0:
            assert row["gap_reduction_overall"] == pytest.approx(100 * (1 - abs(value - 50) / abs(base_all - 50)))
    derived = yaml.safe_load((out / "llama" / "negate.yml").read_text())
    assert derived["base"].endswith("llama")
    assert derived["fixed"]["biased"] == str(out / "llama" / "prepared" / "biased")
    text = report.read_text()
    assert text.count("| gpt2 |") == 4 and "gap cut % (all)" in text
    retained = json.loads((out / "gpt2" / "retain" / "trials" / "lambda_1" / "model" / "debias_manifest.json")
                          .read_text())
    assert retained["options"]["mu"] == 0.5 and retained["inputs"]["capability"]["path"].endswith("capable")
    assert (out / "plots" / "tradeoff_gpt2.png").is_file() and (out / "plots" / "tradeoff_llama.svg").is_file()


def test_every_bias_number_in_the_table_has_its_interval(study_run, tmp_path):
    """StereoSet's SS, LMS and ICAT are printed with their 95 % intervals, like CrowS; perplexity without."""
    path, out, _ = study_run
    _copy_sweep_files(out, tmp_path, keep=lambda model, label: label == "negate")
    saved = tmp_path / "gpt2" / "negate" / "sweep.json"
    content = json.loads(saved.read_text())
    best = next(point for point in content["points"] if point["name"] == content["best_name"])
    for name, (value, low, high) in {"ss": (61.337, 59.067, 63.706), "lms": (89.8, 88.6, 91.0),
                                     "icat": (69.47, 65.12, 73.76)}.items():
        best["metrics"][f"stereoset_bias/{name}"] = {"value": value, "low": low, "high": high}
    saved.write_text(json.dumps(content))
    render_study(tmp_path, load_study(path))
    header, *rows = [[cell.strip() for cell in line.split("|")[1:-1]]
                     for line in (tmp_path / "study.md").read_text().splitlines() if line.startswith("| ")]
    row = dict(zip(header, next(row for row in rows if row[:2] == ["gpt2", "negate"])))
    assert (row["SS"], row["LMS"], row["ICAT"]) == ("61.34 [59.1, 63.7]", "89.80 [88.6, 91.0]", "69.47 [65.1, 73.8]")
    assert "[" not in row["ppl"] and "[" in row["all"]


def test_the_table_renders_from_the_saved_sweep_files_alone(study_run, tmp_path):
    """What docs/results keeps of a study (each sweep.json) renders the same table, stage times included."""
    path, out, _ = study_run
    _copy_sweep_files(out, tmp_path)
    render_study(tmp_path, load_study(path))  # as `debias study FILE --out DIR --report-only` does
    assert (tmp_path / "study.csv").read_text() == (out / "study.csv").read_text()
    for plot in (out / "plots").iterdir():  # byte for byte, SVGs too: a committed plot changes only with its data
        assert (tmp_path / "plots" / plot.name).read_bytes() == plot.read_bytes(), plot.name
    stage_column = [row[-2] for row in list(csv.reader((out / "study.csv").open()))[1:]]
    assert sum(cell not in ("", "-") for cell in stage_column) >= 4, stage_column  # trained and merged points


@pytest.mark.parametrize("unfinished", ["planned point", "search"])
def test_a_sweep_stopped_partway_gives_its_base_but_no_choice(study_run, tmp_path, unfinished):
    """A partial sweep.json (`debias sweep report` after a kill) fills the base row; its row stays pending."""
    path, out, _ = study_run
    _copy_sweep_files(out, tmp_path, lambda model, label: model == "gpt2" or label == "negate")  # llama: negate only
    partial = tmp_path / "llama" / "negate" / "sweep.json"
    content = json.loads(partial.read_text())
    *scored, missing = content["points"]  # as if the run had stopped before its last point
    if unfinished == "search":  # a budget search that has not converged lists no planned points
        content.update(points=scored, search={**(content.get("search") or {}), "finished": False})
    else:
        content.update(points=scored, pending={"screen": [missing["name"]], "full": []})
    partial.write_text(json.dumps(content))
    render_study(tmp_path, load_study(path))
    rows = {(r["model"], r["method"]): r for r in json.loads((tmp_path / "study.json").read_text())["rows"]}
    assert rows[("llama", "negate")]["note"] == f"pending: stopped after {len(scored)} evaluated point(s)"
    assert "metrics" not in rows[("llama", "negate")]
    assert rows[("llama", "finetune")]["note"] == "pending: not run yet"
    full = {(r["model"], r["method"]): r for r in json.loads((out / "study.json").read_text())["rows"]}
    assert rows[("llama", "base")]["metrics"] == full[("llama", "base")]["metrics"]
    assert rows[("gpt2", "negate")] == full[("gpt2", "negate")]  # a finished sweep is untouched


def test_a_sweep_that_chose_its_base_has_no_stage_time(study_run, tmp_path):
    """A built-in base has default-model's manifest; its materialising time is not the method's stage time."""
    path, out, _ = study_run
    for saved in out.glob("*/*/sweep.json"):
        target = tmp_path / saved.relative_to(out)
        target.parent.mkdir(parents=True)
        content = json.loads(saved.read_text())
        assert all(p["role"] != "reference" or p["name"] not in content["run"]["stage_seconds"]
                   for p in content["points"])
        content["run"]["stage_seconds"]["base"] = 88.0  # as sweep.json files before the fix recorded it
        target.write_text(json.dumps(content))
    render_study(tmp_path, load_study(path))
    rows = {(r["model"], r["method"]): r for r in json.loads((tmp_path / "study.json").read_text())["rows"]}
    assert rows[("gpt2", "finetune")]["setting"] == "base"  # finetune's 2 steps at lr 1e-3 do not beat the base
    assert rows[("gpt2", "finetune")]["stage_seconds"] is None


def test_a_base_chosen_because_every_setting_broke_the_budget_says_so(study_run, tmp_path):
    """Gemma's PCGU and unlearning: the range starts past the budget, which is not "the method cannot help"."""
    from debias_plugin.sweep.plan import load_sweep
    from debias_plugin.sweep.render import markdown

    path, out, _ = study_run
    _copy_sweep_files(out, tmp_path)
    rewritten = tmp_path / "llama" / "finetune" / "sweep.json"
    content = json.loads(rewritten.read_text())
    (metric, rule), = content["points"][0]["budget"].items()
    for point, change in zip(content["points"][1:], (0.30, 0.10)):  # step 1 misses by 30 %, step 2 by 10 %
        value = rule["reference"] * (1 + change)
        point.update(feasible=False, best=False, pareto=False,
                     budget={metric: {**rule, "value": value, "limit": rule["reference"] * 1.01, "holds": False,
                                      "relative_change": change}})
    content["points"][0]["best"], content["best"] = True, content["points"][0]["key"]
    rewritten.write_text(json.dumps(content))
    render_study(tmp_path, load_study(path))
    rows = {(r["model"], r["method"]): r for r in json.loads((tmp_path / "study.json").read_text())["rows"]}
    assert rows[("llama", "finetune")]["setting"] == ("base (every setting tried breaks the budget; closest step=2 "
                                                      "at +10.0 %)")
    assert rows[("gpt2", "finetune")]["setting"] == "base"  # within the budget, only farther from the target
    report = markdown(load_sweep(out / "llama" / "finetune.yml"), content, content["run"], [])
    assert "every setting tried breaks the budget, the closest being `step_2`" in report
    assert "+10.0% vs base" in report and "no setting came closer" not in report


def test_no_closest_miss_is_claimed_while_a_setting_could_not_be_judged():
    from debias_plugin.sweep.results import closest_miss

    unjudged = {"holds": False, "value": None, "limit": 46.8, "relative_change": None}
    points = [{"role": "reference", "best": True, "error": None,
               "budget": {"ppl": {**unjudged, "holds": True, "value": 45.9, "relative_change": 0.0}}},
              {"role": "checkpoint", "best": False, "error": None, "budget": {"ppl": unjudged}}]
    assert closest_miss({"points": points}) is None  # a missing metric is no evidence of a broken budget
    points[1]["budget"]["ppl"] = {**unjudged, "value": 51.5, "relative_change": 0.12}
    assert closest_miss({"points": points}) is points[1]


@pytest.mark.parametrize("timings, expected", [({"merge_s": 0.039, "verify_s": 0.001}, 0.0),
                                                ({"wall_seconds": 12.5, "train_s": 11.0}, 12.5), ({}, None)])
def test_stage_time_of_a_fast_merge_is_zero_not_unknown(tmp_path, timings, expected):
    from debias_plugin.outputs import MANIFEST_NAME
    from debias_plugin.sweep.results import stage_seconds

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / MANIFEST_NAME).write_text(json.dumps({"timings": timings}))
    assert stage_seconds(tmp_path, {"role": "search", "model": "model"}) == expected


def test_rerun_resumes_without_training_or_evaluating(study_run, monkeypatch):
    import debias_plugin.evaluation as evaluation
    import debias_plugin.training as training

    path, out, _ = study_run
    before = (out / "study.csv").read_text()
    prepared = out / "gpt2" / "prepared" / "biased" / "debias_manifest.json"
    stamp = prepared.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed study must not train")

    monkeypatch.setattr(training, "train", refuse)
    monkeypatch.setattr(evaluation, "evaluate", refuse)
    run_study(path, out)
    assert prepared.stat().st_mtime_ns == stamp
    assert (out / "study.csv").read_text() == before


def test_only_runs_part_and_marks_the_rest_pending(study_run, tmp_path):
    path, _, _ = study_run
    run_study(path, tmp_path / "part", only=["gpt2/negate"])
    rows = {(r["model"], r["method"]): r for r in json.loads((tmp_path / "part" / "study.json").read_text())["rows"]}
    assert "metrics" in rows[("gpt2", "negate")] and rows[("gpt2", "finetune")]["note"] == "pending: not run yet"
    assert not (tmp_path / "part" / "gpt2" / "prepared" / "capable").exists()  # only what the chosen part reads
    assert rows[("llama", "negate")]["note"] == "pending: not run yet"
    assert not (tmp_path / "part" / "llama").exists()
    with pytest.raises(DebiasError, match="--only gpt3"):
        run_study(path, tmp_path / "part", only=["gpt3"])
    run_study(path, tmp_path / "fresh", only=["llama/finetune"])  # no prepared stage makes the model's folder
    assert (tmp_path / "fresh" / "llama" / "finetune" / "sweep.json").is_file()


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.replace("name: tiny", "name: tiny\ncolour: red"), "line 2, field 'colour'"),
    (lambda s: s.replace('"@biased"', '"@missing"'), "@missing names no prepare entry"),
    (lambda s: s.replace("sweeps/finetune.yml", "sweeps/nothing.yml"), "does not exist"),
    (lambda s: s.replace("steps: 2,", "steps: -2,"), "prepare.biased"),
    (lambda s: s.replace("method: finetune", "method: dpo"), "prepare.biased"),
    (lambda s: s.replace("  capable:", "  ../capable:").replace("@capable", "@../capable"),
     "line 5, field 'prepare.../capable': labels use letters"),  # a prepared stage's name is a folder name
    (lambda s: s.replace("{file: sweeps/finetune.yml}", "{fiel: sweeps/finetune.yml}"),
     "field 'sweeps.finetune.fiel': unknown key 'fiel'; allowed keys: file, method, fixed, models"),
    (lambda s: s.replace("name: tiny", "name: tiny\nobjective: pct_stereotype"),
     "line 2, field 'objective': expected task/metric"),
    (lambda s: s.replace("name: tiny", "name: tiny\nbudget: {wikitext2_ppl/word_perplexity: {max_relative: 0.02}}"),
     "line 2, field 'budget.wikitext2_ppl/word_perplexity.max_relative': unknown key 'max_relative'; allowed keys: "
     "max_relative_increase, max, min"),  # the study's own line, not one of a derived sweep file
    (lambda s: s.replace("{file: sweeps/finetune.yml}", "{file: sweeps/finetune.yml, models: {gpt3: {}}}"),
     "field 'sweeps.finetune.models.gpt3': 'gpt3' is not one of the study's models (gpt2, llama)"),
    (lambda s: s.replace("{file: sweeps/finetune.yml}", "{file: sweeps/finetune.yml, models: {gpt2: {base: x}}}"),
     "field 'sweeps.finetune.models.gpt2.base': the study sets 'base' for every model"),
    (lambda s: s.replace("{file: sweeps/finetune.yml}", "{file: sweeps/finetune.yml, models: {gpt2: {checkpoints: "
                         "[0]}}}"), "sweeps.finetune (from"),  # the derived sweep's own check, for that model
])
def test_bad_study_files_name_the_line_and_field(study_run, tmp_path, edit, expected):
    path, _, _ = study_run
    bad = path.parent / "bad.yml"
    bad.write_text(edit(path.read_text()))
    with pytest.raises(DebiasError, match=re.escape(expected)):
        load_study(bad).plan(tmp_path / "out")
    result = subprocess.run([sys.executable, "-c", "from debias_plugin.cli import main; main()", "study", str(bad),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr and expected.split("'")[0] in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_another_study_needs_force(study_run, tmp_path):
    path, _, _ = study_run
    other = tmp_path / "out"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DebiasError, match="does not hold a study"):
        run_study(path, other)
    assert (other / "notes.txt").read_text() == "mine"


def test_a_prepared_stage_with_changed_options_is_not_reused(study_run):
    path, out, _ = study_run
    edited = path.parent / "edited.yml"
    edited.write_text(path.read_text().replace("steps: 2, batch_size: 2", "steps: 3, batch_size: 2"))
    with pytest.raises(DebiasError, match=r"prepared/biased was made with other options \(steps\)"):
        run_study(edited, out, only=["gpt2/negate"])


def test_one_objective_and_budget_for_every_sweep(study_run, tmp_path):
    path, _, _ = study_run
    ruled = path.parent / "ruled.yml"
    ruled.write_text(path.read_text() + "objective: crows_bias_gender/pct_stereotype\n"
                     "budget: {wikitext2_ppl/word_perplexity: {max_relative_increase: 0.01}}\n")
    for parts in load_study(ruled).plan(tmp_path / "out").values():
        for sweep in parts["sweeps"].values():
            assert sweep.config.objective == "crows_bias_gender/pct_stereotype"
            assert sweep.config.budget["wikitext2_ppl/word_perplexity"].max_relative_increase == 0.01


def test_the_shipped_sweep_and_study_files_are_valid(tmp_path):
    """sweeps/*.yml and studies/*.yml validate as shipped (they are only run on real models, outside CI)."""
    from debias_plugin.sweep.plan import load_sweep

    repo = Path(__file__).resolve().parents[1]
    for path in sorted((repo / "sweeps").glob("*.yml")):
        assert load_sweep(path).config.name == path.stem
    for path in sorted((repo / "studies").glob("*.yml")):
        study = load_study(path)
        plan = study.plan(tmp_path / path.stem)
        assert {label for parts in plan.values() for label in parts["sweeps"]} == set(study.config.sweeps)


def test_a_sweep_can_take_other_settings_for_one_model(tmp_path):
    """Per-model keys replace the sweep file's (fixed is merged, "@NAME" resolved); other models keep the file's."""
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "finetune.yml").write_text(FINETUNE_SWEEP.replace("CORPUS", "corpus.txt"))
    (tmp_path / "sweeps" / "negate.yml").write_text(NEGATE_SWEEP)
    path = tmp_path / "study.yml"
    path.write_text(STUDY.format(gpt2="/models/gpt2", llama="/models/llama", corpus="corpus.txt").replace(
        "{file: sweeps/finetune.yml}", "{file: sweeps/finetune.yml, models: {llama: {checkpoints: [1], "
        "fixed: {lr: 1.0e-4}}}}").replace(
        '{file: sweeps/negate.yml, fixed: {biased: "@biased"}}',
        '{file: sweeps/negate.yml, fixed: {biased: "@biased"}, models: {llama: {fixed: {biased: "@capable"}}}}'))
    study = load_study(path)
    derived = {(model, label): yaml.safe_load(study.derived_sweep(model, label, tmp_path / "out"))
               for model in ("gpt2", "llama") for label in ("finetune", "negate")}
    assert derived["gpt2", "finetune"]["checkpoints"] == [1, 2] and derived["gpt2", "finetune"]["fixed"]["lr"] == 1e-3
    assert derived["llama", "finetune"]["checkpoints"] == [1] and derived["llama", "finetune"]["fixed"]["lr"] == 1e-4
    assert derived["llama", "finetune"]["fixed"]["batch_size"] == 2  # the file's other fixed options stay
    assert derived["gpt2", "negate"]["fixed"]["biased"] == str(tmp_path / "out" / "gpt2" / "prepared" / "biased")
    assert derived["llama", "negate"]["fixed"]["biased"] == str(tmp_path / "out" / "llama" / "prepared" / "capable")
    assert derived["llama", "finetune"]["base"] == "/models/llama"
    prepared = {model: set(study.plan(tmp_path / "out", only=[f"{model}/negate"])[model]["prepare"])
                for model in ("gpt2", "llama")}
    assert prepared == {"gpt2": {"biased"}, "llama": {"capable"}}  # what each model's own negation reads


# --- issue 38: choose on the selection half of CrowS-Pairs, report the held-out half -----------------------------

SELECTION = """\
name: heldout
selection: {split_seed: 0}
objective: crows_bias_overall_selection/type_mean_gap
target: 0
types_not_worse: true
models: {gpt2: GPT2}
sweeps:
  finetune: {file: sweeps/finetune.yml}
"""


def _selection_study(folder: Path, model: str, corpus: Path, text: str = SELECTION) -> Path:
    (folder / "sweeps").mkdir(exist_ok=True)
    (folder / "sweeps" / "finetune.yml").write_text(FINETUNE_SWEEP.replace("CORPUS", str(corpus)))
    path = folder / "study.yml"
    path.write_text(text.replace("GPT2", model))
    return path


def test_a_selection_study_screens_the_selection_half_and_evaluates_both(tmp_path):
    from debias_plugin.data.crows import CROWS_HALVES, crows_half_task

    study = load_study(_selection_study(tmp_path, "/models/gpt2", tmp_path / "corpus.txt"))
    derived = yaml.safe_load(study.derived_sweep("gpt2", "finetune", tmp_path / "out"))
    halves = [crows_half_task(half, overall=overall) for overall in (False, True) for half in CROWS_HALVES]
    assert derived["evaluate"] == halves + ["wikitext2_ppl"]
    assert derived["screen"] == ["crows_bias_overall_selection", "crows_bias_selection", "wikitext2_ppl"]
    assert (derived["objective"], derived["target"], derived["types_not_worse"]) == (
        "crows_bias_overall_selection/type_mean_gap", 0, True)
    assert not any("heldout" in task or task == "stereoset_bias" for task in derived["screen"])


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.replace("crows_bias_overall_selection/type_mean_gap", "crows_bias/pct_stereotype"),
     "line 3, field 'objective': 'crows_bias/pct_stereotype' reads CrowS-Pairs pairs outside the selection half"),
    (lambda s: s.replace("split_seed: 0", "split_seed: 1"), "line 2, field 'selection.split_seed': only seed 0"),
    (lambda s: s.replace("split_seed: 0", "seed: 0"), "line 2, field 'selection.seed'"),
    (lambda s: s.replace("objective: crows_bias_overall_selection/type_mean_gap\n", ""),
     "field 'selection': needs the study's objective"),
])
def test_a_selection_study_refuses_what_would_leak_the_held_out_half(tmp_path, edit, expected):
    path = _selection_study(tmp_path, "/models/gpt2", tmp_path / "corpus.txt", edit(SELECTION))
    with pytest.raises(DebiasError) as err:
        load_study(path)
    assert expected in str(err.value)


def _outcome_results(model: str, half: str) -> dict:
    """lm-eval-shaped results of one half's per-type tasks from the committed per-pair outcomes of issue 38."""
    from debias_plugin.data.crows import crows_half_task, crows_split, load_crows_pairs

    data = json.loads((Path(__file__).resolve().parents[1] / "docs" / "results"
                       / "issue38_crows_outcomes_smollm2.json").read_text())
    kept = {pair.index for pair in crows_split(load_crows_pairs(), seed=0)[half]}
    results, samples = {}, {}
    for (pair_id, type_index), outcome in zip(data["pairs"], data["outcomes"][model]):
        if pair_id in kept:
            rows = samples.setdefault(crows_half_task(half, data["types"][type_index]), [])
            rows.append({"doc_id": len(rows), "filter": "none", "pct_stereotype": 100.0 * int(outcome)})
    for task, rows in samples.items():
        results[task] = {"pct_stereotype,none": sum(row["pct_stereotype"] for row in rows) / len(rows)}
    return {"results": results, "samples": samples}


def test_types_not_worse_on_the_selection_half_refuses_the_landed_unlearning_choice(data_dir):
    """The sweep's check (gate.types on the screen's selection half): race_color 46.9 -> 36.0 there; the base passes."""
    from types import SimpleNamespace

    from debias_plugin.sweep import metrics

    sweep = SimpleNamespace(config=SimpleNamespace(types_not_worse=True, alpha=0.05, resamples=1000, seed=0,
                                                   budget={}))
    base, unlearn = _outcome_results("base", "selection"), _outcome_results("unlearn", "selection")
    refused = metrics.types_check(unlearn, base, sweep)
    assert not refused["passed"] and len(refused["tested"]) == 9
    assert [(t["name"], round(t["reference"], 1), round(t["value"], 1)) for t in refused["worse"]] == [
        ("crows race-color", 46.9, 36.0)]
    assert refused["worse"][0]["adjusted_p"] < 0.01
    accepted = metrics.types_check(base, base, sweep)
    assert accepted["passed"] and metrics.types_hold(accepted, sweep) and not metrics.types_hold(refused, sweep)
    assert not metrics.types_hold(None, sweep)  # asked for and not judged: infeasible
    assert metrics.constraints({}, {}, sweep, refused) == {"types_not_worse": 1.0}
    assert metrics.constraints({}, {}, sweep, None) is None
    off = SimpleNamespace(config=SimpleNamespace(types_not_worse=False, budget={}))
    assert metrics.types_check(unlearn, base, off) is None and metrics.types_hold(None, off)


def test_a_selection_study_table_reports_the_held_out_half(tiny_model, tmp_path, monkeypatch):
    """The headline CrowS columns are the held-out tasks' lm-eval values; the selection half has its own columns."""
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"She said the {w} was ready at {i}." for i, w in enumerate(["cake", "car"] * 4)))
    path = _selection_study(tmp_path, str(tiny_model("gpt2")), corpus, SELECTION.replace("types_not_worse: true\n", ""))
    report = run_study(path, tmp_path / "out")
    rows = list(csv.reader(io.StringIO((report.parent / "study.csv").read_text())))
    header, base = rows[0], rows[1]
    assert header[3:5] == ["held-out all", "race_color"]
    assert header[13:17] == ["type-mean gap", "worst-type gap", "selection all", "selection type-mean gap"]
    sweep_dir = tmp_path / "out" / "gpt2" / "finetune"
    content = json.loads((sweep_dir / "sweep.json").read_text())
    best = next(point for point in content["points"] if point["best"])
    assert content["tasks"]["screen"] == ["crows_bias_overall_selection", "wikitext2_ppl"]  # never the held-out half
    chosen = next(row for row in rows[1:] if row[1] == "finetune")
    assert base[1] == "base" and float(base[15].split()[0]) == pytest.approx(
        _lm_eval_value(sweep_dir, "base", "crows_bias_overall_selection"), abs=0.005)
    for column, task in ((3, "crows_bias_heldout"), (4, "crows_bias_heldout_race_color"),
                         (15, "crows_bias_overall_selection")):
        assert float(chosen[column].split()[0]) == pytest.approx(_lm_eval_value(sweep_dir, best["name"], task),
                                                                 abs=0.005)
        assert "[" in chosen[column]  # every bias number with its interval
    assert "[" in chosen[13] and "[" in chosen[16]
    assert "held-out all" in report.read_text() and "selection half" in report.read_text()
