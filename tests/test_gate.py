"""debias gate: every check type passes and fails where it should, statistics equal scipy's own functions, bad gate
files exit 2 naming file/line/field, the JUnit XML validates, the markdown renders as a table, the cache answers."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from debias_plugin.cli import main
from debias_plugin.gate import run_gate
from debias_plugin.gate.report import markdown_summary

DATE = "2025-01-02T03-04-05.678901"
SEED, RESAMPLES = 0, 2000
GENDER_PAIRS = 262


# --- fixture results, shaped as lm-eval reports them; reported values computed here from the definitions -----


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


def crows_task(name: str, wins: list[bool]) -> tuple[dict, list[dict]]:
    """A crows_bias_<type> task: per-pair 0/100 outcomes, every third pair antistereo, diffs 1..4."""
    stereo = [i % 3 != 0 for i in range(len(wins))]
    diffs = [1.0 + (i % 7) / 2 for i in range(len(wins))]
    rows = []
    for i, (won, is_stereo, diff) in enumerate(zip(wins, stereo, diffs)):
        value = 100.0 if won else 0.0
        rows.append({"doc_id": i, "doc_hash": f"{name}-{i}", "filter": "none", "pct_stereotype": value,
                     "likelihood_diff": diff, "pct_stereotype_stereo": [value, is_stereo],
                     "pct_stereotype_antistereo": [value, not is_stereo]})
    entry = {"alias": name, "pct_stereotype,none": 100.0 * sum(wins) / len(wins),
             "likelihood_diff,none": _mean(diffs),
             "pct_stereotype_stereo,none": _mean([100.0 * w for w, s in zip(wins, stereo) if s]),
             "pct_stereotype_antistereo,none": _mean([100.0 * w for w, s in zip(wins, stereo) if not s])}
    return entry, rows


def stereoset_reference(rows, domain=None) -> dict:
    """SS / LMS / ICAT straight from Nadeem et al.: per-target percentages, unweighted mean over targets."""
    per_target: dict[str, list] = {}
    for target, row_domain, stereotype, anti, unrelated in rows:
        if domain in (None, row_domain):
            per_target.setdefault(target, []).append((stereotype, anti, unrelated))
    ss = _mean([100.0 * sum(s > a for s, a, _ in items) / len(items) for items in per_target.values()])
    lms = _mean([100.0 * sum((s > u) + (a > u) for s, a, u in items) / (2 * len(items))
                 for items in per_target.values()])
    return {"ss": ss, "lms": lms, "icat": lms * min(ss, 100 - ss) / 50}


def stereoset_rows(rng, *, targets=40, per_target=12, p_stereo=0.5, p_related=0.95, flip=0) -> list[tuple]:
    """Scored examples; `flip` turns that many anti-stereotype wins into stereotype wins (the same draw otherwise)."""
    rows = []
    for t in range(targets):
        domain = ("gender", "race")[t % 2]
        for _ in range(per_target):
            pro, related = rng.random() < p_stereo, rng.random() < p_related
            rows.append([f"target{t:02d}", domain, -1.0 if pro else -2.0, -2.0 if pro else -1.0,
                         -3.0 if related else 0.0])
    for row in [row for row in rows if row[2] < row[3]][:flip]:
        row[2], row[3] = row[3], row[2]
    return [tuple(row) for row in rows]


def stereoset_task(rows) -> tuple[dict, list[dict]]:
    entry = {"alias": "stereoset_bias"}
    for domain in (None, "gender", "race"):
        for metric, value in stereoset_reference(rows, domain).items():
            entry[f"{metric}{'_' + domain if domain else ''},none"] = value
    names = [key.split(",")[0] for key in entry if "," in key]
    records = [{"doc_id": i, "doc_hash": f"ss-{i}", "filter": "none", **{name: list(row) for name in names}}
               for i, row in enumerate(rows)]
    return entry, records


def wikitext_task(loglikelihoods, words) -> tuple[dict, list[dict]]:
    sizes = [6 * w for w in words]
    records = [{"doc_id": i, "doc_hash": f"wiki-{i}", "filter": "none", "word_perplexity": [ll, w],
                "byte_perplexity": [ll, b], "bits_per_byte": [ll, b]}
               for i, (ll, w, b) in enumerate(zip(loglikelihoods, words, sizes))]
    entry = {"alias": "wikitext2_ppl_quick", "word_perplexity,none": math.exp(-sum(loglikelihoods) / sum(words)),
             "byte_perplexity,none": math.exp(-sum(loglikelihoods) / sum(sizes)),
             "bits_per_byte,none": -sum(loglikelihoods) / sum(sizes) / math.log(2)}
    return entry, records


WORDS = [900, 1400, 700, 1800, 1100, 1300, 800, 1600, 1000, 1200, 1500, 950]


def perplexity_docs(ratios=None, base_ppl=30.0) -> list[float]:
    """Per-document log-likelihoods at perplexity ~base_ppl, each document's perplexity times its ratio."""
    ratios = ratios or [1.0] * len(WORDS)
    wobble = [1.0 + 0.1 * ((i * 7) % 5 - 2) for i in range(len(WORDS))]
    return [-w * math.log(base_ppl * s * r) for w, s, r in zip(WORDS, wobble, ratios)]


def make_results(crows: dict[str, list[bool]], stereoset: list[tuple], wikitext: list[float]) -> dict:
    results, samples, hib = {}, {}, {}
    pooled_wins, pooled_diffs = [], []
    for bias_type, wins in crows.items():
        name = f"crows_bias_{bias_type}"
        results[name], samples[name] = crows_task(name, wins)
        pooled_wins += wins
        pooled_diffs += [row["likelihood_diff"] for row in samples[name]]
        hib[name] = {m: False for m in ("pct_stereotype", "likelihood_diff", "pct_stereotype_stereo",
                                        "pct_stereotype_antistereo")}
    results["crows_bias"] = {"alias": "crows_bias", "pct_stereotype,none": 100.0 * sum(pooled_wins) / len(pooled_wins),
                             "likelihood_diff,none": _mean(pooled_diffs)}
    hib["crows_bias"] = {"pct_stereotype": False, "likelihood_diff": False}
    results["stereoset_bias"], samples["stereoset_bias"] = stereoset_task(stereoset)
    hib["stereoset_bias"] = {key.split(",")[0]: not key.startswith("ss") for key in results["stereoset_bias"]
                             if "," in key}
    results["wikitext2_ppl_quick"], samples["wikitext2_ppl_quick"] = wikitext_task(wikitext, WORDS)
    hib["wikitext2_ppl_quick"] = {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False}
    return {"results": results, "group_subtasks": {"crows_bias": [f"crows_bias_{t}" for t in crows]},
            "higher_is_better": hib, "samples": samples}


def write_results(folder: Path, data: dict, *, with_samples: bool = True) -> Path:
    """lm-eval's own layout: results_<date>.json and samples_<task>_<date>.jsonl beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    aggregated = {key: value for key, value in data.items() if key != "samples"}
    path = folder / f"results_{DATE}.json"
    path.write_text(json.dumps(aggregated, indent=2))
    if with_samples:
        for task, rows in data["samples"].items():
            (folder / f"samples_{task}_{DATE}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wins(count: int, total: int = GENDER_PAIRS, *, flip_on: int = 0, flip_off: int = 0) -> list[bool]:
    """`count` stereotype wins spread over `total` pairs; then flip_on losses become wins, flip_off wins losses."""
    outcome = [(i * count) // total != ((i + 1) * count) // total for i in range(total)]
    losses = [i for i, won in enumerate(outcome) if not won]
    won = [i for i, w in enumerate(outcome) if w]
    for i in losses[:flip_on]:
        outcome[i] = True
    for i in won[-flip_off:] if flip_off else []:
        outcome[i] = False
    return outcome


def gate_file(folder: Path, body: str, name: str = "gate.yml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip("\n"))
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        main(["gate", *map(str, args)])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def baseline_data():
    return make_results({"gender": wins(150), "race_color": wins(260, 516)},
                        stereoset_rows(np.random.default_rng(1)), perplexity_docs())


# --- each check type passes and fails where it should --------------------------------------------------------

ALL_CHECKS = """
    results: candidate/results_{date}.json
    baseline: base/results_{date}.json
    alpha: 0.05
    checks:
      - metric: crows_bias/pct_stereotype
        within: [45, 55]
      - metric: crows_bias_gender/pct_stereotype
        min: 40
      - metric: crows_bias_gender/pct_stereotype
        max: 60
      - metric: stereoset_bias/icat
        min: 60
      - metric: wikitext2_ppl_quick/word_perplexity
        max: 40
      - metric: crows_bias_gender/pct_stereotype
        not_worse_than_baseline: true
      - metric: stereoset_bias/lms
        not_worse_than_baseline: true
      - metric: wikitext2_ppl_quick/word_perplexity
        max_relative_increase: 0.02
"""


def test_each_check_type_passes_and_fails_where_it_should(tmp_path, baseline_data, capsys):
    write_results(tmp_path / "base", baseline_data)
    good = make_results({"gender": wins(150, flip_on=2), "race_color": wins(260, 516)},
                        stereoset_rows(np.random.default_rng(1)), perplexity_docs([1.005] * len(WORDS)))
    write_results(tmp_path / "candidate", good)
    gate = gate_file(tmp_path, ALL_CHECKS.format(date=DATE))
    code, out, err = run_cli(capsys, gate)
    assert code == 0, out + err
    assert out.count("PASS") == 8 and "FAIL" not in out

    bad = make_results({"gender": wins(200), "race_color": wins(400, 516)},
                       stereoset_rows(np.random.default_rng(1), p_related=0.4), perplexity_docs([1.6] * len(WORDS)))
    write_results(tmp_path / "candidate", bad)
    report = run_gate(gate)
    verdicts = {(c.metric, c.kind): c.passed for c in report.checks}
    assert verdicts == {("crows_bias/pct_stereotype", "within"): False,
                        ("crows_bias_gender/pct_stereotype", "min"): True,  # 76 % is above 40: still passes
                        ("crows_bias_gender/pct_stereotype", "max"): False,
                        ("stereoset_bias/icat", "min"): False, ("wikitext2_ppl_quick/word_perplexity", "max"): False,
                        ("crows_bias_gender/pct_stereotype", "not_worse_than_baseline"): False,
                        ("stereoset_bias/lms", "not_worse_than_baseline"): False,
                        ("wikitext2_ppl_quick/word_perplexity", "max_relative_increase"): False}
    assert report.exit_code == 1
    assert run_cli(capsys, gate)[0] == 1


def test_a_change_inside_the_noise_passes_not_worse_a_large_one_fails(tmp_path, baseline_data):
    write_results(tmp_path / "base", baseline_data)
    gate = gate_file(tmp_path, f"""
        results: candidate/results_{DATE}.json
        baseline: base/results_{DATE}.json
        checks:
          - metric: crows_bias_gender/pct_stereotype
            not_worse_than_baseline: true
          - metric: stereoset_bias/ss
            not_worse_than_baseline: true
          - metric: wikitext2_ppl_quick/word_perplexity
            max_relative_increase: 0.02
    """)
    # noise: +4 net pairs (1.5 points, half a standard error), 3 of 480 StereoSet examples, perplexity +3 %
    # overall but between -9 % and +16 % per document
    spread = np.array([0.12, -0.1, 0.09, -0.08, 0.11, -0.12, 0.07, -0.09, 0.1, -0.11, 0.08, -0.07])
    spread -= np.dot(spread, WORDS) / sum(WORDS)  # the word-weighted mean log-ratio stays log(1.03)
    noisy = list(1.03 * np.exp(spread))
    small = make_results({"gender": wins(150, flip_on=6, flip_off=2), "race_color": wins(260, 516)},
                         stereoset_rows(np.random.default_rng(1), flip=3), perplexity_docs(noisy))
    write_results(tmp_path / "candidate", small)
    report = run_gate(gate)
    assert [c.passed for c in report.checks] == [True, True, True], [(c.title, c.p_value) for c in report.checks]
    assert report.checks[0].delta == pytest.approx(100 * 154 / 262 - 100 * 150 / 262)
    assert report.checks[2].delta > 0.02  # the point estimate is over the limit; the evidence is not
    assert report.checks[2].delta_interval.low < 0.02

    large = make_results({"gender": wins(150, flip_on=45), "race_color": wins(260, 516)},
                         stereoset_rows(np.random.default_rng(1), flip=90), perplexity_docs([1.03] * len(WORDS)))
    write_results(tmp_path / "candidate", large)
    report = run_gate(gate)
    assert [c.passed for c in report.checks] == [False, False, False], [(c.title, c.p_value) for c in report.checks]


# --- intervals and p-values equal scipy's functions called here on the same counts ---------------------------


def test_crows_interval_and_p_values_equal_scipy(tmp_path, baseline_data):
    write_results(tmp_path / "base", baseline_data)
    candidate = make_results({"gender": wins(150, flip_on=14, flip_off=3), "race_color": wins(260, 516)},
                             stereoset_rows(np.random.default_rng(1)), perplexity_docs())
    write_results(tmp_path / "candidate", candidate)
    gate = gate_file(tmp_path, f"""
        results: candidate/results_{DATE}.json
        baseline: base/results_{DATE}.json
        alpha: 0.1
        checks:
          - metric: crows_bias_gender/pct_stereotype
            within: [45, 55]
          - metric: crows_bias_gender/pct_stereotype
            not_worse_than_baseline: true
          - metric: crows_bias_gender/pct_stereotype_stereo
            min: 58
    """)
    within, not_worse, stereo_min = run_gate(gate).checks
    k, n = 161, GENDER_PAIRS
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
    assert (within.interval.low, within.interval.high) == pytest.approx((100 * ci.low, 100 * ci.high), abs=1e-12)
    below = scipy_stats.binomtest(k, n, 0.45, alternative="less").pvalue
    above = scipy_stats.binomtest(k, n, 0.55, alternative="greater").pvalue
    assert within.p_value == pytest.approx(min(1, 2 * min(below, above)), abs=1e-15)
    assert within.passed == (not (ci.low > 0.55 or ci.high < 0.45))

    base = np.array(wins(150))
    cand = np.array([row["pct_stereotype"] == 100.0 for row in candidate["samples"]["crows_bias_gender"]])
    n01, n10 = int(np.sum(cand & ~base)), int(np.sum(~cand & base))
    n11, n00 = int(np.sum(cand & base)), int(np.sum(~cand & ~base))
    assert (n01, n10) == (14, 3)

    def greater(wins_, losses):
        return scipy_stats.binomtest(wins_, wins_ + losses, 0.5, alternative="greater").pvalue

    towards_stereotype = max(greater(n01, n10), greater(n11, n00))
    towards_anti = max(greater(n10, n01), greater(n00, n11))
    assert not_worse.p_value == pytest.approx(min(1, 4 * min(towards_stereotype, towards_anti)), abs=1e-15)
    assert not_worse.passed == (not_worse.p_value >= 0.1)

    marked = [row["pct_stereotype_stereo"] for row in candidate["samples"]["crows_bias_gender"]]
    k_stereo = sum(value == 100.0 for value, is_stereo in marked if is_stereo)
    n_stereo = sum(is_stereo for _, is_stereo in marked)
    p_below = scipy_stats.binomtest(k_stereo, n_stereo, 0.58, alternative="less").pvalue
    assert stereo_min.p_value == pytest.approx(min(1, 2 * p_below), abs=1e-15)
    ci = scipy_stats.binomtest(k_stereo, n_stereo).proportion_ci(confidence_level=0.9, method="exact")
    assert stereo_min.interval.low == pytest.approx(100 * ci.low, abs=1e-12)


def test_mcnemar_direction_test_is_statsmodels_exact_mcnemar():
    """One-sided exact McNemar (doubled) equals statsmodels' two-sided exact test when the direction is the data's."""
    from statsmodels.stats.contingency_tables import mcnemar

    from debias_plugin.gate.stats import PairTable, mcnemar_worse

    for both, cand_only, base_only, neither in ((40, 17, 5, 60), (10, 30, 29, 5), (0, 9, 0, 3)):
        table = PairTable(both, cand_only, base_only, neither)
        expected = mcnemar([[neither, cand_only], [base_only, both]], exact=True).pvalue
        worse = "higher" if cand_only >= base_only else "lower"
        assert mcnemar_worse(table, worse).p_value == pytest.approx(expected, abs=1e-15)


def _per_target(rows):
    """Per-target SS and LMS (sorted target names: the gate's unit order), from the definition."""
    targets = sorted({row[0] for row in rows})
    ss, lms = [], []
    for target in targets:
        items = [row[2:] for row in rows if row[0] == target]
        ss.append(100.0 * sum(s > a for s, a, _ in items) / len(items))
        lms.append(100.0 * sum((s > u) + (a > u) for s, a, u in items) / (2 * len(items)))
    return np.array(ss), np.array(lms)


def test_stereoset_and_perplexity_intervals_equal_scipy_bootstrap(tmp_path, baseline_data):
    write_results(tmp_path / "base", baseline_data)
    ratios = [1.15, 0.91, 1.12, 0.95, 1.10, 0.93, 1.08, 0.96, 1.0, 1.02, 0.97, 1.09]
    candidate = make_results({"gender": wins(150), "race_color": wins(260, 516)},
                             stereoset_rows(np.random.default_rng(1), flip=20), perplexity_docs(ratios))
    write_results(tmp_path / "candidate", candidate)
    gate = gate_file(tmp_path, f"""
        results: candidate/results_{DATE}.json
        baseline: base/results_{DATE}.json
        seed: {SEED}
        resamples: {RESAMPLES}
        checks:
          - metric: stereoset_bias/icat
            min: 90
          - metric: stereoset_bias/ss_gender
            within: [45, 55]
          - metric: wikitext2_ppl_quick/word_perplexity
            max_relative_increase: 0.02
          - metric: stereoset_bias/ss
            not_worse_than_baseline: true
    """)
    icat, ss_gender, ppl, ss_paired = run_gate(gate).checks

    def scipy_bootstrap(data, statistic, paired=True):
        return scipy_stats.bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=RESAMPLES,
                                     confidence_level=0.95, method="percentile", rng=np.random.default_rng(SEED))

    rows = [tuple(r["icat"]) for r in candidate["samples"]["stereoset_bias"]]
    ss_t, lms_t = _per_target(rows)

    def icat_statistic(ss, lms, axis=-1):
        ss_mean, lms_mean = ss.mean(axis=axis), lms.mean(axis=axis)
        return lms_mean * np.minimum(ss_mean, 100 - ss_mean) / 50

    expected = scipy_bootstrap((ss_t, lms_t), icat_statistic)
    assert icat.value == pytest.approx(stereoset_reference(rows)["icat"])
    assert (icat.interval.low, icat.interval.high) == pytest.approx(tuple(expected.confidence_interval), rel=1e-12)
    against = np.sum(expected.bootstrap_distribution >= 90)  # replicates not below the bound
    assert icat.p_value == pytest.approx(min(1, 2 * (1 + against) / (1 + RESAMPLES)))

    gender_ss, _ = _per_target([row for row in rows if row[1] == "gender"])
    expected = scipy_bootstrap((gender_ss,), lambda x, axis=-1: x.mean(axis=axis), paired=False)
    assert (ss_gender.interval.low, ss_gender.interval.high) == pytest.approx(tuple(expected.confidence_interval))

    base_ll = [r["word_perplexity"][0] for r in baseline_data["samples"]["wikitext2_ppl_quick"]]
    cand_ll = [r["word_perplexity"][0] for r in candidate["samples"]["wikitext2_ppl_quick"]]
    words = np.array(WORDS, float)

    def ratio(cl, cw, bl, bw, axis=-1):
        return np.exp(-cl.sum(axis=axis) / cw.sum(axis=axis)) / np.exp(-bl.sum(axis=axis) / bw.sum(axis=axis)) - 1

    expected = scipy_bootstrap((np.array(cand_ll), words, np.array(base_ll), words), ratio)
    assert ppl.delta == pytest.approx(math.exp(-sum(cand_ll) / sum(WORDS)) / math.exp(-sum(base_ll) / sum(WORDS)) - 1)
    assert (ppl.delta_interval.low, ppl.delta_interval.high) == pytest.approx(tuple(expected.confidence_interval))
    against = np.sum(expected.bootstrap_distribution <= 0.02)
    assert ppl.p_value == pytest.approx(min(1, 2 * (1 + against) / (1 + RESAMPLES)))

    base_rows = [tuple(r["ss"]) for r in baseline_data["samples"]["stereoset_bias"]]
    base_ss_t, _ = _per_target(base_rows)
    expected = scipy_bootstrap((ss_t, base_ss_t), lambda c, b, axis=-1: np.abs(c.mean(axis=axis) - 50)
                               - np.abs(b.mean(axis=axis) - 50))
    assert (ss_paired.delta_interval.low, ss_paired.delta_interval.high) == pytest.approx(
        tuple(expected.confidence_interval))


def test_a_gap_metric_has_the_per_document_data_of_its_percentage():
    """stereotype_gap's rows are 0/100 outcomes even when every pair went the same way: not read as 0/1."""
    from debias_plugin.gate.results import Results, metric_samples

    rows = [{"doc_id": i, "pct_stereotype": 0.0, "stereotype_gap": 0.0} for i in range(4)]
    results = Results("fixture", {"results": {"crows_bias_gender": {"pct_stereotype,none": 0.0,
                                                                    "stereotype_gap,none": 50.0}}},
                      {"crows_bias_gender": rows})
    gap, _ = metric_samples(results, "crows_bias_gender", "stereotype_gap")
    percentage, _ = metric_samples(results, "crows_bias_gender", "pct_stereotype")
    assert (gap.kind, gap.scale, gap.units) == ("proportion", 100.0, 4)
    assert (percentage.kind, percentage.scale, percentage.units) == ("proportion", 100.0, 4)


def test_stereoset_resample_statistic_is_the_task_aggregation_on_relabelled_targets():
    """Resampling targets with replacement = stereoset_scores on the drawn targets, each draw a distinct term."""
    from debias_plugin.gate import stats
    from debias_plugin.gate.results import Results, metric_samples
    from debias_plugin.scoring.stereoset import ScoredExample, stereoset_scores

    rows = stereoset_rows(np.random.default_rng(3), targets=9, per_target=5, p_stereo=0.6, p_related=0.8)
    entry, records = stereoset_task(rows)
    samples, _ = metric_samples(Results("fixture", {"results": {"stereoset_bias": entry}},
                                        {"stereoset_bias": records}), "stereoset_bias", "icat,none")
    statistics = {m: stats.stereoset_statistic(samples.columns["ss"], samples.columns["lms"], m)
                  for m in ("ss", "lms", "icat")}
    targets = [key[0] for key in samples.keys]
    rng = np.random.default_rng(0)
    for _ in range(20):
        draw = rng.integers(0, len(targets), len(targets))
        relabelled = [ScoredExample(f"{targets[t]}#{k}", *row[2:]) for k, t in enumerate(draw)
                      for row in rows if row[0] == targets[t]]
        expected = stereoset_scores(relabelled)
        for metric, statistic in statistics.items():
            assert float(statistic(draw)) == pytest.approx(getattr(expected, metric), abs=1e-9)


# --- results without per-sample data ---------------------------------------------------------------------------


def test_results_without_samples_use_the_point_estimate_and_say_so(tmp_path, baseline_data, capsys):
    write_results(tmp_path / "base", baseline_data, with_samples=False)
    gate = gate_file(tmp_path, f"""
        results: base/results_{DATE}.json
        checks:
          - metric: crows_bias_gender/pct_stereotype
            max: 58
          - metric: crows_bias_gender/pct_stereotype
            max: 56
    """)
    report = run_gate(gate)
    assert [c.passed for c in report.checks] == [True, False]  # 57.25 %: by the point estimate alone
    assert all(c.p_value is None and c.interval is None for c in report.checks)
    assert all("no per-sample data" in c.note for c in report.checks)
    code, out, _ = run_cli(capsys, gate)
    assert code == 1 and "no per-sample data" in out and "no per-sample data" in markdown_summary(report)


# --- malformed gate files: exit 2, file, line and field, no traceback --------------------------------------------

BAD_GATES = {
    "unknown metric": ("""
        results: base/results_{date}.json
        checks:
          - metric: crows_bias/pct_stereotype
            within: [45, 55]
          - metric: crows_bias_gender/pct_stereo
            max: 60
    """, 5, "checks[1].metric", "pct_stereotype_antistereo"),
    "unknown task": ("""
        results: base/results_{date}.json
        checks:
          - metric: crows_bias_gendr/pct_stereotype
            max: 60
    """, 3, "checks[0].metric", "crows_bias_gender"),
    "gap metric": ("""
        results: base/results_{date}.json
        checks:
          - metric: crows_bias_gender/stereotype_gap
            max: 5
    """, 3, "checks[0]", "check crows_bias_gender/pct_stereotype instead"),
    "unknown check key": ("""
        results: base/results_{date}.json
        checks:
          - metric: crows_bias/pct_stereotype
            withn: [45, 55]
    """, 4, "checks[0].withn", "unknown key"),
    "unknown gate key": ("""
        results: base/results_{date}.json
        alhpa: 0.05
        checks:
          - metric: crows_bias/pct_stereotype
            max: 60
    """, 2, "alhpa", "unknown key"),
    "missing results": ("""
        checks:
          - metric: crows_bias/pct_stereotype
            max: 60
        results: nowhere/results.json
    """, 4, "results", "does not exist"),
    "bad YAML": ("""
        results: base/results_{date}.json
        checks:
          - metric: crows_bias/pct_stereotype
            within: [45, 55
          - metric: crows_bias/pct_stereotype
    """, 5, None, "valid YAML"),
    "two requirements": ("""
        results: base/results_{date}.json
        checks:
          - metric: crows_bias/pct_stereotype
            min: 40
            max: 60
    """, 3, "checks[0]", "exactly one of"),
    "baseline check without a baseline": ("""
        results: base/results_{date}.json
        checks:
          - metric: crows_bias/pct_stereotype
            not_worse_than_baseline: true
    """, 4, "checks[0].not_worse_than_baseline", "needs a 'baseline'"),
    "wrong type": ("""
        results: base/results_{date}.json
        alpha: high
        checks:
          - metric: crows_bias/pct_stereotype
            max: 60
    """, 2, "alpha", "valid number"),
    "duplicate key": ("""
        results: base/results_{date}.json
        checks:
          - metric: crows_bias/pct_stereotype
            max: 60
            max: 70
    """, 5, "checks[0].max", "duplicate key"),
}


@pytest.mark.parametrize("case", sorted(BAD_GATES))
def test_malformed_gate_files_exit_2_with_file_line_and_field(tmp_path, baseline_data, capsys, case):
    body, line, field, words = BAD_GATES[case]
    write_results(tmp_path / "base", baseline_data)
    gate = gate_file(tmp_path, body.format(date=DATE))
    code, out, err = run_cli(capsys, gate, "--junit", tmp_path / "j.xml")
    assert code == 2, out + err
    assert str(gate) in err and f"line {line}" in err and words in err, err
    if field:
        assert f"field '{field}'" in err, err
    assert "Traceback" not in err + out
    assert not (tmp_path / "j.xml").exists()


# --- reports --------------------------------------------------------------------------------------------------

# The common JUnit XML schema (Ant / Jenkins / GitLab / GitHub test reporters), written out for this test.
JUNIT_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="qualified">
  <xs:complexType name="result">
    <xs:simpleContent>
      <xs:extension base="xs:string">
        <xs:attribute name="message" type="xs:string"/>
        <xs:attribute name="type" type="xs:string"/>
      </xs:extension>
    </xs:simpleContent>
  </xs:complexType>
  <xs:element name="testsuites">
    <xs:complexType>
      <xs:sequence><xs:element ref="testsuite" minOccurs="0" maxOccurs="unbounded"/></xs:sequence>
      <xs:attribute name="name" type="xs:string"/>
      <xs:attribute name="tests" type="xs:nonNegativeInteger"/>
      <xs:attribute name="failures" type="xs:nonNegativeInteger"/>
      <xs:attribute name="errors" type="xs:nonNegativeInteger"/>
      <xs:attribute name="skipped" type="xs:nonNegativeInteger"/>
      <xs:attribute name="disabled" type="xs:nonNegativeInteger"/>
      <xs:attribute name="time" type="xs:decimal"/>
    </xs:complexType>
  </xs:element>
  <xs:element name="testsuite">
    <xs:complexType>
      <xs:sequence>
        <xs:element name="properties" minOccurs="0">
          <xs:complexType>
            <xs:sequence>
              <xs:element name="property" maxOccurs="unbounded">
                <xs:complexType>
                  <xs:attribute name="name" type="xs:string" use="required"/>
                  <xs:attribute name="value" type="xs:string" use="required"/>
                </xs:complexType>
              </xs:element>
            </xs:sequence>
          </xs:complexType>
        </xs:element>
        <xs:element name="testcase" minOccurs="0" maxOccurs="unbounded">
          <xs:complexType>
            <xs:sequence>
              <xs:choice minOccurs="0">
                <xs:element name="skipped" type="result"/>
                <xs:element name="error" type="result" maxOccurs="unbounded"/>
                <xs:element name="failure" type="result" maxOccurs="unbounded"/>
              </xs:choice>
              <xs:element name="system-out" type="xs:string" minOccurs="0"/>
              <xs:element name="system-err" type="xs:string" minOccurs="0"/>
            </xs:sequence>
            <xs:attribute name="name" type="xs:string" use="required"/>
            <xs:attribute name="classname" type="xs:string" use="required"/>
            <xs:attribute name="time" type="xs:decimal"/>
            <xs:attribute name="assertions" type="xs:nonNegativeInteger"/>
            <xs:attribute name="status" type="xs:string"/>
          </xs:complexType>
        </xs:element>
        <xs:element name="system-out" type="xs:string" minOccurs="0"/>
        <xs:element name="system-err" type="xs:string" minOccurs="0"/>
      </xs:sequence>
      <xs:attribute name="name" type="xs:string" use="required"/>
      <xs:attribute name="tests" type="xs:nonNegativeInteger" use="required"/>
      <xs:attribute name="failures" type="xs:nonNegativeInteger" use="required"/>
      <xs:attribute name="errors" type="xs:nonNegativeInteger" use="required"/>
      <xs:attribute name="skipped" type="xs:nonNegativeInteger"/>
      <xs:attribute name="time" type="xs:decimal"/>
      <xs:attribute name="timestamp" type="xs:dateTime"/>
      <xs:attribute name="hostname" type="xs:string"/>
      <xs:attribute name="id" type="xs:string"/>
      <xs:attribute name="package" type="xs:string"/>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""


@pytest.fixture()
def failing_gate(tmp_path, baseline_data):
    write_results(tmp_path / "base", baseline_data)
    bad = make_results({"gender": wins(200), "race_color": wins(260, 516)},
                       stereoset_rows(np.random.default_rng(1)), perplexity_docs())
    write_results(tmp_path / "candidate", bad)
    return gate_file(tmp_path, f"""
        name: pr-gate
        results: candidate/results_{DATE}.json
        baseline: base/results_{DATE}.json
        checks:
          - metric: crows_bias/pct_stereotype
            within: [45, 55]
          - metric: crows_bias_gender/pct_stereotype
            not_worse_than_baseline: true
          - metric: stereoset_bias/icat
            min: 60
          - metric: crows_bias_gender/pct_stereotype_stereo
            name: "gender <stereo> & 'quotes' | pipes"
            max: 99
    """)


def test_junit_xml_validates_against_the_junit_schema_and_parses_back(tmp_path, failing_gate, capsys):
    from lxml import etree

    out_file = tmp_path / "reports" / "gate.xml"
    out_file.parent.mkdir()
    code, out, err = run_cli(capsys, failing_gate, "--junit", out_file)
    assert code == 1, err
    schema = etree.XMLSchema(etree.fromstring(JUNIT_XSD.encode()))
    document = etree.parse(str(out_file))
    schema.assertValid(document)
    suite = document.getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases][-1] == "gender <stereo> & 'quotes' | pipes"
    failed = [case.get("name") for case in cases if case.find("failure") is not None]
    assert failed == ["crows_bias/pct_stereotype within [45, 55]",
                      "crows_bias_gender/pct_stereotype not worse than baseline"]
    assert suite.get("tests") == "4" and suite.get("failures") == "2" and suite.get("name") == "pr-gate"
    assert "p = " in cases[0].find("failure").text and "Clopper-Pearson" in cases[0].find("failure").text


def test_markdown_summary_renders_as_a_table_and_is_appended_to_the_step_summary(tmp_path, failing_gate, capsys,
                                                                               monkeypatch):
    markdown_it = pytest.importorskip("markdown_it")
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert run_cli(capsys, failing_gate, "--markdown", tmp_path / "gate.md")[0] == 1
    assert run_cli(capsys, failing_gate)[0] == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n") and text.count("debias gate FAILED") == 2
    assert (tmp_path / "gate.md").read_text() in text
    html = markdown_it.MarkdownIt("commonmark").enable("table").render((tmp_path / "gate.md").read_text())
    assert html.count("<table>") == 1
    rows = html.split("<tbody>")[1].split("</tbody>")[0].count("<tr>")
    assert rows == 4 and html.count("<th>") == 8
    assert "gender &lt;stereo&gt; &amp; 'quotes' | pipes" in html  # the pipe stays inside its cell
    assert "Δ|x-50|" in html


def test_json_report_has_estimate_interval_and_p_value_per_check(tmp_path, failing_gate, capsys):
    code, _, _ = run_cli(capsys, failing_gate, "--json", tmp_path / "gate.json")
    report = json.loads((tmp_path / "gate.json").read_text())
    assert code == 1 and report["passed"] is False and len(report["checks"]) == 4
    first = report["checks"][0]
    assert first["value"] == pytest.approx(100 * (200 + 260) / (262 + 516))
    assert first["interval"]["method"] == "Clopper-Pearson" and first["p_value"] < 0.05 and first["line"] == 5
    assert report["checks"][1]["baseline_value"] == pytest.approx(100 * 150 / 262)


def test_report_file_may_not_overwrite_an_input(tmp_path, failing_gate, capsys):
    code, _, err = run_cli(capsys, failing_gate, "--json", failing_gate)
    assert code == 2 and "overlaps the input" in err
    assert "checks:" in failing_gate.read_text()


def test_report_file_may_not_overwrite_the_samples_beside_a_results_file(tmp_path, failing_gate, capsys):
    """The per-sample files lm-eval wrote beside a results JSON are inputs too, though the gate file names none."""
    samples = sorted(tmp_path.rglob("samples_*.jsonl"))
    assert samples, "the fixture's results have per-sample files"
    before = samples[0].read_text()
    code, _, err = run_cli(capsys, failing_gate, "--junit", samples[0])
    assert code == 2 and "overlaps the input" in err and samples[0].read_text() == before


# --- end to end: a tiny model through lm-eval, then the cache ----------------------------------------------------


def test_end_to_end_tiny_model_evaluated_once_then_cached(tmp_path, tiny_model, monkeypatch, capsys):
    from debias_plugin import evaluation

    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_model("gpt2")
    gate = gate_file(tmp_path, f"""
        model: {model}
        baseline: {model}
        tasks: [crows_bias_gender, stereoset_bias, wikitext2_ppl_quick]
        limit: 6
        device: cpu
        model_args: {{dtype: float32}}
        checks:
          - metric: crows_bias_gender/pct_stereotype
            within: [0, 100]
          - metric: crows_bias_gender/pct_stereotype
            not_worse_than_baseline: true
          - metric: stereoset_bias/lms
            min: 0
          - metric: wikitext2_ppl_quick/word_perplexity
            max_relative_increase: 0.02
    """)
    code, out, err = run_cli(capsys, gate, "--json", tmp_path / "first.json")
    assert code == 0, out + err
    first = json.loads((tmp_path / "first.json").read_text())
    assert "evaluated now" in first["candidate"] and "cached results" in first["baseline"]
    assert all(check["interval"] is not None for check in first["checks"])
    assert first["checks"][1]["p_value"] == 1.0  # the same model: no discordant pair

    def no_second_run(*args, **kwargs):
        raise AssertionError("lm-eval ran although the results are cached")

    monkeypatch.setattr(evaluation, "_run", no_second_run)
    started = time.perf_counter()
    code, out, err = run_cli(capsys, gate, "--json", tmp_path / "second.json")
    cached_seconds = time.perf_counter() - started
    second = json.loads((tmp_path / "second.json").read_text())
    assert code == 0 and "cached results" in second["candidate"], out + err
    assert [c["value"] for c in second["checks"]] == [c["value"] for c in first["checks"]]
    assert cached_seconds < 5

    # the cache is keyed by content: a copy elsewhere hits, changed weights or another limit miss
    copy = shutil.copytree(model, tmp_path / "copy")
    assert evaluation.cache_key(copy, ["stereoset_bias"]) == evaluation.cache_key(model, ["stereoset_bias"])
    assert evaluation.cache_key(model, ["stereoset_bias"], limit=5) != evaluation.cache_key(model, ["stereoset_bias"])
    # naming the default model class (as the sweep runner does) is the same request as leaving it out
    assert evaluation.cache_key(model, ["stereoset_bias"], model_class=evaluation.CAUSAL_MODEL_CLASS) == \
        evaluation.cache_key(model, ["stereoset_bias"])
    default_key = evaluation.cache_key(model, ["stereoset_bias"])
    assert evaluation.cache_key(model, ["stereoset_bias"], model_class="hf") != default_key
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert evaluation.cache_key(copy, ["stereoset_bias"]) != evaluation.cache_key(model, ["stereoset_bias"])

    # evaluate(output_dir=...) writes a folder that `results:` reads, samples included
    folder = tmp_path / "results_folder"
    evaluation.evaluate(model, ["crows_bias_gender", "stereoset_bias", "wikitext2_ppl_quick"], limit=6,
                        model_args={"dtype": "float32"}, output_dir=folder)
    from_file = gate_file(tmp_path, """
        results: results_folder/results.json
        checks:
          - metric: crows_bias_gender/pct_stereotype
            within: [0, 100]
    """, "from_file.yml")
    report = run_gate(from_file)
    assert report.checks[0].value == first["checks"][0]["value"] and report.checks[0].interval is not None


def test_unknown_task_or_metric_is_refused_before_any_model_loads(tmp_path, tiny_model, monkeypatch, capsys):
    from debias_plugin import evaluation

    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path / "cache"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model was evaluated despite a bad gate file")

    monkeypatch.setattr(evaluation, "_run", must_not_run)
    model = tiny_model("gpt2")
    unknown_task = gate_file(tmp_path, f"""
        model: {model}
        tasks: [crows_bias_gender, stereoset_bais]
        checks:
          - metric: crows_bias_gender/pct_stereotype
            max: 60
    """)
    code, _, err = run_cli(capsys, unknown_task)
    assert code == 2 and "line 2, field 'tasks[1]'" in err and "stereoset_bais" in err, err
    unknown_metric = gate_file(tmp_path, f"""
        model: {model}
        tasks: [crows_bias_gender, stereoset_bias]
        checks:
          - metric: stereoset_bias/icat_gender
            min: 1
          - metric: stereoset_bias/icat_nationality
            min: 1
    """, "metric.yml")
    code, _, err = run_cli(capsys, unknown_metric)
    assert code == 2 and "line 6, field 'checks[1].metric'" in err and "icat_religion" in err, err


def test_bundled_example_gate_is_valid_and_names_real_tasks_and_metrics():
    from debias_plugin.gate import load_gate
    from debias_plugin.gate import _check_names_before_running

    gate = load_gate(Path(__file__).resolve().parents[1] / "gates" / "example.yml")
    assert gate.config.model == "default" and gate.config.checks
    _check_names_before_running(gate)


def test_model_class_follows_the_config_not_the_name(tiny_model, tmp_path):
    from debias_plugin.evaluation import resolve_model_class

    masked = shutil.copytree(tiny_model("bert"), tmp_path / "gpt2-looking-name")
    assert resolve_model_class(masked) == "hf-mlm"
    assert resolve_model_class(tiny_model("gpt2")) == "hf-bias"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None, True, "57.1"])
@pytest.mark.parametrize("role", ["results", "baseline"])
def test_a_non_finite_or_null_metric_is_an_error_naming_the_file(value, role, tmp_path, capsys):
    """A NaN in the candidate's or the baseline's results must never pass a check (comparisons with NaN are false)."""
    good = {"results": {"crows_bias": {"pct_stereotype,none": 55.0}}}
    bad = {"results": {"crows_bias": {"pct_stereotype,none": value}}}
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "bad.json").write_text(json.dumps(bad))  # json writes NaN/Infinity as Python's json reads them
    results, baseline = ("bad.json", "good.json") if role == "results" else ("good.json", "bad.json")
    gate = tmp_path / "gate.yml"
    gate.write_text(f"results: {results}\nbaseline: {baseline}\nchecks:\n"
                    "  - {metric: crows_bias/pct_stereotype, not_worse_than_baseline: true}\n")
    code, _, err = run_cli(capsys, gate)
    assert code == 2 and "bad.json" in err and "pct_stereotype,none" in err and "not a finite number" in err
