"""What Self-Debias costs per request: `hf-bias` vs `hf-selfdebias` on the same lm-eval requests, CPU and wall time.

Both models are loaded once (load time not counted); then lm_eval.evaluate runs the same task objects on each side,
alternating (hf-bias, hf-selfdebias, hf-bias, ...) so load from other processes hits both alike. CPU time is the
process's (all threads); the ratio is of the medians over repeats. Also printed: requests scored, padded tokens
forwarded, each task's headline metric (pct_stereotype moves with debiasing), the CPU model and the load average.
The default model is a tiny seeded GPT-2 built in a temporary folder (tests/tiny_models.py).

    python benchmarks/bench_selfdebias_cost.py [--model DIR] [--tasks crows_bias_gender] [--limit N]
        [--repeats 2] [--batch-size 16] [--threads N] [--selfdebias-args bias_types=doc,decay_constant=50] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_kind

REPO = Path(__file__).resolve().parents[1]
SIDES = ("hf-bias", "hf-selfdebias")
HEADLINE = ("pct_stereotype,none", "ss,none", "word_perplexity,none")


def tiny_model(folder: Path) -> str:
    """A seeded 2-layer GPT-2 whose BPE tokenizer is trained on the CrowS sentences and a WikiText slice."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_tiny_model

    from debias_plugin.data import load_crows_pairs, load_wikitext_documents

    pairs = load_crows_pairs()
    texts = [p.sent_more for p in pairs] + [p.sent_less for p in pairs]
    texts += load_wikitext_documents()[0].split("\n")[:400]
    return str(build_tiny_model("gpt2", folder / "gpt2", texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: a tiny GPT-2)")
    parser.add_argument("--tasks", default="crows_bias_gender")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--selfdebias-args", default="", help="hf-selfdebias model arguments, key=value,...")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    import torch
    from lm_eval.api.registry import get_model
    from lm_eval.utils import simple_parse_args_string

    from debias_plugin.lm_eval import register_models, run

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or tiny_model(Path(scratch))
        register_models()
        tasks = args.tasks.split(",")
        extra = {"hf-bias": {}, "hf-selfdebias": simple_parse_args_string(args.selfdebias_args)}
        lms = {side: get_model(side).create_from_arg_obj({"pretrained": model, **extra[side]},
                                                         {"batch_size": args.batch_size, "device": "cpu"})
               for side in SIDES}
        task_dict = run.task_manager(tasks, metadata={"pretrained": model}).load(tasks)
        runs = {side: [] for side in SIDES}
        for _ in range(args.repeats):
            for side, lm in lms.items():
                counts_before, tokens_before = dict(lm.request_counts), lm.scorer.tokens_forwarded
                load = os.getloadavg()[0]
                cpu, wall = time.process_time(), time.perf_counter()
                out = lm_eval.evaluate(lm=lm, task_dict=task_dict, limit=args.limit, bootstrap_iters=0,
                                       log_samples=False, verbosity="WARNING")
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                scored = sum(v - counts_before.get(k, 0) for k, v in lm.request_counts.items() if k.endswith("_scored"))
                metrics = {f"{task}/{name.split(',')[0]}": value for task, result in out["results"].items()
                           for name, value in result.items() if name in HEADLINE}
                runs[side].append({"cpu_s": cpu, "wall_s": wall, "requests_scored": scored, "metrics": metrics,
                                   "tokens_forwarded": lm.scorer.tokens_forwarded - tokens_before,
                                   "load_average": (load, os.getloadavg()[0])})

    summary = {side: {"cpu_s": statistics.median(r["cpu_s"] for r in rows),
                      "wall_s": statistics.median(r["wall_s"] for r in rows),
                      "requests_scored": rows[0]["requests_scored"], "tokens_forwarded": rows[0]["tokens_forwarded"],
                      "metrics": rows[0]["metrics"]} for side, rows in runs.items()}
    ratio = summary["hf-selfdebias"]["cpu_s"] / summary["hf-bias"]["cpu_s"]
    print(f"model {model if args.model else 'tiny gpt2'}; tasks {args.tasks}; limit {args.limit}; "
          f"hf-selfdebias {args.selfdebias_args or 'defaults'}")
    print(f"CPU: {cpu_kind()}; torch threads {torch.get_num_threads()}")
    print(f"{'side':<15}{'CPU s':>9}{'wall s':>9}{'requests':>10}{'CPU ms/req':>12}{'tokens fwd':>12}  metrics")
    for side, row in summary.items():
        per_request = 1000 * row["cpu_s"] / max(1, row["requests_scored"])
        metrics = ", ".join(f"{name} {value:.4g}" for name, value in row["metrics"].items())
        print(f"{side:<15}{row['cpu_s']:>9.2f}{row['wall_s']:>9.2f}{row['requests_scored']:>10}{per_request:>12.2f}"
              f"{row['tokens_forwarded']:>12}  {metrics}")
    print(f"hf-selfdebias / hf-bias CPU time: {ratio:.2f}x (median of {args.repeats}); load average "
          + ", ".join(f"{a:.1f}->{b:.1f}" for side in SIDES for a, b in (r["load_average"] for r in runs[side])))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_kind(), "runs": runs, "summary": summary,
                                               "cpu_ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
