"""CrowS sentence scores of lm-eval's `hf` and our `hf-bias` against a float64 plain forward of the same model.

Both classes compute in float32, in different orders (hf-bias: shared prefixes, scored-row projection, packing),
so their scores differ by float32 rounding. This measures each one's error against the float64 value of
Σ log p(token | prefix) after the start token (the CrowS causal score), on every sentence of one CrowS task.

    python benchmarks/bench_float64_reference.py [--model DIR] [--task crows_bias_gender] [--json OUT]
        [--sides hf,hf-bias] [--dtype float64|float32]

Besides the score errors it counts, per class, the pairs whose outcome (which sentence is more likely, i.e. the
pair's contribution to pct_stereotype) differs from the plain forward's, and both pct_stereotype values: the
full-set check that a model's crows_bias equals an independent plain-forward computation on every pair.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def lm_eval_scores(side: str, model: str, task: str) -> dict[int, list[float]]:
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from debias_plugin.paths import tasks_dir

    lm = get_model(side).create_from_arg_obj({"pretrained": model, "max_length": 1024},
                                             {"batch_size": 16, "device": "cpu"})
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata={"pretrained": model})
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True, bootstrap_iters=0)
    return {row["doc_id"]: ([r[0][0] for r in row["resps"]], row["doc"]) for row in out["samples"][task]}


def plain_score(model, tokenizer, start: int, sentence: str) -> float:
    """Σ log p(token | prefix) after the start token, one sentence per forward, in the model's own dtype."""
    import torch

    ids = torch.tensor([[start, *tokenizer.encode(sentence, add_special_tokens=False)]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    return float(logprobs.gather(-1, ids[0, 1:, None]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M)")
    parser.add_argument("--task", default="crows_bias_gender")
    parser.add_argument("--json", default=None)
    parser.add_argument("--sides", default="hf,hf-bias", help="lm-eval model classes to compare")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                        help="dtype of the plain forward (float32: the same arithmetic width as lm-eval's)")
    args = parser.parse_args()
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(flag, "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from debias_plugin.lm_eval import register_models
    from debias_plugin.models import causal_start_token

    if args.model is None:
        from debias_plugin.default_model import materialize_default_model

        args.model = str(materialize_default_model())
    register_models()
    sides = args.sides.split(",")
    scores = {side: lm_eval_scores(side, args.model, args.task) for side in sides}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    start = causal_start_token(tokenizer)
    errors = {side: [] for side in sides}
    outcomes = {side: [] for side in ["reference", *sides]}
    first = scores[sides[0]]
    for doc_id, (_, doc) in first.items():
        reference = [plain_score(model, tokenizer, start, s) for s in (doc["sent_more"], doc["sent_less"])]
        for side in sides:
            errors[side] += [abs(got - want) for got, want in zip(scores[side][doc_id][0], reference)]
        for side, pair in [("reference", reference)] + [(s, scores[s][doc_id][0]) for s in sides]:
            outcomes[side].append(pair[0] > pair[1])  # sent_more strictly more likely (DESIGN.md's rule)
    pct = {side: 100 * sum(o) / len(o) for side, o in outcomes.items()}
    report = {side: {"sentences": len(e), "max_abs_error": max(e), "mean_abs_error": sum(e) / len(e),
                     "over_1e-4": sum(x > 1e-4 for x in e), "pct_stereotype": pct[side],
                     "outcome_mismatches": sum(a != b for a, b in zip(outcomes[side], outcomes["reference"]))}
              for side, e in errors.items()}
    report["reference"] = {"dtype": args.dtype, "pairs": len(outcomes["reference"]),
                           "pct_stereotype": pct["reference"]}
    if len(sides) == 2:
        between = [abs(a - b) for doc_id in first for a, b in zip(scores[sides[0]][doc_id][0],
                                                                   scores[sides[1]][doc_id][0])]
        report["between_sides"] = {"max_abs_difference": max(between), "over_1e-4": sum(x > 1e-4 for x in between)}
    for side, row in report.items():
        print(f"{side:14s} " + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "task": args.task, **report}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
