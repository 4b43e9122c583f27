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

--sequential-vs-full [SWEEP_FILE]: the same sweep twice, `evaluation: full` and `evaluation: sequential`, each
`debias sweep` a child process under /usr/bin/time -v with its own empty evaluation cache, side by side: the chosen
setting (equal?), the reported metrics (identical?), documents scored per point, evaluation CPU seconds (user +
sys of the child) and peak RSS of each, and their ratio. Without a file: the tiny GPT-2 negation grid below.

    python benchmarks/bench_sweep_cost.py --sequential-vs-full                          # tiny GPT-2, --limit 8
    python benchmarks/bench_sweep_cost.py --sequential-vs-full sweeps/negate_smollm2.yml    # SmolLM2, full sets
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

from machine import cpu_kind

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


def timed_sweep(sweep_file: Path, out: Path, cache: Path) -> dict:
    """`debias sweep FILE --out DIR` in a child under /usr/bin/time -v: its CPU seconds, peak RSS and wall time."""
    import re
    import subprocess

    command = ["/usr/bin/time", "-v", sys.executable, "-c", "from debias_plugin.cli import main; main()",
               "sweep", str(sweep_file), "--out", str(out)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "DEBIAS_CACHE_DIR": str(cache)})
    wall = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")

    def field(name: str) -> float:
        return float(re.search(rf"{re.escape(name)}: ([0-9.]+)", done.stderr).group(1))

    return {"cpu_seconds": round(field("User time (seconds)") + field("System time (seconds)"), 1),
            "peak_rss_mib": round(field("Maximum resident set size (kbytes)") / 1024, 1), "wall_seconds": round(wall, 1),
            "progress": [line for line in done.stderr.splitlines()
                         if "% of " in line and " → " in line and not line.startswith("INFO:")]}


def evaluation_cpu(content: dict) -> float:
    """CPU seconds the sweep itself measured around its evaluations: full evaluations plus sequential screens."""
    run = content["run"]
    full = sum((cost or {}).get("cpu_seconds", 0.0) for entry in run["cost"].values() for cost in entry.values())
    screens = run.get("screening", {}).get("cpu_seconds", {})
    return round(full + screens.get("stopped", 0.0) + screens.get("passed", 0.0), 1)


def documents_scored(content: dict) -> dict[str, str]:
    """Per point: units scored by the sequential screen per task (of the full set), or 'full sets'."""
    scored = {}
    for entry in content.get("stopped", []) + [dict(p["screening"], name=p["name"]) for p in content["points"]
                                                if "screening" in p]:
        counts = ", ".join(f"{task} {n}/{entry['population'][task]}" for task, n in entry["documents_scored"].items())
        scored[entry["name"]] = f"{entry['verdict']} after {counts}" + (" + full sets" if entry["verdict"] == "passed" else "")
    for point in content["points"]:
        scored.setdefault(point["name"], "full sets")
    return scored


def sequential_vs_full(sweep_file: Path | None, work: Path, lambdas: str, limit: int | None,
                       json_path: Path | None = None) -> int:
    """The same sweep with `evaluation: full` and sequential, side by side; exit status 1 if the choice or a
    reported number differs. `json_path`: the measurements as JSON."""
    import yaml

    if sweep_file is None:
        base, biased = tiny_models(work)
        config = {"name": "cost", "base": str(base), "method": "negate", "fixed": {"biased": str(biased)},
                  "grid": {"lambda": [float(x) for x in lambdas.split(",")]},
                  "evaluate": ["crows_bias_gender", "wikitext2_ppl"], "objective": "crows_bias_gender/pct_stereotype",
                  "budget": {"wikitext2_ppl/word_perplexity": {"max_relative_increase": 0.05}}, "limit": limit}
    else:
        config = yaml.safe_load(sweep_file.read_text())
    runs = {}
    for mode in ("full", "sequential"):
        path = work / f"sweep_{mode}.yml"
        path.write_text(json.dumps({**config, "evaluation": mode}, indent=1))  # JSON is YAML
        cost = timed_sweep(path, work / mode, work / f"cache_{mode}")
        runs[mode] = {"content": json.loads((work / mode / "sweep.json").read_text()), **cost}
        print(f"{mode}: {cost['cpu_seconds']} CPU s, peak RSS {cost['peak_rss_mib']} MiB, {cost['wall_seconds']} s wall",
              flush=True)
    full, sequential = runs["full"]["content"], runs["sequential"]["content"]
    chosen = {mode: runs[mode]["content"]["best_name"] for mode in runs}
    reported = {p["name"]: p["metrics"] for p in full["points"]}
    same = {p["name"]: p["metrics"] == reported.get(p["name"]) for p in sequential["points"]}
    print("\nprogress lines of the sequential run:", *runs["sequential"]["progress"], sep="\n  ")
    print(f"\nchosen setting: full {chosen['full']}, sequential {chosen['sequential']} "
          f"({'equal' if chosen['full'] == chosen['sequential'] else 'DIFFERENT'})")
    print(f"reported metrics: {'identical' if all(same.values()) else 'DIFFERENT'} on the {len(same)} points the "
          f"sequential report shows as numbers ({', '.join(f'{n}: {s}' for n, s in same.items())})")
    scored = {mode: documents_scored(runs[mode]["content"]) for mode in runs}
    print("\ndocuments scored per point:")
    for name in scored["full"]:
        print(f"  {name:<16} full: {scored['full'][name]:<10}  sequential: {scored['sequential'].get(name, 'not run')}")
    ratio = runs["full"]["cpu_seconds"] / max(runs["sequential"]["cpu_seconds"], 1e-9)
    print(f"\nevaluation CPU (whole `debias sweep` child, user + sys): full {runs['full']['cpu_seconds']} s, "
          f"sequential {runs['sequential']['cpu_seconds']} s, ratio full / sequential {ratio:.2f}x")
    print(f"peak RSS: full {runs['full']['peak_rss_mib']} MiB, sequential {runs['sequential']['peak_rss_mib']} MiB")
    inside = {mode: evaluation_cpu(runs[mode]["content"]) for mode in runs}
    print(f"CPU inside the evaluations alone (sweep.json's own per-evaluation and per-screen process times; no "
          f"imports, stage or report): full {inside['full']} s, sequential {inside['sequential']} s, ratio "
          f"{inside['full'] / max(inside['sequential'], 1e-9):.2f}x")
    screening = sequential["run"].get("screening")
    if screening:
        print(f"sequential report's own account: {screening}")
    if json_path is not None:
        json_path.write_text(json.dumps({
            "sweep": config, "chosen": chosen, "reported_metrics_identical": same, "documents_scored": scored,
            "child": {mode: {k: runs[mode][k] for k in ("cpu_seconds", "peak_rss_mib", "wall_seconds")} for mode in runs},
            "cpu_ratio_child": round(ratio, 3), "cpu_inside_evaluations": inside,
            "progress": runs["sequential"]["progress"], "screening": screening,
            "stopped": sequential.get("stopped"), "cpu": cpu_kind()}, indent=1) + "\n")
    return 0 if chosen["full"] == chosen["sequential"] and all(same.values()) else 1


def main() -> None:
    if "--sequential-vs-full" in sys.argv:
        compare = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        compare.add_argument("--sequential-vs-full", nargs="?", const="", metavar="SWEEP_FILE")
        compare.add_argument("--lambdas", default="0.5,0.75,4", help="The tiny sweep's grid (without a file).")
        compare.add_argument("--limit", type=int, default=8, help="The tiny sweep's lm-eval limit (without a file).")
        compare.add_argument("--work", help="Working folder (default: a temporary one, removed afterwards).")
        compare.add_argument("--json", help="Write the measurements here.")
        args = compare.parse_args()
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_sequential_"))
        work.mkdir(parents=True, exist_ok=True)
        status = sequential_vs_full(Path(args.sequential_vs_full) if args.sequential_vs_full else None, work,
                                    args.lambdas, args.limit or None, Path(args.json) if args.json else None)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        sys.exit(status)
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
