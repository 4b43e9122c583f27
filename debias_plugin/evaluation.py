"""evaluate(model folder, tasks) -> lm-eval results with per-document samples, cached by the model's content hash.

One call runs `lm_eval.simple_evaluate(..., log_samples=True)` through lm_eval/run.py, which `debias eval` shares
(task check, device default, model-class choice, include path, model registration). The results (and each task's
samples, without the prompt texts and raw responses) are kept under $DEBIAS_CACHE_DIR/results/ (default
~/.cache/debias_plugin/results/), keyed by the model folder's content hash, the tasks, the limit, the model class
and arguments, the lm-eval and debias-plugin versions, the bundled task definitions and the data folder: the same
request is answered from disk without importing lm-eval or torch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from debias_plugin.lm_eval.run import (  # noqa: F401  (the gate and the sweep read these names from here)
    CAUSAL_MODEL_CLASS,
    MASKED_MODEL_CLASS,
    UnknownTaskError,
    resolve_model_class,
)

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
SEAT_TASK = "seat"  # not an lm-eval task: SEAT effect sizes (scoring/seat.py), reported like one as seat/<metric>
_SAMPLES_NAME = "samples_{task}.jsonl"
_DROPPED_SAMPLE_FIELDS = ("arguments", "resps")  # prompt texts and raw responses: large and kept in "doc"
_KEY_SCHEMA = "debias_plugin.results-cache/2"  # 2: causal LMs default to hf-bias (was hf)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _task_definitions_hash() -> str:
    """Hash of the bundled task YAML and Python files (not their READMEs, nor the __pycache__ lm-eval writes)."""
    from debias_plugin.paths import tasks_dir

    root = tasks_dir()
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*")):
        if file.is_file() and "__pycache__" not in file.parts and file.suffix not in (".pyc", ".md"):
            digest.update(f"{file.relative_to(root).as_posix()}\0".encode() + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _model_hash(model_dir: str | Path) -> str:
    """content_hash of a model folder, read once per process while its files' names, sizes and mtimes stay put."""
    root = Path(model_dir).expanduser().resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return _content_hash((str(root), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)))


# A process cache, kept on purpose: the gate and the sweep ask for the same folders' keys again and again, and
# hashing a 500 MB model takes seconds; the key is every file's size and mtime, so a changed folder is hashed anew.
@functools.lru_cache(maxsize=64)
def _content_hash(signature: tuple) -> str:
    from debias_plugin.outputs import content_hash

    return content_hash(Path(signature[0]))


def cache_key(model_dir: str | Path, tasks: list[str], *, model_class: str | None = None,
              model_args: dict | None = None, limit: int | float | None = None) -> str:
    """The cache entry name for one evaluation request (the model by content, never by path; the default model
    class by its name, so a request that names it shares the entry)."""
    from debias_plugin.paths import data_root

    payload = {"schema": _KEY_SCHEMA, "model_sha256": _model_hash(model_dir), "tasks": sorted(set(tasks)),
               "limit": limit, "model_class": model_class or resolve_model_class(model_dir),
               "model_args": model_args or {},
               "lm_eval": _version("lm-eval"), "debias_plugin": _version("debias-plugin"),
               "task_definitions": _task_definitions_hash(), "data_dir": str(data_root())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_results_folder(folder: str | Path) -> dict:
    """results.json plus samples_<task>.jsonl of a folder written by `save_results`, as one results dict."""
    from debias_plugin.data._io import json_document, jsonl_rows

    folder = Path(folder)
    results = json_document(folder / RESULTS_NAME)
    results["samples"] = {task: [row for _, row in jsonl_rows(folder / _SAMPLES_NAME.format(task=task))]
                          for task in results.pop("samples_tasks", [])}
    return results


def portable_results(results: dict) -> dict:
    """The results as plain JSON values, samples without prompt texts and raw responses: what the cache holds."""
    from debias_plugin.lm_eval.run import plain_json

    samples = {task: [{key: value for key, value in row.items() if key not in _DROPPED_SAMPLE_FIELDS}
                      for row in rows] for task, rows in (results.get("samples") or {}).items()}
    plain = {key: value for key, value in results.items() if key != "samples"}
    plain["samples"] = samples
    return plain_json(plain)


def save_results(results: dict, folder: str | Path, *, manifest: dict | None = None, force: bool = False,
                 inputs: list | None = None) -> Path:
    """Write portable results as results.json + samples_<task>.jsonl (+ manifest), one folder, all or nothing."""
    from debias_plugin.outputs import OutputFolder

    out = OutputFolder(folder, inputs=inputs or [], force=force, option="output folder")
    samples = results.get("samples") or {}
    aggregated = {key: value for key, value in results.items() if key != "samples"}
    aggregated["samples_tasks"] = sorted(samples)
    with out.staging() as staging:
        (staging / RESULTS_NAME).write_text(json.dumps(aggregated, indent=2) + "\n", encoding="utf-8")
        for task, rows in samples.items():
            with open(staging / _SAMPLES_NAME.format(task=task), "w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")
        return out.publish(staging, manifest)


def _cache_entry(model_dir, tasks, *, model_class, model_args, limit) -> Path:
    """The request's folder under $DEBIAS_CACHE_DIR/results/."""
    from debias_plugin.paths import cache_root

    return cache_root() / "results" / cache_key(model_dir, tasks, model_class=model_class, model_args=model_args,
                                                limit=limit)


def _read_entry(entry: Path) -> dict | None:
    from debias_plugin.outputs import MANIFEST_NAME

    if (entry / RESULTS_NAME).is_file() and (entry / MANIFEST_NAME).is_file():
        return read_results_folder(entry)
    return None


def cached_results(model_dir: str | Path, tasks: list[str], *, model_class: str | None = None,
                   model_args: dict | None = None, limit: int | None = None) -> dict | None:
    """The cached results of exactly this request, or None."""
    return _read_entry(_cache_entry(model_dir, tasks, model_class=model_class, model_args=model_args, limit=limit))


def describe_tasks(tasks: list[str]) -> dict[str, set[str] | None]:
    """Every task and group the request will report (groups expanded), with its declared metrics (None: unknown).

    Lets a caller check task/metric names before any model loads; raises UnknownTaskError for a name lm-eval
    does not know.
    """
    from debias_plugin.lm_eval.run import declared_metrics

    described: dict[str, set[str] | None] = {SEAT_TASK: None} if SEAT_TASK in tasks else {}
    return described | declared_metrics([task for task in tasks if task != SEAT_TASK])


def evaluate(model_dir: str | Path, tasks: list[str], *, model_class: str | None = None,
             model_args: dict | None = None, batch_size: int | str = 16, limit: int | None = None,
             device: str | None = None, output_dir: str | Path | None = None, force: bool = False,
             use_cache: bool = True, on_counts: Callable[[dict], None] | None = None) -> dict:
    """lm-eval results of `tasks` on a model folder, with per-document samples under "samples" (cached).

    model_class: lm-eval model name; default hf-bias for causal LMs and hf-mlm for masked LMs. output_dir, if given,
    also receives results.json + samples_<task>.jsonl (a folder `debias gate` reads with `results:`). on_counts, if
    given, receives this run's request counts from the model (hf-bias); a request answered by the cache scores none.
    """
    from debias_plugin.models import check_weights
    from debias_plugin.outputs import OutputFolder, manifest

    model_dir = Path(model_dir).expanduser().resolve()
    check_weights(model_dir)
    if output_dir is not None:
        OutputFolder(output_dir, inputs=[model_dir], force=force)  # all checks before the model loads
    request = dict(model_class=model_class, model_args=model_args, limit=limit)
    entry = _cache_entry(model_dir, tasks, **request)
    results = _read_entry(entry) if use_cache else None
    if results is None:
        results = portable_results(_run(model_dir, tasks, model_class=model_class, model_args=model_args or {},
                                        batch_size=batch_size, limit=limit, device=device, on_counts=on_counts))
        if use_cache:
            record = manifest("evaluate", options={**request, "tasks": list(tasks), "cache_key": entry.name},
                              inputs={"model": model_dir}, results={}, hash_inputs=False)
            save_results(results, entry, manifest=record, force=True)
    else:
        logger.info("Results of %s on %s from the cache (%s).", model_dir, ", ".join(tasks), entry)
    if output_dir is not None:
        save_results(results, output_dir, force=force, inputs=[model_dir],
                     manifest=manifest("evaluate", options={**request, "tasks": list(tasks)}, results={},
                                       inputs={"model": model_dir}, hash_inputs=False))
    return results


def _run(model_dir: Path, tasks: list[str], *, model_class, model_args, batch_size, limit, device, on_counts) -> dict:
    """lm-eval on its tasks; SEAT (if asked) beside them, as results["results"]["seat"]."""
    from debias_plugin.lm_eval.run import evaluate_tasks

    lm_tasks = [task for task in tasks if task != SEAT_TASK]
    results = evaluate_tasks(model_dir, lm_tasks, model_class=model_class, model_args=model_args,
                             batch_size=batch_size, limit=limit, device=device,
                             on_counts=on_counts) if lm_tasks else {"results": {}, "samples": {}}
    if SEAT_TASK in tasks:
        from debias_plugin.scoring.seat import seat_metrics

        metrics = seat_metrics(model_dir)
        results["results"][SEAT_TASK] = {f"{name.split('/', 1)[1]},none": value for name, value in metrics.items()}
    return results



def document_values(model_dir: str | Path, task: str, unit: str, indices: list[int],
                    score: Callable[[list[int]], dict[int, object]], *, model_class: str | None = None,
                    model_args: dict | None = None, limit: int | None = None) -> dict[int, object]:
    """Per-document (or per-window: `unit`) results of `task` on a model for `indices`: those scored before come
    from the cache (keyed like evaluate's, by the model's content), the rest from `score(missing)`, saved at once.

    A sequential screen asks chunk by chunk, so the base's documents are scored once for every sweep on that model
    and a run killed mid-screen resumes without re-scoring the chunks it finished.
    """
    from debias_plugin.outputs import write_text_atomically
    from debias_plugin.paths import cache_root

    key = cache_key(model_dir, [task], model_class=model_class, model_args=model_args, limit=limit)
    path = cache_root() / "documents" / key / f"{task}.{unit}.json"

    def stored() -> dict[int, object]:
        return {int(index): value for index, value in json.loads(path.read_text()).items()} if path.is_file() else {}

    found = stored()
    missing = [index for index in indices if index not in found]
    if missing:
        scored = score(missing)
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**stored(), **scored}  # another process may have added documents meanwhile
        write_text_atomically(path, json.dumps({str(index): merged[index] for index in sorted(merged)}))
        found.update(scored)
    return {index: found[index] for index in indices}
