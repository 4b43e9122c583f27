"""crows_bias vs lm-eval's own crows_pairs_english logic: same CSV, same model object, one process.

lm-eval's task reads its data from the hub; here its YAML and utils (doc_to_choice, process_results) are used
unchanged over the local CSV read with the csv module. Prints both wall times, their ratio, both
pct_stereotype values, whether every pair has the same outcome, and our per-type table.

    python benchmarks/bench_crows_causal.py [--model DIR] [--limit N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# lm-eval's own crows_pairs_english.yaml (its utils.doc_to_choice / process_results), only the data made local
LM_EVAL_TASK_YAML = """\
include: {lm_eval_tasks}/crows_pairs/crows_pairs_english.yaml
task: lm_eval_crows_pairs_english_local
dataset_path: local
dataset_name: null
custom_dataset: !function local_utils.load
"""
LM_EVAL_UTILS = """\
import csv, os
import datasets

def load(limit=None, **_):
    path = os.path.join(os.environ["DEBIAS_DATA_DIR"], "crows_pairs", "crows_pairs_anonymized.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [{k: r[k] for k in ("sent_more", "sent_less", "stereo_antistereo", "bias_type")}
                for r in csv.DictReader(handle)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
"""


def run(lm, task_manager, tasks, limit):
    import lm_eval

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit,
                                  log_samples=True, bootstrap_iters=0)
    return time.perf_counter() - start, out


def outcomes(samples):
    """doc position -> stereotyped? from logged samples (the CSV holds one pair twice, so not keyed by text)."""
    return {s["doc_id"]: s["pct_stereotype"] > 0 for s in samples}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M)")
    parser.add_argument("--limit", type=int, default=None, help="pairs per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed runs per side; min is kept")
    parser.add_argument("--json", default=None, help="write the per-type results here")
    args = parser.parse_args()
    os.environ.setdefault("DEBIAS_DATA_DIR", str(REPO.parent / "shared" / "data"))

    import lm_eval.tasks
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from debias_plugin.default_model import materialize_default_model

    model_dir = args.model or str(materialize_default_model())
    lm = HFLM(pretrained=model_dir, device="cpu", batch_size=args.batch_size, dtype="float32")
    with tempfile.TemporaryDirectory() as reference_dir:
        Path(reference_dir, "lm_eval_crows_local.yaml").write_text(
            LM_EVAL_TASK_YAML.format(lm_eval_tasks=Path(lm_eval.tasks.__file__).parent))
        Path(reference_dir, "local_utils.py").write_text(LM_EVAL_UTILS)
        task_manager = TaskManager(include_path=[str(REPO / "tasks"), reference_dir], include_defaults=False,
                                   metadata={"pretrained": model_dir})
        # crows_bias_overall: our task over all pairs, one task like lm-eval's; then the group (per type).
        # A warm-up on a few pairs first, so neither side pays for first-call overheads.
        run(lm, task_manager, ["crows_bias_overall", "lm_eval_crows_pairs_english_local"], 8)
        # Alternate the two sides and keep each side's fastest run: load from other processes hits both alike.
        ours_times, theirs_times = [], []
        for _ in range(args.repeats):
            seconds, ours = run(lm, task_manager, ["crows_bias_overall"], args.limit)
            ours_times.append(seconds)
            seconds, theirs = run(lm, task_manager, ["lm_eval_crows_pairs_english_local"], args.limit)
            theirs_times.append(seconds)
        ours_time, theirs_time = min(ours_times), min(theirs_times)
        per_type = run(lm, task_manager, ["crows_bias"], args.limit)[1]

    ours_pct = ours["results"]["crows_bias_overall"]["pct_stereotype,none"]
    theirs_pct = 100 * theirs["results"]["lm_eval_crows_pairs_english_local"]["pct_stereotype,none"]
    ours_out = outcomes(ours["samples"]["crows_bias_overall"])
    theirs_out = outcomes(theirs["samples"]["lm_eval_crows_pairs_english_local"])
    same = ours_out == theirs_out
    print(textwrap.dedent(f"""
        model: {model_dir}   pairs: {len(ours_out)}
        crows_bias_overall (ours)          {ours_time:8.1f} s   pct_stereotype {ours_pct:.2f}
        crows_pairs_english logic (lm-eval){theirs_time:8.1f} s   pct_stereotype {theirs_pct:.2f}
        time ratio ours / lm-eval          {ours_time / theirs_time:8.3f}   (target <= 1.1; min of {args.repeats} alternating runs)
        all runs, ours:    {' '.join(f"{t:.1f}" for t in ours_times)} s
        all runs, lm-eval: {' '.join(f"{t:.1f}" for t in theirs_times)} s
        every pair has the same outcome:   {same}
    """))
    table = {name: {"pct_stereotype": r.get("pct_stereotype,none"), "pairs": len(per_type["samples"].get(name, []))}
             for name, r in per_type["results"].items()}
    table["crows_bias_overall"] = {k.split(",")[0]: v for k, v in ours["results"]["crows_bias_overall"].items()
                                   if isinstance(v, float)}
    for name, row in sorted(table.items()):
        print(f"  {name:34s} {row.get('pct_stereotype', float('nan')):6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_dir, "ours_seconds": ours_times,
                                               "lm_eval_seconds": theirs_times, "same_outcomes": same,
                                               "results": table}, indent=2))


if __name__ == "__main__":
    main()
