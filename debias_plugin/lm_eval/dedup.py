"""`hf-dedup`: lm-eval's causal `hf` model that scores each distinct request once per evaluation.

lm-eval hands a model all requests of one kind from every task at once, but scores identical requests again
(crows_bias and crows_bias_overall hold the same 3016 sentences; wikitext2_ppl_quick is the start of wikitext2_ppl).
This class sends only the first of each identical request to HFLM and copies its answer to the rest, and counts
both, so a sweep can report how many requests it actually scored. Answers are HFLM's own.
"""

from __future__ import annotations

from collections import Counter

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

MODEL_NAME = "hf-dedup"
# requests received and scored, per request kind, since the process started (read by the sweep's cost report)
REQUEST_COUNTS: Counter = Counter()


@register_model(MODEL_NAME)
class DedupHFLM(HFLM):
    """HFLM with identical loglikelihood / loglikelihood_rolling requests scored once."""

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._once(super().loglikelihood, "loglikelihood", requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._once(super().loglikelihood_rolling, "loglikelihood_rolling", requests, disable_tqdm)

    @staticmethod
    def _once(score, kind: str, requests, disable_tqdm: bool):
        first = {}
        for request in requests:
            first.setdefault(request.args, request)
        unique = list(first.values())
        answers = score(unique, disable_tqdm=disable_tqdm) if unique else []
        by_args = {request.args: answer for request, answer in zip(unique, answers)}
        REQUEST_COUNTS[f"{kind}_received"] += len(requests)
        REQUEST_COUNTS[f"{kind}_scored"] += len(unique)
        return [by_args[request.args] for request in requests]
