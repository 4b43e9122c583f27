"""lm-eval's public entry points as `debias eval` (its CLI) and `evaluation.evaluate` (its simple_evaluate) both use
them: one task check, one device default, one model-class choice, one include path, one model registration.

Nothing here imports lm_eval or torch at module level: evaluation.py reads the model-class names from here and
answers cached requests without either.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from debias_plugin.errors import DebiasError

CAUSAL_MODEL_CLASS = "hf-bias"  # lm-eval's hf scores, for less work (bias_lm.py); --model hf still works
MASKED_MODEL_CLASS = "hf-mlm"


class UnknownTaskError(DebiasError):
    """Task names neither our include path nor lm-eval knows; callers say where the names came from."""

    def __init__(self, tasks: list[str], known: list[str], include_path: str):
        self.tasks, self.task, self.include_path = tasks, tasks[0], include_path
        close = [name for name in known if name.startswith(self.task.split("_")[0])][:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        super().__init__(f"lm-eval task '{self.task}' is neither one of ours nor one of lm-eval's{hint}.")


def include_path() -> str:
    """Our bundled tasks folder, the include path of every run that does not name its own."""
    from debias_plugin.paths import tasks_dir

    return str(tasks_dir())


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_model_class(model_dir: str | Path) -> str:
    """hf-bias for causal LMs, hf-mlm for masked LMs, from the folder's config (never its name)."""
    from debias_plugin.models import load_config, model_kind

    return MASKED_MODEL_CLASS if model_kind(load_config(model_dir)) == "masked" else CAUSAL_MODEL_CLASS


def task_manager(tasks: list[str], *, include: str | None = None, metadata: dict | None = None,
                 cli_forms: bool = False):
    """lm-eval's TaskManager over our tasks, plus lm-eval's own only when a name is not ours (indexing them reads
    every task YAML: seconds); UnknownTaskError for names in neither.

    cli_forms: also accept what `lm_eval run` resolves itself (task .yaml files, folders, glob patterns);
    simple_evaluate takes task and group names only.
    """
    from lm_eval.tasks import TaskManager

    include = include or include_path()

    def unknown(manager, names):
        if cli_forms:
            return [name for name in names if not manager.match_tasks([name])]
        known = set(manager.all_tasks)
        return [name for name in names if name not in known]

    names = [name for name in tasks if not (cli_forms and (name.endswith(".yaml") or Path(name).is_dir()))]
    manager = TaskManager(include_path=include, include_defaults=False, metadata=metadata)
    missing = unknown(manager, names)
    if missing:
        manager = TaskManager(include_path=include, metadata=metadata)
        missing = unknown(manager, missing)
    if missing:
        raise UnknownTaskError(missing, sorted(manager.all_tasks), include)
    return manager


@functools.lru_cache(maxsize=8)
def _task_catalog(tasks: tuple[str, ...]):
    """The task index for these names (building lm-eval's reads every task YAML: seconds, so once per process)."""
    return task_manager(list(tasks))


def declared_metrics(tasks: list[str]) -> dict[str, set[str] | None]:
    """Every task and group these names report (groups expanded), with its declared metrics (None: unknown)."""
    manager = _task_catalog(tuple(sorted(tasks)))
    described: dict[str, set[str] | None] = {}
    pending = list(tasks)
    while pending:
        name = pending.pop()
        if name in described:
            continue
        entry = manager.task_index.get(name)
        config = (entry.cfg or {}) if entry is not None else {}
        listed = config.get("metric_list") or config.get("aggregate_metric_list")
        described[name] = ({item["metric"] for item in listed if isinstance(item, dict) and "metric" in item}
                           if listed else None)
        members = config.get("task")  # a group's members: names or inline task configs
        if isinstance(members, list):
            names = [m if isinstance(m, str) else m.get("task") for m in members]
            pending.extend(n for n in names if isinstance(n, str))
    return described


def leaf_tasks(tasks: list[str]) -> set[str]:
    """The names that are single tasks, not groups: those lm-eval's `samples` selection can take."""
    manager = _task_catalog(tuple(sorted(tasks)))
    return {name for name in tasks if name in manager.task_index
            and manager.task_index[name].kind.name not in ("GROUP", "TAG")}


def pooled_members(task: str, metric: str) -> list[str] | None:
    """The single tasks whose documents, pooled, give `task`'s `metric`: [task] for a single task, a group's members
    where it aggregates the metric as a size-weighted mean (CrowS's crows_bias); None otherwise."""
    manager = _task_catalog((task,))
    entry = manager.task_index.get(task)
    if entry is None:
        return None
    if entry.kind.name not in ("GROUP", "TAG"):
        return [task]
    config = entry.cfg or {}
    pooled = any(item.get("metric") == metric and item.get("aggregation") == "mean" and item.get("weight_by_size")
                 for item in config.get("aggregate_metric_list") or [] if isinstance(item, dict))
    members = config.get("task")
    if not pooled or not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        return None
    single = [m for m in members if m in manager.task_index and manager.task_index[m].kind.name not in ("GROUP", "TAG")]
    return members if len(single) == len(members) else None


def parse_model_args(values: list[list[str]]) -> dict:
    """--model_args as lm-eval merges them: JSON objects or key=value,key=value strings, later ones winning."""
    from lm_eval.utils import simple_parse_args_string

    merged = {}
    for value in (value for group in values for value in group):
        try:
            merged.update(json.loads(value) if value.lstrip().startswith("{") else simple_parse_args_string(value))
        except json.JSONDecodeError as err:
            raise DebiasError(f"--model_args {value!r}: expected a JSON object or key=value pairs ({err}).") from None
    return merged


def plain_json(value):
    """value in plain JSON types, anything else converted as lm-eval converts it in its own results files."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(value, default=handle_non_serializable))


def evaluate_tasks(model_dir: Path, tasks: list[str], *, model_class: str | None, model_args: dict,
                   batch_size: int | str, limit: int | float | None, device: str | None,
                   on_counts: Callable[[dict], None] | None = None) -> dict:
    """lm_eval.simple_evaluate of a model folder on our tasks (per-document samples kept; no bootstrap).

    on_counts receives the model's own request counts (hf-bias: received and scored per request kind).
    """
    model_args = {"pretrained": str(model_dir), **model_args}
    manager = task_manager(tasks, metadata=model_args)  # metadata reaches our loaders: StereoSet counts tokens
    loaded = load_model(model_dir, model_class=model_class, model_args=model_args, batch_size=batch_size,
                        device=device)
    results = evaluate_loaded(loaded, tasks, limit=limit, manager=manager)
    if on_counts is not None and hasattr(loaded.lm, "request_counts"):
        on_counts(dict(loaded.lm.request_counts))
    return results


@dataclass
class LoadedModel:
    """An lm-eval model object and how it was made: several runs (a sequential screen's chunks) share one load."""

    lm: object
    model_class: str
    model_args: dict
    batch_size: int | str
    device: str
    managers: dict = field(default_factory=dict)  # task tuple -> TaskManager: indexed once per model, not per run


def load_model(model_dir: Path, *, model_class: str | None, model_args: dict, batch_size: int | str,
               device: str | None) -> LoadedModel:
    """The model object built as simple_evaluate builds it from a name, so that its counts can be read after a run."""
    from lm_eval.api.registry import get_model

    from debias_plugin.lm_eval import register_models

    model_args = {"pretrained": str(model_dir), **model_args}
    model_class = model_class or resolve_model_class(model_dir)
    device = device or default_device()
    register_models()
    lm = get_model(model_class).create_from_arg_obj(model_args, {"batch_size": batch_size, "device": device})
    return LoadedModel(lm, model_class, model_args, batch_size, device)


def evaluate_loaded(loaded: LoadedModel, tasks: list[str], *, limit: int | float | None = None,
                    samples: dict[str, list[int]] | None = None, manager=None) -> dict:
    """simple_evaluate on a loaded model: every document (up to limit), or those `samples` names ({task: document
    indices}, lm-eval's own selection)."""
    import lm_eval

    if manager is None and tuple(tasks) not in loaded.managers:
        loaded.managers[tuple(tasks)] = task_manager(tasks, metadata=loaded.model_args)
    manager = manager or loaded.managers[tuple(tasks)]
    results = lm_eval.simple_evaluate(model=loaded.lm, model_args=loaded.model_args, tasks=list(tasks),
                                      task_manager=manager, limit=limit, samples=samples, log_samples=True,
                                      bootstrap_iters=0, batch_size=loaded.batch_size, device=loaded.device)
    if results is None:
        raise DebiasError("lm-eval returned no results in this process (not rank 0 of a distributed run).")
    results["config"]["model"] = loaded.model_class  # simple_evaluate names a model object by its path; we keep the name
    return results


def task_documents(loaded: LoadedModel, task: str, limit: int | None = None) -> tuple[object, list]:
    """(lm-eval's task object, its evaluation documents up to limit): what a per-window scorer reads."""
    from lm_eval.tasks import get_task_dict

    task_object = get_task_dict([task], task_manager([task], metadata=loaded.model_args))[task]
    documents = list(task_object.eval_docs)
    return task_object, documents[:limit] if limit is not None else documents


def run_cli(args: list[str]) -> None:
    """`lm_eval run ARGS` exactly as the `lm_eval` console script runs it, with our model classes registered."""
    # lm-eval 0.4.13's public API has no entry that takes an argument list: lm_eval.__main__.cli_evaluate (the
    # console script) takes none and reads sys.argv; its parser, HarnessCLI, lives in the private lm_eval._cli and
    # its parse_args() reads sys.argv too (only its private _parser takes a list). So sys.argv is set for the call.
    from lm_eval.__main__ import cli_evaluate

    from debias_plugin.lm_eval import register_models

    register_models()
    saved_argv, sys.argv = sys.argv, ["lm-eval", "run", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved_argv

