"""The main job's tasks through our `hf-bias` vs lm-eval's `hf`: wall, CPU time, peak RSS, and equal scores.

Each run is a child process, so its peak RSS is its own (the child reports getrusage(RUSAGE_SELF); its CPU time is
the parent's RUSAGE_CHILDREN difference). Runs alternate (hf-bias, hf, hf-bias, hf, ...) so load from other
processes hits both sides alike; the load average is printed for every run. Every per-sample score of the first
hf-bias run is then compared with the first hf run's: CrowS and StereoSet log-likelihoods by absolute difference,
WikiText document log-likelihoods (sums over thousands of tokens) by relative difference, CrowS pair outcomes and
StereoSet comparisons exactly; metrics that count outcomes exactly, likelihood_diff within 2 x 1e-4, perplexities
relatively within 1e-6. --profile adds one run per side and task with CPU time per phase (tokenisation, model
body, output layer, log-softmax / gather / packing, the rest of lm-eval), from subclass timers and module hooks.

    python benchmarks/bench_eval_cost.py [--model DIR] [--tasks ...] [--limit N] [--repeats 2] [--profile]
                                         [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB = "crows_bias,stereoset_bias,wikitext2_ppl_quick"
SIDES = ("hf-bias", "hf")
LL_TOLERANCE = 1e-4  # |difference| of a sentence log-likelihood (CrowS, StereoSet)
ROLLING_RELATIVE_TOLERANCE = 1e-6  # |difference| / |log-likelihood| of a whole document (WikiText)
ROLLING_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")  # compared like the rolling scores


# ---- child: one evaluation -------------------------------------------------------------------------------

def _phase_timers(cls):
    """`cls` with CPU-time counters around tokenisation and scoring (process_time: all threads)."""
    totals = {"tokenise": 0.0, "score": 0.0, "body": 0.0, "output_layer": 0.0}

    def timed(name, method):
        def wrapper(self, *args, **kwargs):
            start = time.process_time()
            try:
                return method(self, *args, **kwargs)
            finally:
                totals[name] += time.process_time() - start
        return wrapper

    class Profiled(cls):
        tok_encode = timed("tokenise", cls.tok_encode)
        _loglikelihood_tokens = timed("score", cls._loglikelihood_tokens)

    return Profiled, totals


def _hook_timer(module, totals, name):
    state = {}
    module.register_forward_pre_hook(lambda *_: state.__setitem__("start", time.process_time()))

    def done(*_):
        totals[name] += time.process_time() - state.pop("start")

    module.register_forward_hook(done)


def child(args) -> None:
    import resource

    import torch

    start_wall = time.perf_counter()
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from debias_plugin.lm_eval import register_models
    from debias_plugin.paths import tasks_dir

    register_models()
    cls, totals = get_model(args.child), None
    if args.profile:
        cls, totals = _phase_timers(cls)
    model_args = {"pretrained": args.model, "max_length": args.max_length}
    loaded_cpu, loaded_wall = time.process_time(), time.perf_counter()
    lm = cls.create_from_arg_obj(model_args, {"batch_size": args.batch_size, "device": "cpu"})
    if args.profile:
        _hook_timer(lm.model.get_decoder(), totals, "body")
        _hook_timer(lm.model.get_output_embeddings(), totals, "output_layer")
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=model_args)
    eval_cpu, eval_wall = time.process_time(), time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=args.tasks.split(","), task_manager=manager, limit=args.limit,
                                  log_samples=True, bootstrap_iters=0)
    end_cpu, end_wall = time.process_time(), time.perf_counter()
    samples = {task: [{"doc_id": s["doc_id"], "resps": [r[0] for r in s["resps"]],
                       "pct_stereotype": s.get("pct_stereotype"),
                       "token_counts": (s["doc"] or {}).get("token_counts") if isinstance(s["doc"], dict) else None}
                      for s in rows] for task, rows in out["samples"].items()}
    results = {task: {k: v for k, v in r.items() if isinstance(v, (int, float)) and "," in k}
               for task, r in out["results"].items()}
    scorer = getattr(lm, "scorer", None)
    report = {"side": args.child, "threads": torch.get_num_threads(),
              "import_seconds": loaded_wall - start_wall, "load_seconds": eval_wall - loaded_wall,
              "eval_wall": end_wall - eval_wall, "eval_cpu": end_cpu - eval_cpu, "load_cpu": eval_cpu - loaded_cpu,
              "self_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              "tokens_forwarded": getattr(scorer, "tokens_forwarded", None),
              "shortcuts": {"share_prefix": scorer.share_prefix, "split_head": scorer.split_head} if scorer else None,
              "phases": totals, "results": results, "samples": samples}
    Path(args.out).write_text(json.dumps(report))


# ---- parent: alternate, compare, print ---------------------------------------------------------------------

def run_child(side: str, args, tasks: str, profile: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [sys.executable, __file__, "--child", side, "--out", out, "--model", args.model, "--tasks", tasks,
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    command += ["--limit", str(args.limit)] if args.limit else []
    command += ["--profile"] if profile else []
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate()  # the child's stderr is lm-eval's progress; kept only for a failure
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{stderr[-4000:]}")
    report = json.loads(Path(out).read_text())
    os.unlink(out)
    report.update(process_wall=wall, load_average=(load_before, os.getloadavg()[0]))
    return report


def run_child_with_rusage(side, args, tasks, profile=False):
    """run_child, with the child's own CPU time and peak RSS from the kernel (wait4 on that one process)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = run_child(side, args, tasks, profile)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report["process_cpu"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return report


def _comparisons(resps, token_counts):
    """StereoSet's three comparisons of per-token means: s > a, s > u, a > u."""
    s, a, u = (answer[0] / count for answer, count in zip(resps, token_counts))
    return s > a, s > u, a > u


def compare(ours: dict, theirs: dict) -> dict:
    """Per-sample and metric agreement of two reports."""
    worst_ll, worst_rolling, over, outcome_mismatches, greedy_mismatches, count = 0.0, 0.0, 0, 0, 0, 0
    worst = None
    for task, rows in theirs["samples"].items():
        by_doc = {row["doc_id"]: row for row in ours["samples"][task]}
        for row in rows:
            mine = by_doc[row["doc_id"]]
            for a, b in zip(mine["resps"], row["resps"]):
                count += 1
                if isinstance(b, list):  # loglikelihood: (log-likelihood, is_greedy)
                    difference = abs(a[0] - b[0])
                    if difference > worst_ll:
                        worst = {"task": task, "doc_id": row["doc_id"], "ours": a[0], "theirs": b[0]}
                    worst_ll = max(worst_ll, difference)
                    over += difference > LL_TOLERANCE
                    greedy_mismatches += a[1] != b[1]
                else:  # loglikelihood_rolling: one float per document
                    relative = abs(a - b) / max(1.0, abs(b))
                    worst_rolling = max(worst_rolling, relative)
                    over += relative > ROLLING_RELATIVE_TOLERANCE
            if row["pct_stereotype"] is not None:
                outcome_mismatches += mine["pct_stereotype"] != row["pct_stereotype"]
            elif row["token_counts"]:
                counts = row["token_counts"]
                outcome_mismatches += _comparisons(mine["resps"], counts) != _comparisons(row["resps"], counts)
    metric_misses = {}
    for task, metrics in theirs["results"].items():
        for name, value in metrics.items():
            mine = ours["results"][task].get(name)
            if isinstance(value, float) and math.isnan(value):  # a domain with no documents: NaN on both sides
                same = isinstance(mine, float) and math.isnan(mine)
            elif name.startswith("likelihood_diff"):  # a mean of |score differences|
                same = abs(mine - value) <= 2 * LL_TOLERANCE
            elif name.split(",")[0] in ROLLING_METRICS:
                same = abs(mine - value) <= ROLLING_RELATIVE_TOLERANCE * abs(value)
            else:  # counts of outcomes: pct_stereotype, ss, lms, icat
                same = mine == value
            if not same:
                metric_misses[f"{task}/{name}"] = (mine, value)
    return {"scores_compared": count, "max_abs_ll_diff": worst_ll, "worst_ll": worst,
            "max_rel_rolling_diff": worst_rolling,
            "scores_over_tolerance": over, "outcome_mismatches": outcome_mismatches,
            "greedy_mismatches": greedy_mismatches, "metric_mismatches": metric_misses,
            "equal": over == 0 and outcome_mismatches == 0 and not metric_misses}


def _strip(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "samples"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M)")
    parser.add_argument("--tasks", default=MAIN_JOB)
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side")
    parser.add_argument("--profile", action="store_true", help="also profile each side on each task alone")
    parser.add_argument("--json", default=None, help="write every run's numbers (without samples) here")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("DEBIAS_DATA_DIR", str(REPO.parent / "shared" / "data"))
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(flag, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.model is None:
        from debias_plugin.default_model import materialize_default_model

        args.model = str(materialize_default_model())
    if args.child:
        child(args)
        return

    runs = []
    for repeat in range(args.repeats):
        for side in SIDES:
            report = run_child_with_rusage(side, args, args.tasks)
            runs.append(report)
            print(f"run {repeat + 1} {side:8s} eval wall {report['eval_wall']:7.1f} s  eval CPU "
                  f"{report['eval_cpu']:7.1f} s  process wall {report['process_wall']:7.1f} s  CPU "
                  f"{report['process_cpu']:7.1f} s  peak RSS {report['self_maxrss_kib'] / 2**20:5.2f} GiB  "
                  f"load avg {report['load_average'][0]:.2f} -> {report['load_average'][1]:.2f}", flush=True)
    first = {side: next(r for r in runs if r["side"] == side) for side in SIDES}
    agreement = compare(first["hf-bias"], first["hf"])
    repeatable = (compare(runs[0], runs[2]) if args.repeats > 1 else None)

    def best(side, key):
        return min(r[key] for r in runs if r["side"] == side)

    summary = {side: {key: best(side, key) for key in ("eval_wall", "eval_cpu", "process_wall", "process_cpu")}
               | {"peak_rss_gib": max(r["self_maxrss_kib"] for r in runs if r["side"] == side) / 2**20}
               for side in SIDES}
    ratios = {key: summary["hf"][key] / summary["hf-bias"][key]
              for key in ("eval_wall", "eval_cpu", "process_wall", "process_cpu")}
    print(f"\nmodel {args.model}  tasks {args.tasks}  limit {args.limit}  batch {args.batch_size}  "
          f"max_length {args.max_length}  torch threads {runs[0]['threads']}")
    print(f"hf-bias shortcuts {first['hf-bias']['shortcuts']}  tokens through the model body "
          f"{first['hf-bias']['tokens_forwarded']}")
    for side in SIDES:
        s = summary[side]
        print(f"{side:8s} best eval wall {s['eval_wall']:7.1f} s  eval CPU {s['eval_cpu']:7.1f} s  process wall "
              f"{s['process_wall']:7.1f} s  CPU {s['process_cpu']:7.1f} s  peak RSS {s['peak_rss_gib']:.2f} GiB")
    print("hf / hf-bias: " + "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"agreement hf-bias vs hf: {json.dumps(agreement)}")
    if repeatable:
        print(f"hf-bias run 1 vs run 2: max |ll diff| {repeatable['max_abs_ll_diff']:.3g}, "
              f"outcome mismatches {repeatable['outcome_mismatches']}")

    profile, self_noise = {}, {side: [] for side in SIDES}
    if args.profile:
        for task in args.tasks.split(","):
            for side in SIDES:
                report = run_child_with_rusage(side, args, task, profile=True)
                # the same class on this task alone batches its requests otherwise: float32 noise of the class itself
                self_noise[side].append(compare(first[side], report))
                phases = report["phases"]
                rest = report["eval_cpu"] - phases["tokenise"] - phases["score"]
                row = {"tokenise": phases["tokenise"], "model body": phases["body"],
                       "output layer": phases["output_layer"],
                       "log-softmax, gather, packing": phases["score"] - phases["body"] - phases["output_layer"],
                       "rest of lm-eval": rest, "eval CPU": report["eval_cpu"], "eval wall": report["eval_wall"],
                       "peak RSS GiB": report["self_maxrss_kib"] / 2**20, "load avg": report["load_average"][0]}
                profile[f"{task}/{side}"] = row
                print(f"profile {task:22s} {side:8s} " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()),
                      flush=True)
    for side, comparisons in self_noise.items():
        if comparisons:
            print(f"{side} on each task alone vs {side} in the joint run (batching only differs): max |ll diff| "
                  f"{max(c['max_abs_ll_diff'] for c in comparisons):.3g}, scores over {LL_TOLERANCE:g}: "
                  f"{sum(c['scores_over_tolerance'] for c in comparisons)} of "
                  f"{sum(c['scores_compared'] for c in comparisons)}, outcome mismatches "
                  f"{sum(c['outcome_mismatches'] for c in comparisons)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": [_strip(r) for r in runs], "summary": summary,
                                               "ratios": ratios, "agreement": agreement, "profile": profile,
                                               "self_noise": self_noise,
                                               "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
