"""CrowS sentence scores of lm-eval's `hf` and our `hf-bias` against a float64 plain forward of the same model.

Both classes compute in float32, in different orders (hf-bias: shared prefixes, scored-row projection, packing),
so their scores differ by float32 rounding. This measures each one's error against the float64 value of
Σ log p(token | prefix) after the start token (the CrowS causal score), on every sentence of one CrowS task.

    python benchmarks/bench_float64_reference.py [--model DIR] [--task crows_bias_gender] [--json OUT]
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


def float64_score(model, tokenizer, start: int, sentence: str) -> float:
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
    scores = {side: lm_eval_scores(side, args.model, args.task) for side in ("hf", "hf-bias")}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float64).eval()
    start = causal_start_token(tokenizer)
    errors = {"hf": [], "hf-bias": []}
    for doc_id, (_, doc) in scores["hf"].items():
        for i, sentence in enumerate((doc["sent_more"], doc["sent_less"])):
            reference = float64_score(model, tokenizer, start, sentence)
            for side in errors:
                errors[side].append(abs(scores[side][doc_id][0][i] - reference))
    report = {side: {"sentences": len(e), "max_abs_error": max(e), "mean_abs_error": sum(e) / len(e),
                     "over_1e-4": sum(x > 1e-4 for x in e)} for side, e in errors.items()}
    between = [abs(a - b) for doc_id in scores["hf"] for a, b in zip(scores["hf"][doc_id][0],
                                                                     scores["hf-bias"][doc_id][0])]
    report["hf_vs_hf_bias"] = {"max_abs_difference": max(between), "over_1e-4": sum(x > 1e-4 for x in between)}
    for side, row in report.items():
        print(f"{side:14s} " + "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "task": args.task, **report}, indent=2))


if __name__ == "__main__":
    main()
