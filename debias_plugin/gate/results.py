"""lm-eval results (a results JSON and its samples_*.jsonl files) and the per-sample data behind one metric."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from debias_plugin.data import STEREOSET_DOMAINS
from debias_plugin.errors import DataError, DebiasError
from debias_plugin.scoring.gap import gap_source

# lm-eval names a run's files results_<date>.json / samples_<task>_<date>.jsonl (or <stem>_<date>.json for an
# --output_path ending in .json); our cache and `evaluate(output_dir=...)` write results.json / samples_<task>.jsonl.
_DATE = re.compile(r"_(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)$")
_WEIGHTED_PERPLEXITIES = ("word_perplexity", "byte_perplexity")
_STEREOSET = re.compile(rf"^(ss|lms|icat)(?:_({'|'.join(STEREOSET_DOMAINS)}))?$")


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
    value = results.data["results"][task][key]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DebiasError(f"{results.source}: results[{task!r}][{key!r}] is {value!r}, not a number.") from None


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
    """Per-unit data for one metric: what a bootstrap resamples and a paired test aligns.

    kind: 'binary' (0/1 outcomes, e.g. CrowS pct_stereotype), 'mean', 'weighted_perplexity', 'bits_per_byte',
    'perplexity' (units: documents) or 'stereoset' (units: target terms, per-target SS and LMS).
    """

    kind: str
    keys: list[tuple]
    hashes: list[str]
    columns: dict[str, np.ndarray]
    scale: float = 1.0  # 100 when per-document values are 0/100 (our percentages), else 1
    unit_name: str = "documents"

    @property
    def units(self) -> int:
        return len(self.keys)


def _binary_scale(values: list, metric: str) -> float | None:
    """100 or 1 when every value is an outcome (0/100, 0/1, booleans); None for other numbers."""
    if any(isinstance(v, bool) for v in values):
        return 1.0 if all(isinstance(v, bool) or v in (0, 1) for v in values) else None
    distinct = set(values)
    if distinct <= {0, 100} and 100 in distinct:
        return 100.0
    if distinct <= {0, 1} and 1 in distinct:
        return 1.0
    if distinct == {0}:
        return 100.0 if metric.startswith("pct_") else 1.0
    return None


def _stereoset_columns(records: list[tuple[tuple, str, list]], metric: str):
    """Per-target SS and LMS from the task's own scorer (one target's macro average is that target's score)."""
    from debias_plugin.scoring.stereoset import ScoredExample, stereoset_scores

    domain = _STEREOSET.match(metric).group(2)
    by_target: dict[str, list] = {}
    hashes: dict[str, list[str]] = {}
    for _, doc_hash, (target, bias_type, *scores) in records:
        if domain in (None, bias_type):
            by_target.setdefault(target, []).append(ScoredExample(target, *scores))
            hashes.setdefault(target, []).append(doc_hash)
    targets = sorted(by_target)
    per_target = [stereoset_scores(by_target[t]) for t in targets]
    return ([(t,) for t in targets],
            [hashlib.sha256("".join(sorted(hashes[t])).encode()).hexdigest() for t in targets],
            {"ss": np.array([s.ss for s in per_target]), "lms": np.array([s.lms for s in per_target])})


def metric_samples(results: Results, task: str, metric: str) -> tuple[MetricSamples | None, str]:
    """The per-sample data behind results[task][metric] (pooled over a group's tasks), or None and the reason."""
    name, _, filter_name = metric.partition(",")
    name = gap_source(name) or name  # |x - 50| has x's per-document data; callers map x's interval
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
    first = records[0][2]
    is_sequence = isinstance(first, (list, tuple))
    if is_sequence and len(first) == 5 and isinstance(first[0], str) and _STEREOSET.match(name):
        keys, hashes, columns = _stereoset_columns(records, name)
        if len(keys) == 0:
            return None, "no StereoSet examples for this domain"
        return MetricSamples("stereoset", keys, hashes, columns, 100.0, "target terms"), ""
    is_marked = is_sequence and len(first) == 2 and isinstance(first[1], bool)
    if is_marked:
        records = [(key, doc_hash, value) for key, doc_hash, (value, marked) in records if marked]
        if not records:
            return None, "no marked documents"
    keys, hashes, values = (list(column) for column in zip(*records))
    if is_sequence and not is_marked and len(first) == 2 and name in (*_WEIGHTED_PERPLEXITIES, "bits_per_byte"):
        pairs = np.array(values, float)
        kind = "bits_per_byte" if name == "bits_per_byte" else "weighted_perplexity"
        return MetricSamples(kind, keys, hashes, {"loglikelihood": pairs[:, 0], "weight": pairs[:, 1]}), ""
    if not all(isinstance(v, (int, float)) for v in values):  # bool is an int: outcomes pass
        return None, f"no estimator for per-document values like {first!r}"
    if name == "perplexity":
        return MetricSamples("perplexity", keys, hashes, {"loglikelihood": np.array(values, float)}), ""
    scale = _binary_scale(values, name)
    if scale is not None:
        outcomes = np.array([float(v) / scale for v in values])
        return MetricSamples("binary", keys, hashes, {"outcome": outcomes}, scale), ""
    return MetricSamples("mean", keys, hashes, {"value": np.array(values, float)}), ""


def same_point(first: float, second: float) -> bool:
    """Recomputed and reported values agree (float rounding aside); NaN agrees with NaN."""
    if math.isnan(first) or math.isnan(second):
        return math.isnan(first) and math.isnan(second)
    return math.isclose(first, second, rel_tol=1e-6, abs_tol=1e-9)
