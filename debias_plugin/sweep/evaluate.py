"""One point's model through lm-eval (debias_plugin.evaluation) with what it cost, and the model's identity."""

from __future__ import annotations

import time
from pathlib import Path

from debias_plugin.sweep.plan import Sweep


def evaluate_model(model_dir: Path, tasks: list[str], sweep: Sweep, output_dir: Path, *,
                   model_class: str | None = None, model_args: dict | None = None) -> tuple[dict, dict]:
    """lm-eval results of `tasks` on a model folder (through debias_plugin.evaluation), and what it cost.

    A published results folder is read back instead (resume). Causal LMs go through `hf-bias`, which scores
    identical requests once and counts what it scored (this run's counts, through on_counts); evaluation's cache
    answers repeated requests for the same model content without scoring anything. `model_class`/`model_args`:
    a stage that is scored another way (a direction: the base through hf-steered-safe with its steering file).
    """
    from debias_plugin.evaluation import RESULTS_NAME, evaluate, read_results_folder, resolve_model_class

    if (output_dir / RESULTS_NAME).is_file():
        return read_results_folder(output_dir), {"from": "results folder"}
    config = sweep.config
    model_class = model_class or resolve_model_class(model_dir)
    counts: dict = {}
    started, cpu = time.monotonic(), time.process_time()
    results = evaluate(model_dir, tasks, model_class=model_class,
                       model_args={**config.model_args, **(model_args or {})}, batch_size=config.batch_size,
                       limit=config.limit, device=config.device, output_dir=output_dir, on_counts=counts.update)
    return results, {"seconds": round(time.monotonic() - started, 3),
                     "cpu_seconds": round(time.process_time() - cpu, 3), "model_class": model_class, **counts}


def weights_sha256(folder: Path) -> str:
    """Hash of a model's weights and config.json: its identity (mergekit's README.md names the staging folder)."""
    import hashlib

    from debias_plugin.outputs import sha256_file

    digest = hashlib.sha256()
    for file in sorted(Path(folder).iterdir()):
        if file.is_file() and (file.suffix == ".safetensors" or file.name in ("config.json", "adapter_config.json")):
            digest.update(f"{file.name}\0{sha256_file(file)}\0".encode())
    return digest.hexdigest()
