"""Metric specs: every metric our tasks report is declared, each center is the scorer's own no-bias value, the gate
and the sweep read centers and estimators from the specs, and BBQ's bias scores get intervals equal to lm-eval's."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from debias_plugin.errors import DebiasError
from debias_plugin.paths import tasks_dir
from debias_plugin.scoring import specs
from debias_plugin.scoring.bbq import BBQ_CATEGORIES, amb_bias_score, disamb_bias_score
from debias_plugin.scoring.specs import SPECS, MetricSpec, find_spec, spec

DOCS_RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


class _TaskYaml(yaml.SafeLoader):
    """lm-eval task YAML: !function tags read as their text (only the metric names matter here)."""


_TaskYaml.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _yaml_metrics(path: Path) -> set[str]:
    document = yaml.load(path.read_text(), Loader=_TaskYaml) or {}
    return {entry["metric"] for key in ("metric_list", "aggregate_metric_list") for entry in document.get(key) or []}


def _lm_eval_bbq_yaml() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "bbq" / "bbq_multiple_choice.yaml"


def _summary_metrics(document) -> set[str]:
    """Metric names of every per-point summary entry ({"task/metric": {"value": ...}}) in a saved sweep."""
    found = set()
    if isinstance(document, dict):
        for key, value in document.items():
            if isinstance(value, dict) and "value" in value and key.count("/") == 1:
                found.add(key.split("/")[1])
            found |= _summary_metrics(value)
    elif isinstance(document, list):
        for value in document:
            found |= _summary_metrics(value)
    return found


# --- every metric is declared --------------------------------------------------------------------------------


def test_every_metric_the_bundled_tasks_report_has_a_spec():
    """Our task YAMLs, lm-eval's bbq (bbq_local runs it) and every metric in the committed sweep results."""
    names = set()
    for path in [*tasks_dir().rglob("*.yaml"), *tasks_dir().rglob("*_yaml"), _lm_eval_bbq_yaml()]:
        names |= _yaml_metrics(path)
    for path in DOCS_RESULTS.glob("*_sweep.json"):
        names |= _summary_metrics(json.loads(path.read_text()))
    assert {"pct_stereotype", "ss_gap_religion", "icat_race", "word_perplexity", "amb_bias_score",
            "amb_bias_score_SES"} <= names  # the collection found the tasks
    assert sorted(name for name in names if find_spec(name) is None) == []


def test_bbq_categories_are_lm_evals():
    reported = {name[len("amb_bias_score_"):] for name in _yaml_metrics(_lm_eval_bbq_yaml())
                if name.startswith("amb_bias_score_")}
    assert reported == set(BBQ_CATEGORIES)


def test_domain_names_are_declared_from_the_data_package_lists():
    from debias_plugin.data import STEREOSET_DOMAINS
    from debias_plugin.data.crows import DIRECTIONS

    for domain in STEREOSET_DOMAINS:
        assert spec(f"ss_{domain}").domain == domain and spec(f"icat_{domain}").part == "icat"
        assert spec(f"ss_gap_{domain}").gap_of == f"ss_{domain}"
    assert {spec(f"pct_stereotype_{d}").documents for d in DIRECTIONS} == {"marked"}
    assert find_spec("ss_gap_weather") is None and find_spec("pct_stereotype_other") is None  # no prefix matching


def test_find_spec_takes_a_filter_suffix_and_spec_names_the_unknown_metric():
    assert find_spec("pct_stereotype,none") is spec("pct_stereotype")
    with pytest.raises(DebiasError, match="no metric spec for 'exact_match'.*scoring/specs.py"):
        spec("exact_match,strict-match")


def test_specs_import_nothing_heavy():
    code = ("import sys, debias_plugin.scoring.specs; "
            "print(sorted({'lm_eval', 'click', 'torch', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- each center is where the scorer puts "no bias" ------------------------------------------------------------


def _no_bias_values() -> dict[str, float]:
    """Each centered metric family computed by its own scorer on an input with no preference either way."""
    from debias_plugin.scoring.crows import mean_of_marked, pct_stereotype
    from debias_plugin.scoring.stereoset import ScoredExample, stereoset_scores

    crows = pct_stereotype([(-1.0, -2.0), (-2.0, -1.0)])
    ss = stereoset_scores([ScoredExample("t", -1.0, -2.0, -3.0), ScoredExample("t", -2.0, -1.0, -3.0)]).ss
    return {"proportion": crows, "marked": mean_of_marked([(100.0, True), (0.0, True)]), "stereoset": ss,
            "bbq_amb_bias": float(amb_bias_score([0.0, 0.0], [1.0, 0.0], [1.0, 1.0])),
            "bbq_disamb_bias": float(disamb_bias_score([1.0, 0.0], [1.0, 1.0]))}


def test_every_center_is_the_scorers_no_bias_value():
    """A wrongly centered spec (0.5 for a percentage, 50 for a bias score) fails here."""
    no_bias = _no_bias_values()
    centered = [s for s in SPECS.values() if s.centered]
    assert len(centered) > 20
    for metric in centered:
        family = "marked" if metric.documents == "marked" else metric.estimator
        assert metric.distance(no_bias[family]) == 0.0, metric


def test_a_centered_proportion_must_be_centered_on_half_its_scale():
    """farther_from_half's exact test assumes center = scale / 2; a spec that breaks it cannot be declared."""
    with pytest.raises(ValueError, match="center = scale / 2"):
        dataclasses.replace(spec("pct_stereotype"), center=0.5)
    with pytest.raises(ValueError, match="center exactly when"):
        MetricSpec("x", "x", "high", "documents", "mean", "paired_bootstrap", center=0.0)


def test_a_gap_is_the_distance_from_its_sources_center():
    from debias_plugin.scoring.gap import gap_source

    for metric in SPECS.values():
        if metric.gap_of:
            source = spec(metric.gap_of)
            assert source.centered and metric.ideal == "low" and gap_source(metric.name) == source.name
            assert source.distance(62.5) == 12.5 and source.distance(37.5) == 12.5


def test_the_gate_reads_the_center_from_the_spec(tmp_path, monkeypatch):
    """Move ss's center and the gate's comparison moves with it: the gate guesses nothing from the values."""
    from test_gate import DATE, gate_file, make_results, perplexity_docs, stereoset_rows, wins, write_results

    from debias_plugin.gate import run_gate

    write_results(tmp_path / "base", make_results({"gender": wins(150)}, stereoset_rows(np.random.default_rng(1)),
                                                  perplexity_docs()))
    write_results(tmp_path / "candidate", make_results({"gender": wins(150)}, stereoset_rows(
        np.random.default_rng(1), flip=40), perplexity_docs()))
    gate = gate_file(tmp_path, f"""
        results: candidate/results_{DATE}.json
        baseline: base/results_{DATE}.json
        resamples: 300
        checks:
          - metric: stereoset_bias/ss
            not_worse_than_baseline: true
    """)
    check = run_gate(gate).checks[0]
    assert check.delta_label == "Δ|x-50|" and not check.passed  # 40 more stereotype wins: farther from 50
    moved = dataclasses.replace(SPECS["ss"], center=100.0)
    monkeypatch.setitem(SPECS, "ss", moved)
    check = run_gate(gate).checks[0]
    assert check.delta_label == "Δ|x-100|" and check.passed  # nearer to a (wrong) ideal of 100


# --- estimators come from the spec, not from the values ------------------------------------------------------


def _results(task: str, entry: dict, rows: list[dict]):
    from debias_plugin.gate.results import Results

    return Results("fixture", {"results": {task: entry}}, {task: rows})


def test_values_that_do_not_fit_the_declared_estimator_give_a_point_estimate_with_a_note():
    from debias_plugin.gate.results import metric_samples

    rows = [{"doc_id": i, "pct_stereotype": 0.5 * i, "likelihood_diff": 1.0} for i in range(4)]
    results = _results("crows_bias_gender", {"pct_stereotype,none": 75.0, "likelihood_diff,none": 1.0}, rows)
    samples, note = metric_samples(results, "crows_bias_gender", "pct_stereotype")
    assert samples is None and "do not fit pct_stereotype's proportion estimator" in note
    samples, _ = metric_samples(results, "crows_bias_gender", "likelihood_diff")
    assert samples.kind == "mean" and samples.unit_name == "pairs"
    rows = [{"doc_id": i, "exact_match": float(i % 2)} for i in range(4)]
    samples, note = metric_samples(_results("other", {"exact_match,none": 0.5}, rows), "other", "exact_match")
    assert samples is None and note == "no metric spec for 'exact_match'"  # 0/1 values are not read as outcomes


# --- BBQ's bias scores: lm-eval's aggregation, resampled over ambiguous-context documents ------------------------


def _bbq_rows(rng, n: int, p_disambiguated: float = 0.5, category: str = "Religion") -> list[dict]:
    """lm-eval bbq per-document values as its samples file holds them (mask_disambiguated saved as "True"/"False",
    NaN in the per-category metrics of the other categories)."""
    rows = []
    for i in range(n):
        non_unknown = float(rng.random() < 0.7)
        biased = float(non_unknown and rng.random() < 0.6)
        acc, disambiguated = float(rng.random() < 0.5), bool(rng.random() < p_disambiguated)
        item = [acc, biased, non_unknown, str(disambiguated)]
        row = {"doc_id": i, "doc_hash": f"bbq-{i}", "filter": "none", "acc": acc,
               "accuracy_amb": [acc, str(disambiguated)], "accuracy_disamb": [acc, str(disambiguated)],
               "amb_bias_score": item, "disamb_bias_score": item}
        for other in BBQ_CATEGORIES:
            row[f"amb_bias_score_{other}"] = item if other == category else [acc, math.nan, math.nan, math.nan]
        rows.append(row)
    return rows


def _lm_eval_tuple(value):
    """A saved value back in the in-memory form lm-eval's aggregation receives."""
    *numbers, mask = value
    return (*numbers, np.array(mask == "True", dtype=bool) if isinstance(mask, str) else mask)


def _bbq_entry(rows) -> dict:
    from lm_eval.tasks.bbq.utils import agg_accuracy_amb, agg_amb_bias_scores, agg_disamb_bias_scores

    column = {name: [_lm_eval_tuple(row[name]) for row in rows]
              for name in ("accuracy_amb", "amb_bias_score", "disamb_bias_score", "amb_bias_score_Religion")}
    return {"acc,none": float(np.mean([row["acc"] for row in rows])),
            "accuracy_amb,none": float(agg_accuracy_amb(column["accuracy_amb"])),
            "amb_bias_score,none": float(agg_amb_bias_scores(column["amb_bias_score"])),
            "disamb_bias_score,none": float(agg_disamb_bias_scores(column["disamb_bias_score"])),
            "amb_bias_score_Religion,none": float(agg_amb_bias_scores(column["amb_bias_score_Religion"]))}


@pytest.mark.parametrize("seed", range(40))
def test_bbq_statistics_on_all_documents_equal_lm_evals_aggregations(seed):
    from debias_plugin.gate.results import metric_samples

    rng = np.random.default_rng(seed)
    rows = _bbq_rows(rng, int(rng.integers(3, 60)), p_disambiguated=rng.random())
    rows += [{**row, "doc_id": 1000 + i, "amb_bias_score_Religion": [1.0, math.nan, math.nan, math.nan]}
             for i, row in enumerate(_bbq_rows(rng, 5))]  # documents of another category
    entry = _bbq_entry(rows)
    results = _results("bbq", entry, rows)
    for metric in ("acc", "accuracy_amb", "amb_bias_score", "disamb_bias_score", "amb_bias_score_Religion"):
        samples, note = metric_samples(results, "bbq", metric)
        expected = entry[f"{metric},none"]
        if samples is None:  # no document of that context condition in this draw: lm-eval's NaN
            assert note.startswith("no ") and math.isnan(expected), (metric, note)
            continue
        assert float(samples.statistic()(np.arange(samples.units))) == pytest.approx(expected, abs=1e-12), metric


def test_bbq_amb_bias_score_vectorizes_over_resampled_rows():
    rng = np.random.default_rng(0)
    acc, biased = rng.integers(0, 2, 30).astype(float), rng.integers(0, 2, 30).astype(float)
    non_unknown = np.maximum(biased, rng.integers(0, 2, 30))
    draws = rng.integers(0, 30, (7, 30))
    together = amb_bias_score(acc[draws], biased[draws], non_unknown[draws])
    one_by_one = [float(amb_bias_score(acc[d], biased[d], non_unknown[d])) for d in draws]
    assert together.shape == (7,) and list(together) == one_by_one


def _bbq_results(rows) -> dict:
    entry = _bbq_entry(rows)
    return {"results": {"bbq_local": {key: value for key, value in entry.items() if "Religion" not in key},
                        "bbq": entry},
            "group_subtasks": {"bbq_local": ["bbq"]}, "samples": {"bbq": rows}}


def test_gate_checks_bbq_amb_bias_score_with_an_interval_and_a_verdict(tmp_path):
    from test_gate import DATE, gate_file, write_results

    from debias_plugin.gate import run_gate

    base_rows = _bbq_rows(np.random.default_rng(5), 400)
    worse_rows = [dict(row) for row in base_rows]
    for row in worse_rows[:120]:  # the candidate answers the biased person wrongly on ambiguous questions
        if row["amb_bias_score"][3] == "False":
            row["amb_bias_score"] = row["disamb_bias_score"] = [0.0, 1.0, 1.0, "False"]
            row["acc"], row["accuracy_amb"] = 0.0, [0.0, "False"]
    write_results(tmp_path / "base", _bbq_results(base_rows))
    write_results(tmp_path / "candidate", _bbq_results(worse_rows))
    gate = gate_file(tmp_path, f"""
        results: candidate/results_{DATE}.json
        baseline: base/results_{DATE}.json
        resamples: 500
        checks:
          - metric: bbq_local/amb_bias_score
            within: [-0.1, 0.1]
          - metric: bbq/amb_bias_score
            not_worse_than_baseline: true
          - metric: bbq/accuracy_amb
            not_worse_than_baseline: true
    """)
    report = run_gate(gate)
    amb, paired, accuracy = report.checks
    assert amb.interval is not None and amb.interval.low < amb.value < amb.interval.high
    assert amb.interval.method == "percentile bootstrap over documents, B=500" and not amb.note
    assert not amb.passed and amb.value > 0.1  # more biased wrong answers
    assert paired.delta_label == "Δ|x-0|" and paired.delta_interval.low > 0 and not paired.passed
    assert accuracy.method.startswith("exact McNemar") and not accuracy.passed

    same = run_gate(gate_file(tmp_path, f"""
        results: base/results_{DATE}.json
        baseline: base/results_{DATE}.json
        checks:
          - metric: bbq/amb_bias_score
            not_worse_than_baseline: true
    """, "same.yml")).checks[0]
    assert same.passed and same.delta == 0.0


def test_sweep_summary_gives_bbq_bias_scores_an_interval():
    from debias_plugin.sweep.metrics import summarize

    summary = summarize(_bbq_results(_bbq_rows(np.random.default_rng(2), 200)), alpha=0.05, resamples=300, seed=0)
    for metric in ("bbq_local/amb_bias_score", "bbq/amb_bias_score_Religion", "bbq/disamb_bias_score"):
        entry = summary[metric]
        assert entry["low"] <= entry["value"] <= entry["high"] and entry["method"].startswith("percentile bootstrap")
    assert summary["bbq/accuracy_amb"]["method"] == "Clopper-Pearson"


def test_gate_on_lm_evals_own_bbq_results_of_a_tiny_model(tmp_path, tiny_model, data_dir):
    """lm-eval's bbq on local rows, its samples saved as lm-eval saves them: the gate's interval needs no guess."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable
    from test_gate import gate_file

    from debias_plugin.gate import run_gate

    model = tiny_model("gpt2")
    manager = TaskManager(include_path=str(tasks_dir()), metadata={"pretrained": str(model)})
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model}", tasks=["bbq_local"], limit=24,
                                      task_manager=manager, log_samples=True, device="cpu", batch_size=16)
    folder = tmp_path / "results"
    folder.mkdir()
    saved = {key: results[key] for key in ("results", "group_subtasks", "higher_is_better", "n-samples")}
    (folder / "results.json").write_text(json.dumps(saved, default=handle_non_serializable))
    (folder / "samples_bbq.jsonl").write_text("".join(json.dumps(row, default=handle_non_serializable) + "\n"
                                                      for row in results["samples"]["bbq"]))
    check = run_gate(gate_file(tmp_path, """
        results: results/results.json
        checks:
          - metric: bbq_local/amb_bias_score
            within: [-1, 1]
    """)).checks[0]
    assert check.passed and check.interval is not None and not check.note
    assert check.value == pytest.approx(results["results"]["bbq"]["amb_bias_score,none"])
