"""`debias gate`: turn lm-eval scores into a pass/fail decision for CI, with intervals and tests that resist noise.

    report = run_gate("gates/example.yml")      # evaluates (cached) or reads results, runs every check
    print(terminal_table(report)); write_reports(report, junit="gate.xml")
    sys.exit(report.exit_code)                  # 0 all passed, 1 a check failed (bad input raises DebiasError: 2)
"""

from __future__ import annotations

import time
from pathlib import Path

from debias_plugin.default_model import is_builtin, resolve_model
from debias_plugin.errors import DebiasError
from debias_plugin.gate.config import Gate, is_results_file, load_gate
from debias_plugin.gate.report import GateReport, markdown_summary, junit_xml, terminal_table, write_reports
from debias_plugin.gate.results import Results, read_results, results_from_dict

__all__ = ["GateReport", "load_gate", "run_gate", "terminal_table", "markdown_summary", "junit_xml", "write_reports",
           "gate_inputs"]


def gate_inputs(gate: Gate) -> list[Path]:
    """Files and folders the gate reads (report files must not overwrite them): the gate file, the models, the
    results files and the per-sample files lm-eval wrote beside them, and the data folder an evaluation reads."""
    from debias_plugin.paths import data_root

    config = gate.config
    named = [gate.resolve(value) for value in (config.model, config.results, config.baseline)
             if value and not is_builtin(value)]
    beside = [sample for path in named if path.suffix == ".json" for sample in path.parent.glob("samples_*.jsonl")]
    return [gate.path, *named, *beside, *([data_root()] if data_root() else [])]


def _results_file(gate: Gate, field: str, value: str) -> tuple[Results, str]:
    path = gate.resolve(value)
    if not path.is_file():
        raise gate.error((field,), "an existing lm-eval results JSON file", f"{path}, which does not exist")
    results = read_results(path)
    return results, f"{path} ({'with' if results.samples else 'no'} per-sample data)"


def _model_folder(gate: Gate, field: str, value: str) -> Path:
    if is_builtin(value):
        return Path(resolve_model(value))
    path = gate.resolve(value)
    if not (path / "config.json").is_file():
        raise gate.error((field,), "a model folder with config.json, 'default', or a results .json file",
                         f"{path}" + (" (no config.json there)" if path.is_dir() else ", which does not exist"))
    return path


def _check_names_before_running(gate: Gate) -> None:
    """Unknown tasks and metrics are errors before any model loads (needs lm-eval's task index)."""
    from debias_plugin.evaluation import UnknownTaskError, describe_tasks

    tasks = gate.config.tasks
    try:
        described = describe_tasks(tasks)
    except UnknownTaskError as err:
        raise gate.error(("tasks", tasks.index(err.task)), "a task lm-eval knows (ours: crows_bias*, "
                         "stereoset_bias*, wikitext2_ppl*; or any of lm-eval's)", f"'{err.task}'") from None
    for index, check in enumerate(gate.config.checks):
        if check.task is None:
            continue  # types_not_worse: whichever per-type tasks the results hold
        if check.task not in described:
            raise gate.error(("checks", index, "metric"), f"a task that the gate's tasks report "
                             f"({', '.join(sorted(described))})", f"'{check.task}'")
        declared = described[check.task]
        if declared is not None and check.metric_name.split(",")[0] not in declared:
            raise gate.error(("checks", index, "metric"), f"a metric of {check.task} ({', '.join(sorted(declared))})",
                             f"'{check.metric_name}'")


def _evaluated(gate: Gate, field: str, value: str) -> tuple[Results, str]:
    from debias_plugin import evaluation

    config = gate.config
    model_dir = _model_folder(gate, field, value)
    request = dict(model_class=config.model_class, model_args=config.model_args, limit=config.limit)
    try:
        cached = evaluation.cached_results(model_dir, config.tasks, **request)
        origin = "cached results"
        if cached is None:
            _check_names_before_running(gate)
            cached = evaluation.evaluate(model_dir, config.tasks, batch_size=config.batch_size, device=config.device,
                                         **request)
            origin = "evaluated now, cached"
    except DebiasError as err:
        if str(err).startswith(str(gate.path)):
            raise
        raise DebiasError(f"{gate.path}, {gate.where(field)}: {err}") from None
    return results_from_dict(cached, str(model_dir)), f"{model_dir} ({origin})"


def _source(gate: Gate, field: str, value: str) -> tuple[Results, str]:
    """The results and a description of where they came from (for the report)."""
    if field == "results" or (field == "baseline" and is_results_file(value)):
        return _results_file(gate, field, value)
    return _evaluated(gate, field, value)


def run_gate(path: str | Path) -> GateReport:
    """Validate the gate file, obtain the results (cache, lm-eval run or results file) and run every check."""
    from debias_plugin.gate.checks import run_check

    started = time.perf_counter()
    gate = load_gate(path)
    config = gate.config
    field = "model" if config.model is not None else "results"
    candidate, candidate_source = _source(gate, field, config.model or config.results)
    baseline, baseline_source = _source(gate, "baseline", config.baseline) if config.baseline else (None, None)
    checks = [run_check(check, index, gate, candidate, baseline) for index, check in enumerate(config.checks)]
    return GateReport(gate=str(gate.path), name=config.name or gate.path.stem, alpha=config.alpha,
                      candidate=candidate_source, baseline=baseline_source, checks=checks,
                      seconds=time.perf_counter() - started)
