"""Evaluation cost of a 5-point negation sweep: `debias sweep` vs five independent lm-eval runs (not a test).

Both sides evaluate the same five model folders (lambda 0 = the base, and four negations):
  sweep  `debias_plugin.sweep.run_sweep` with a fresh evaluation cache: the screening tasks (objective + budget)
         at every point, the other tasks only on the Pareto front and the chosen point, identical requests
         scored once (`hf-bias`);
  naive  `lm_eval.simple_evaluate` of the whole suite on each model, one run per model, as a script would.
Printed: lm-eval requests scored by each side (the sweep's from hf-bias's counters, the naive side's from
the per-sample arguments of its logged samples), wall times, and every metric the sweep reports compared with
the naive run of the same model and task.

    python benchmarks/bench_sweep_cost.py                           # tiny GPT-2 + a perturbed copy, --limit 40
    python benchmarks/bench_sweep_cost.py --base default --adapter DIR --limit 0 --device cuda   # SmolLM2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DEBIAS_DATA_DIR", str(REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO / "tests"))  # tiny_models: the fixtures the tests use
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_models(work: Path) -> tuple[Path, Path]:
    """A seeded tiny GPT-2 and a copy with every weight perturbed, as the tests build them."""
    import torch
    from transformers import AutoModelForCausalLM

    from debias_plugin.data import load_crows_pairs, load_wikitext_documents
    from tiny_models import build_tiny_model

    texts = [s for p in load_crows_pairs() for s in (p.sent_more, p.sent_less)]
    base = build_tiny_model("gpt2", work / "base", texts + load_wikitext_documents()[0].split("\n")[:400])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    biased = work / "biased"
    model.save_pretrained(biased, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, biased / name)
    return base, biased


def naive_run(model: Path, tasks: list[str], limit: int | None, device: str, batch_size: int) -> tuple[dict, int]:
    """One independent lm-eval run of the whole suite: its results and the requests it scored."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from debias_plugin.paths import tasks_dir

    manager = TaskManager(include_path=str(tasks_dir()), metadata={"pretrained": str(model)})
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model)}, tasks=tasks, limit=limit,
                                      task_manager=manager, log_samples=True, bootstrap_iters=0, device=device,
                                      batch_size=batch_size)
    requests = sum(len(sample["arguments"]) for rows in results["samples"].values() for sample in rows)
    return results, requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="Model folder or 'default' (SmolLM2-135M); default: a tiny GPT-2.")
    parser.add_argument("--biased", help="Fully fine-tuned biased model (with --base).")
    parser.add_argument("--adapter", help="LoRA bias adapter (with --base).")
    parser.add_argument("--lambdas", default="0,0.25,0.5,1,2", help="Five lambdas; 0 is the base model itself.")
    parser.add_argument("--tasks", default="crows_bias,stereoset_bias,wikitext2_ppl")
    parser.add_argument("--objective", default="crows_bias/pct_stereotype")
    parser.add_argument("--budget", default="wikitext2_ppl/word_perplexity")
    parser.add_argument("--max-relative-increase", type=float, default=0.02)
    parser.add_argument("--limit", type=int, default=40, help="lm-eval limit per task (0 = whole tasks).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", help="Working folder (default: a temporary one, removed afterwards).")
    parser.add_argument("--json", help="Write the measurements here.")
    args = parser.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_sweep_cost_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["DEBIAS_CACHE_DIR"] = str(work / "cache")  # nothing cached: the sweep scores everything it needs
    if args.base:
        from debias_plugin.default_model import materialize_default_model

        base = materialize_default_model() if args.base == "default" else Path(args.base).resolve()
        source = {"adapter": args.adapter} if args.adapter else {"biased": args.biased}
    else:
        base, biased = tiny_models(work)
        source = {"biased": str(biased)}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = args.limit or None
    lambdas = [float(x) for x in args.lambdas.split(",")]
    sweep_file = work / "sweep.yml"
    sweep_file.write_text(json.dumps({  # JSON is YAML
        "name": "cost", "base": str(base), "method": "negate", "fixed": source, "grid": {"lambda": lambdas},
        "evaluate": tasks, "objective": args.objective,
        "budget": {args.budget: {"max_relative_increase": args.max_relative_increase}},
        "limit": limit, "device": args.device, "batch_size": args.batch_size}, indent=1))

    from debias_plugin.sweep import run_sweep

    started = time.monotonic()
    out = run_sweep(sweep_file, work / "sweep")
    sweep_seconds = time.monotonic() - started
    content = json.loads((out / "sweep.json").read_text())
    sweep_requests = content["run"]["requests_scored"]
    points = content["points"]

    naive_requests, naive_seconds, differences, compared = 0, 0.0, [], 0
    for point in points:
        model = Path(point["model"]) if Path(point["model"]).is_absolute() else out / point["model"]
        started = time.monotonic()
        results, requests = naive_run(model, tasks, limit, args.device, args.batch_size)
        naive_seconds += time.monotonic() - started
        naive_requests += requests
        for key, entry in point["metrics"].items():
            task, metric = key.split("/", 1)
            reference = results["results"].get(task, {}).get(f"{metric},none")
            if entry["value"] is None or not isinstance(reference, (int, float)) or not math.isfinite(reference):
                continue
            compared += 1
            differences.append((abs(entry["value"] - reference), point["name"], key, entry["value"], reference))
        print(f"  naive run {point['name']}: {requests} requests, {time.monotonic() - started:.1f} s", flush=True)

    worst = max(differences) if differences else (0.0, "", "", None, None)
    identical = sum(1 for d in differences if d[0] == 0.0)
    full = [p["name"] for p in points if p["suite"] == "full"]
    report = {
        "model": str(base), "lambdas": lambdas, "tasks": tasks, "limit": limit, "device": args.device,
        "screen_tasks": content["tasks"]["screen"], "full_suite_points": full,
        "sweep": {"requests_scored": sweep_requests, "requests_received": content["run"]["requests_received"],
                  "wall_seconds": round(sweep_seconds, 1),
                  "evaluation_seconds": content["run"]["evaluation_seconds"]},
        "naive": {"runs": len(points), "requests_scored": naive_requests, "wall_seconds": round(naive_seconds, 1)},
        "requests_ratio_sweep_over_naive": round(sweep_requests / naive_requests, 4),
        "metrics_compared": compared, "metrics_identical": identical,
        "max_abs_difference": worst[0], "worst": worst[1:],
        "differing": sorted({key for d, _, key, _, _ in differences if d}),
    }
    print(f"\nsweep: {sweep_requests} requests scored ({content['run']['requests_received']} received; "
          f"screening {', '.join(content['tasks']['screen'])} on {len(points)} points, the rest on {len(full)}: "
          f"{', '.join(full)}), {sweep_seconds:.1f} s")
    print(f"naive: {naive_requests} requests in {len(points)} independent lm-eval runs, {naive_seconds:.1f} s")
    print(f"requests ratio sweep / naive = {report['requests_ratio_sweep_over_naive']:.3f}; wall ratio = "
          f"{sweep_seconds / naive_seconds:.3f}")
    print(f"metrics: {identical} of {compared} identical; max |difference| {worst[0]:.3g}"
          + (f" ({worst[1]} {worst[2]}: {worst[3]} vs {worst[4]})" if worst[0] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if compared and worst[0] <= 1e-6 * max(1.0, abs(worst[4] or 1.0)) else 1)


if __name__ == "__main__":
    main()
