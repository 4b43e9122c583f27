"""`hf-bias`: lm-eval's causal `hf` model giving the same scores for less work (debias_plugin.scoring.causal).

Identical requests are scored once, also across tasks (crows_bias and crows_bias_overall hold the same sentences);
inputs sharing a prefix (a CrowS pair, StereoSet's three candidates) forward it once, as a token tree; the vocabulary
log-softmax is taken only at scored positions, a chunk of rows at a time, so the [16, 1024, 49152] float32 tensor
of a WikiText batch (3.2 GB) is never built. Tokenisation, truncation, rolling windows, the request cache and every
model argument are HFLM's own. A shortcut the model fails at load (check_model) is turned off with a warning;
seq2seq models use HFLM's scoring unchanged.
"""

from __future__ import annotations

import logging
from collections import Counter

from lm_eval import utils
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from pydantic import PositiveInt
from tqdm import tqdm

from debias_plugin.options import Options, validated

log = logging.getLogger(__name__)

MODEL_NAME = "hf-bias"
_PROBE_TEXT = "The old lighthouse keeper walked slowly along the harbour wall at dawn"
# a shortcut stays on while its largest log-prob error on the probes is below this share of how much their
# log-probs move with the context: float32 rounding is ~4e-6 of it (SmolLM2-135M), bfloat16's ~1e-2, while a
# wrong mask, position or output layer is ~1e-1 in real models and still ~4e-3 in tiny random ones
_CONTEXT_SHARE = {"float32": 1e-4, "float64": 1e-4}
_HALF_CONTEXT_SHARE = 1e-1


class BiasLMOptions(Options):
    """hf-bias's own model arguments (everything else goes to HFLM unchanged)."""

    share_prefix: bool = True  # token trees for shared prefixes
    batch_tokens: PositiveInt | None = None  # padded tokens per forward; default batch_size x 256, >= max_length


@register_model(MODEL_NAME)
class BiasLM(HFLM):
    """HFLM whose loglikelihood and loglikelihood_rolling run on debias_plugin.scoring.causal.CausalScorer."""

    def __init__(self, pretrained, share_prefix: bool = True, batch_tokens: int | None = None, **kwargs):
        options = validated(BiasLMOptions, {"share_prefix": share_prefix, "batch_tokens": batch_tokens},
                            what="hf-bias model arguments")
        self.request_counts = Counter()  # requests received and scored per kind: what this model's runs cost
        super().__init__(pretrained, **kwargs)
        self.scorer = self._make_scorer(options) if self.backend == "causal" else None

    def _make_scorer(self, options: BiasLMOptions):
        from debias_plugin.scoring.causal import CausalScorer, check_model

        shortcuts = {"split_head": True, "share_prefix": options.share_prefix}
        scorer_options = {"softmax_dtype": self.softmax_dtype, "autocast_dtype": self.mixed_precision_dtype}
        probe = [self.prefix_token_id] + self.tok_encode(_PROBE_TEXT, add_special_tokens=False) * 2  # >= 9 tokens
        differences, context_effect = check_model(self.model, probe, **scorer_options)
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        tolerance = _CONTEXT_SHARE.get(dtype, _HALF_CONTEXT_SHARE) * context_effect
        for shortcut, difference in differences.items():
            if shortcuts[shortcut] and difference > tolerance:
                log.warning("hf-bias: %s turned off for this model: its log-probs differ from the plain forward by "
                            "%.3g (tolerance %.3g).", shortcut, difference, tolerance)
                shortcuts[shortcut] = False
        batch_size = self.batch_size if isinstance(self.batch_size, int) else 64
        return CausalScorer(self.model, batch_tokens=options.batch_tokens or max(self.max_length, 256 * batch_size),
                            max_row_tokens=self.max_length, **shortcuts, **scorer_options)

    # ---- lm-eval request types ----------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return _once(super().loglikelihood, "loglikelihood", requests, disable_tqdm, self.request_counts)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        score = super().loglikelihood_rolling if self.scorer is None else self._rolling
        return _once(score, "loglikelihood_rolling", requests, disable_tqdm, self.request_counts)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's (context, continuation) token requests, truncated as HFLM does, scored by the CausalScorer."""
        if self.scorer is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        scored, truncated = [], 0
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"hf-bias: a request needs 1..{self.max_length} continuation tokens after a "
                                 f"non-empty context; got {len(context)} context and {len(continuation)} "
                                 "continuation tokens.")
            whole = context + continuation
            truncated += len(whole) > self.max_length + 1
            scored.append((whole[-(self.max_length + 1):][:-1], continuation))
        if truncated:
            log.warning("hf-bias: %d requests exceed max_length %d; their contexts are truncated from the left.",
                        truncated, self.max_length)
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests") as bar:
            self.scorer.progress = bar.update
            answers = self.scorer.score(scored)
        for (request_strings, _, _), answer in zip(requests, answers):
            if request_strings is not None:  # rolling windows are cached per document, in _rolling
                self.cache_hook.add_partial("loglikelihood", request_strings, answer)
        return answers

    def rolling_windows(self, text: str) -> list[tuple[None, list[int], list[int]]]:
        """HFLM's disjoint rolling windows of one document as (None, context, continuation) token requests: the
        units a sequential screen scores one by one (score_windows), summing to loglikelihood_rolling's total."""
        return [(None, context, continuation) for context, continuation in map(
            utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))]

    def score_windows(self, windows: list, disable_tqdm: bool = True) -> list[float]:
        """Log-likelihoods of rolling_windows' requests, scored as loglikelihood_rolling scores them (counted)."""
        self.request_counts["window_scored"] += len(windows)
        return [log_likelihood for log_likelihood, _ in self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)]

    def _rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's disjoint rolling windows of every document, all scored in one pass, summed per document."""
        import torch

        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in self.rolling_windows(text):
                windows.append(window)
                owners.append(index)
        if self.world_size > 1 and windows:  # as HFLM: every rank scores as many windows
            counts = self.all_gather(torch.tensor(len(windows), device=self.device)).cpu().tolist()
            windows += (max(counts) - counts[self.rank]) * [windows[0]]
        answers = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for owner, (log_likelihood, _) in zip(owners, answers):
            totals[owner] += log_likelihood
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals


def _once(score, kind: str, requests, disable_tqdm: bool, counts: Counter):
    """Score only the first of each set of identical requests and copy its answer to the others (counted)."""
    first = {}
    for request in requests:
        first.setdefault(request.args, request)
    unique = list(first.values())
    answers = score(unique, disable_tqdm=disable_tqdm) if unique else []
    by_args = {request.args: answer for request, answer in zip(unique, answers)}
    counts[f"{kind}_received"] += len(requests)
    counts[f"{kind}_scored"] += len(unique)
    return [by_args[request.args] for request in requests]
