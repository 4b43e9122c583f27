"""lm-eval results (a results JSON and its samples_*.jsonl files) and the per-sample data behind one metric."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from debias_plugin.errors import DataError, DebiasError
from debias_plugin.gate import stats
from debias_plugin.scoring.bbq import amb_bias_score, disamb_bias_score
from debias_plugin.scoring.specs import MetricSpec, find_spec, spec
from debias_plugin.scoring.stereoset import ScoredExample, stereoset_scores

# lm-eval names a run's files results_<date>.json / samples_<task>_<date>.jsonl (or <stem>_<date>.json for an
# --output_path ending in .json); our cache and `evaluate(output_dir=...)` write results.json / samples_<task>.jsonl.
_DATE = re.compile(r"_(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)$")


@dataclass
class Results:
    """One model's lm-eval results: the aggregated dict and, per leaf task, its per-document sample records."""

    source: str
    data: dict
    samples: dict[str, list[dict]] = field(default_factory=dict)


def samples_path(results_path: Path, task: str) -> Path:
    date = _DATE.search(results_path.stem)
    suffix = f"_{date.group(1)}" if date else ""
    return results_path.with_name(f"samples_{task}{suffix}.jsonl")


def read_results(path: str | Path) -> Results:
    """A results JSON written by lm-eval (or by debias_plugin.evaluation), with the samples files found beside it."""
    from debias_plugin.data._io import json_document, jsonl_rows

    path = Path(path)
    data = json_document(path)
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise DataError(path, "top level", "an lm-eval results JSON with a 'results' object",
                        type(data).__name__ if not isinstance(data, dict) else f"keys {sorted(data)[:8]}")
    samples = data.pop("samples", None) or {}
    if not samples:
        for task in data["results"]:
            file = samples_path(path, task)
            if file.is_file():
                samples[task] = [row for _, row in jsonl_rows(file)]
    return Results(str(path), data, samples)


def results_from_dict(data: dict, source: str) -> Results:
    data = dict(data)
    return Results(source, data, data.pop("samples", None) or {})


def metric_names(results: Results, task: str) -> list[str]:
    """The metrics a task reports (filter suffix ',none' dropped, stderr entries skipped)."""
    names = []
    for key in results.data["results"].get(task, {}):
        if "," in key and "_stderr," not in key:
            metric, filter_name = key.split(",", 1)
            names.append(metric if filter_name == "none" else key)
    return names


def metric_key(results: Results, task: str, metric: str) -> str | None:
    """lm-eval's key for task/metric: 'metric,none', an explicit 'metric,filter', or the only filter there is."""
    entry = results.data["results"].get(task)
    if entry is None:
        return None
    if "," in metric:
        return metric if metric in entry else None
    if f"{metric},none" in entry:
        return f"{metric},none"
    keys = [key for key in entry if key.startswith(f"{metric},") and "_stderr," not in key]
    return keys[0] if len(keys) == 1 else None


def reported_value(results: Results, task: str, key: str) -> float:
    """The reported number; null, text, booleans and NaN/infinity are errors naming the file and field (a NaN in a
    candidate's or a baseline's results must never pass a check by comparing false)."""
    value = results.data["results"][task][key]
    number = finite_or_none(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None:
        raise DebiasError(f"{results.source}: results[{task!r}][{key!r}] is {value!r}, not a finite number; a check "
                          "cannot be decided on it (re-run the evaluation, or check on another metric).")
    return number


def finite_or_none(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def higher_is_better(results: Results, task: str, metric: str) -> bool | None:
    value = results.data.get("higher_is_better", {}).get(task, {}).get(metric.split(",")[0])
    return value if isinstance(value, bool) else None


def leaf_tasks(results: Results, task: str) -> list[str]:
    """A group's leaf tasks (recursively, from group_subtasks); a task is its own leaf."""
    groups = results.data.get("group_subtasks", {})
    if not groups.get(task):
        return [task]
    return [leaf for sub in groups[task] for leaf in leaf_tasks(results, sub)]


@dataclass
class MetricSamples:
    """Per-unit data for one metric, read as its spec declares: what a bootstrap resamples and a paired test aligns.

    Units are documents (pairs for CrowS) or, for StereoSet, target terms (columns: per-target SS and LMS).
    """

    spec: MetricSpec
    keys: list[tuple]
    hashes: list[str]
    columns: dict[str, np.ndarray]

    @property
    def units(self) -> int:
        return len(self.keys)

    @property
    def kind(self) -> str:
        return self.spec.estimator

    @property
    def scale(self) -> float:
        return self.spec.scale

    @property
    def unit_name(self) -> str:
        return self.spec.unit

    @property
    def strata(self) -> np.ndarray | None:
        """Each unit's stratum where the spec resamples within strata (CrowS bias types), else None."""
        return self.columns["stratum"] if self.spec.stratified else None

    def bootstrap(self, statistic: stats.Statistic, alpha: float, *, resamples: int, seed: int,
                  what: str | None = None) -> stats.BootstrapResult:
        """The percentile bootstrap the spec declares (stratified for per-type metrics) of statistic over units."""
        return stats.bootstrap(statistic, self.units, alpha, resamples=resamples, seed=seed,
                               what=what or self.unit_name, strata=self.strata)

    def statistic(self) -> stats.Statistic:
        """The metric recomputed on chosen unit indices (the gate's bootstraps and its point check)."""
        columns, estimator = self.columns, self.spec.estimator
        if estimator == "proportion":
            return stats.mean_statistic(columns["outcome"] * self.spec.scale)
        if estimator == "mean":
            return stats.mean_statistic(columns["value"])
        if estimator == "weighted_perplexity":
            return stats.weighted_perplexity_statistic(columns["loglikelihood"], columns["weight"])
        if estimator == "bits_per_byte":
            return stats.bits_per_byte_statistic(columns["loglikelihood"], columns["weight"])
        if estimator == "perplexity":
            return stats.perplexity_statistic(columns["loglikelihood"])
        if estimator == "stereoset":
            return stats.stereoset_statistic(columns["ss"], columns["lms"], self.spec.part)
        if estimator in ("type_mean_gap", "worst_type_gap"):
            return stats.type_gap_statistic(columns["outcome"], columns["stratum"], estimator == "worst_type_gap")
        if estimator == "bbq_amb_bias":
            acc, biased, non_unknown = columns["acc"], columns["n_biased"], columns["n_non_unknown"]
            return lambda idx: amb_bias_score(acc[idx], biased[idx], non_unknown[idx])
        if estimator == "bbq_disamb_bias":
            biased, non_unknown = columns["n_biased"], columns["n_non_unknown"]
            return lambda idx: disamb_bias_score(biased[idx], non_unknown[idx])
        raise ValueError(f"{self.spec.name}: no statistic for the estimator {estimator!r}")


class _Mismatch(Exception):
    """Per-document values that do not have the shape the metric's spec declares."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, str)  # bool is an int: outcomes pass


def _numbers(value, count: int) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != count or not all(map(_is_number, value)):
        raise _Mismatch
    return [float(v) for v in value]


def _disambiguated(mark) -> bool | None:
    """lm-eval's bbq mask_disambiguated as saved (bool, 0/1, or "True"/"False", a numpy bool's JSON); NaN: None."""
    if isinstance(mark, (np.ndarray, np.generic)) and np.ndim(mark) == 0:  # in memory, before lm-eval saves it
        mark = mark.item()
    if isinstance(mark, str) and mark in ("True", "False"):
        return mark == "True"
    if _is_number(mark):
        if math.isnan(mark):
            return None  # a per-category metric's document of another category
        if mark in (0, 1):
            return bool(mark)
    raise _Mismatch


def _chosen(records: list, spec: MetricSpec) -> list:
    """The documents the metric is computed on, each with the value its estimator reads."""
    if spec.documents == "all":
        return records
    chosen = []
    for key, doc_hash, value in records:
        if not isinstance(value, (list, tuple)) or len(value) < 2:
            raise _Mismatch
        if spec.documents == "marked":
            if len(value) != 2 or not isinstance(value[1], bool):
                raise _Mismatch
            keep = value[1]
        else:
            disambiguated = _disambiguated(value[-1])
            keep = disambiguated is not None and disambiguated == (spec.documents == "disambiguated")
        if keep:
            rest = value[:-1]
            chosen.append((key, doc_hash, rest[0] if len(rest) == 1 else rest))
    return chosen


def _columns(records: list, spec: MetricSpec) -> tuple[list, list, dict[str, np.ndarray]]:
    """keys, hashes and the estimator's columns from (key, doc_hash, value) records."""
    estimator = spec.estimator
    if estimator == "stereoset":
        return _stereoset_columns(records, spec.domain)
    keys, hashes, values = (list(column) for column in zip(*records))
    if estimator in ("weighted_perplexity", "bits_per_byte"):
        pairs = np.array([_numbers(value, 2) for value in values])
        return keys, hashes, {"loglikelihood": pairs[:, 0], "weight": pairs[:, 1]}
    if estimator in ("bbq_amb_bias", "bbq_disamb_bias"):
        rows = np.array([_numbers(value, 3) for value in values])
        return keys, hashes, {"acc": rows[:, 0], "n_biased": rows[:, 1], "n_non_unknown": rows[:, 2]}
    if spec.stratified:
        if not all(isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], str) and _is_number(v[1])
                   and v[1] in (0, spec.scale) for v in values):
            raise _Mismatch
        strata = np.unique([value[0] for value in values], return_inverse=True)[1]
        return keys, hashes, {"outcome": np.array([float(v[1]) / spec.scale for v in values]), "stratum": strata}
    if not all(map(_is_number, values)):
        raise _Mismatch
    if estimator == "proportion":
        if any(value not in (0, spec.scale) for value in values):
            raise _Mismatch
        return keys, hashes, {"outcome": np.array([float(value) / spec.scale for value in values])}
    if estimator == "perplexity":
        return keys, hashes, {"loglikelihood": np.array(values, float)}
    if estimator == "mean":
        return keys, hashes, {"value": np.array(values, float)}
    raise _Mismatch


def _stereoset_columns(records: list, domain: str | None):
    """Per-target SS and LMS from the task's own scorer (one target's macro average is that target's score)."""
    by_target: dict[str, list] = {}
    hashes: dict[str, list[str]] = {}
    for _, doc_hash, value in records:
        if not (isinstance(value, (list, tuple)) and len(value) == 5 and all(isinstance(v, str) for v in value[:2])):
            raise _Mismatch
        target, bias_type, *scores = value
        if domain in (None, bias_type):
            by_target.setdefault(target, []).append(ScoredExample(target, *_numbers(scores, 3)))
            hashes.setdefault(target, []).append(doc_hash)
    targets = sorted(by_target)
    per_target = [stereoset_scores(by_target[t]) for t in targets]
    return ([(t,) for t in targets],
            [hashlib.sha256("".join(sorted(hashes[t])).encode()).hexdigest() for t in targets],
            {"ss": np.array([s.ss for s in per_target]), "lms": np.array([s.lms for s in per_target])})


_NONE_CHOSEN = {"marked": "no marked documents", "ambiguous": "no ambiguous-context documents",
                "disambiguated": "no disambiguated-context documents"}


def metric_samples(results: Results, task: str, metric: str) -> tuple[MetricSamples | None, str]:
    """The per-sample data behind results[task][metric] (pooled over a group's tasks), or None and the reason."""
    name, _, filter_name = metric.partition(",")
    found = find_spec(name)
    if found is None:
        return None, f"no metric spec for '{name}'"
    if found.gap_of:  # |x - 50| has x's per-document data; callers map x's interval
        found = spec(found.gap_of)
        name = found.name
    filter_name = filter_name or "none"
    records = []
    for leaf in leaf_tasks(results, task):
        rows = results.samples.get(leaf)
        if not rows:
            return None, "no per-sample data"
        for row in rows:
            if row.get("filter", "none") == filter_name and name in row:
                records.append(((leaf, row.get("doc_id")), str(row.get("doc_hash", "")), row[name]))
    if not records:
        return None, f"the samples have no per-document '{name}' values"
    try:
        chosen = _chosen(records, found)
        if not chosen:
            return None, _NONE_CHOSEN[found.documents]
        keys, hashes, columns = _columns(chosen, found)
    except _Mismatch:
        return None, f"per-document values like {records[0][2]!r} do not fit {name}'s {found.estimator} estimator"
    if not keys:
        return None, "no StereoSet examples for this domain"
    return MetricSamples(found, keys, hashes, columns), ""


def paired_order(candidate: MetricSamples, baseline: MetricSamples) -> tuple[np.ndarray | None, str | None, tuple]:
    """The baseline's unit indices in the candidate's order, for paired statistics on the same items; else None and
    why: ("items", a key only in the candidate or ()) when they hold different items, ("document", the key) when one
    key names another document in each (their doc_hash differ)."""
    position = {key: i for i, key in enumerate(baseline.keys)}
    missing = [key for key in candidate.keys if key not in position]
    if missing or len(position) != len(candidate.keys):
        return None, "items", (missing[0],) if missing else ()
    order = np.array([position[key] for key in candidate.keys])
    for i, j in enumerate(order):
        if candidate.hashes[i] and baseline.hashes[j] and candidate.hashes[i] != baseline.hashes[j]:
            return None, "document", (candidate.keys[i],)
    return order, None, ()


def same_point(first: float, second: float) -> bool:
    """Recomputed and reported values agree (float rounding aside); NaN agrees with NaN."""
    if math.isnan(first) or math.isnan(second):
        return math.isnan(first) and math.isnan(second)
    return math.isclose(first, second, rel_tol=1e-6, abs_tol=1e-9)


CROWS_OVERALL_TASK = "crows_bias_overall"


def crows_type_samples(results: Results, metric: str = "type_mean_gap") -> MetricSamples | None:
    """Per-pair [bias_type, outcome] data of a per-type CrowS metric: crows_bias_overall's own samples, else the
    per-type tasks' pct_stereotype samples pooled with their task as the type; None without per-pair data."""
    from debias_plugin.data.crows import CROWS_TYPE_TASKS

    if CROWS_OVERALL_TASK in results.data["results"]:
        samples, _ = metric_samples(results, CROWS_OVERALL_TASK, metric)
        if samples is not None:
            return samples
    keys, hashes, outcomes, types = [], [], [], []
    for task in CROWS_TYPE_TASKS:
        if task not in results.data["results"]:
            continue
        samples, _ = metric_samples(results, task, "pct_stereotype")
        if samples is None:
            return None
        keys += samples.keys
        hashes += samples.hashes
        outcomes.append(samples.columns["outcome"])
        types += [task] * samples.units
    if not keys:
        return None
    strata = np.unique(types, return_inverse=True)[1]
    return MetricSamples(spec(metric), keys, hashes, {"outcome": np.concatenate(outcomes), "stratum": strata})
