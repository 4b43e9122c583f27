"""`hf-mlm`: masked LMs (BERT, RoBERTa, ALBERT, DistilBERT, ...) in lm-eval, each task scored by its paper's metric.

A masked LM has no left-to-right likelihood: SCORERS maps the doc's "scoring" field (set by our task loaders) to
the benchmark's masked-LM score in debias_plugin.scoring; loglikelihood_rolling is pseudo-log-likelihood (Salazar
et al. 2020). Under `accelerate launch` each process scores the documents lm-eval assigns to it.
"""

from __future__ import annotations

import logging
from typing import Literal

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from pydantic import PositiveInt

from debias_plugin.errors import DebiasError
from debias_plugin.options import Options, validated
from debias_plugin.scoring import crows, stereoset
from debias_plugin.scoring.masked import MaskedScorer

log = logging.getLogger(__name__)


class MaskedLMOptions(Options):
    """hf-mlm's model arguments; batch_tokens is the padded-token budget of one forward pass (the memory cap)."""

    pretrained: str
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    batch_tokens: PositiveInt | None = None
    max_batch_size: PositiveInt | None = None
    max_length: PositiveInt | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    batch_size: int | str | None = None  # lm-eval always passes one; hf-mlm packs by batch_tokens instead


def masked_lm_options(model_args: dict) -> MaskedLMOptions:
    return validated(MaskedLMOptions, model_args, what="hf-mlm model arguments")


def check_masked_lm_folder(pretrained: str, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    """Refuse, before any weights load, a folder that is not a masked LM with a real tokenizer holding a mask token."""
    from debias_plugin.models import check_weights, load_config, load_tokenizer, model_kind

    check_weights(pretrained, allow_pickle)
    config = load_config(pretrained, trust_remote_code=trust_remote_code)
    if model_kind(config) != "masked":
        raise DebiasError(f"{pretrained}: a causal LM ({config.model_type}); hf-mlm scores masked LMs only "
                          "(lm-eval's `hf` model class scores causal ones).")
    if load_tokenizer(pretrained, trust_remote_code=trust_remote_code).mask_token_id is None:
        raise DebiasError(f"{pretrained}: the tokenizer has no mask token; hf-mlm needs one to mask tokens.")


def load_masked_lm(pretrained: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                   allow_pickle: bool = False):
    """(model, tokenizer) of a folder that really holds a masked-LM head; anything else is a DebiasError."""
    import torch

    from debias_plugin.models import load_model

    check_masked_lm_folder(pretrained, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    model, tokenizer, _ = load_model(pretrained, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                     dtype=getattr(torch, dtype))
    return model.eval(), tokenizer


def _continuation(request) -> str:
    context, continuation = request.args[:2]
    if context:
        raise DebiasError(f"Task {request.task_name!r}: hf-mlm expects the whole sentence as the continuation with an "
                          f"empty context, got context {context[:60]!r}.")
    return continuation


# doc["scoring"] -> (engine, requests) -> one score per request
SCORERS = {
    "crows_pair": lambda engine, requests: crows.masked_choice_scores(
        engine, [(r.doc["sent_more"], r.doc["sent_less"], _continuation(r)) for r in requests]),
    "crows_pair_aul": lambda engine, requests: crows.aul_scores(engine, [_continuation(r) for r in requests]),
    "stereoset_intrasentence": lambda engine, requests: stereoset.masked_scores(
        engine, [(r.doc["context"], _continuation(r)) for r in requests]),
}
UNSCORED = {"stereoset_intersentence": "StereoSet intersentence (task stereoset_bias_inter) has no masked-LM score in "
            "Nadeem et al. or bias-bench; hf-mlm supports stereoset_bias (intrasentence) only."}


@register_model("hf-mlm")
class MaskedLM(LM):
    """lm-eval model for masked LMs; the model arguments are MaskedLMOptions' fields."""

    def __init__(self, **model_args):
        super().__init__()
        import torch
        from accelerate import Accelerator

        options = masked_lm_options(model_args)
        if options.batch_size not in (None, 1, "1", "auto"):
            log.info("hf-mlm packs batches by batch_tokens=%s; batch_size %s is not used.", options.batch_tokens,
                     options.batch_size)
        # cpu=True lets torchrun / `accelerate launch --multi_gpu` start data-parallel CPU processes (gloo)
        self.accelerator = Accelerator(cpu=str(options.device or "").startswith("cpu") or not torch.cuda.is_available())
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._device = self.accelerator.device if self._world_size > 1 else torch.device(
            options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, self.tokenizer = load_masked_lm(options.pretrained, dtype=options.dtype,
                                               allow_pickle=options.allow_pickle,
                                               trust_remote_code=options.trust_remote_code)
        self.model = model.to(self._device)
        batch_tokens = options.batch_tokens or (2048 if self._device.type == "cpu" else 32768)  # GPUs want large
        self.scorer = MaskedScorer(self.model, self.tokenizer, token_budget=batch_tokens, progress=self._rank == 0,
                                   max_batch_size=options.max_batch_size, max_length=options.max_length)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Each request answered with its task's masked-LM score (see SCORERS); is_greedy is False."""
        self.scorer.progress = self._rank == 0 and not disable_tqdm
        by_scoring: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            doc = request.doc if isinstance(request.doc, dict) else {}
            by_scoring.setdefault(doc.get("scoring") or "", []).append(index)
        answers: list[float | None] = [None] * len(requests)
        for scoring, indices in by_scoring.items():
            if scoring not in SCORERS:
                raise DebiasError(UNSCORED.get(scoring) or (
                    f"Task {requests[indices[0]].task_name!r}: hf-mlm cannot answer a generic loglikelihood(context, "
                    "continuation) request: a masked LM has no left-to-right likelihood. Supported: crows_bias (and "
                    "crows_bias_aul), stereoset_bias, and loglikelihood_rolling tasks such as wikitext2_ppl."))
            for i, value in zip(indices, SCORERS[scoring](self.scorer, [requests[i] for i in indices])):
                answers[i] = value
        return [(value, False) for value in answers]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Pseudo-log-likelihood of each whole text (Salazar et al. 2020), long texts in overlapping windows."""
        self.scorer.progress = self._rank == 0 and not disable_tqdm
        return self.scorer.pseudo_log_likelihoods([request.args[0] for request in requests])

    def generate_until(self, requests, disable_tqdm: bool = False):
        task = requests[0].task_name if requests else "?"
        raise DebiasError(f"Task {task!r} asks hf-mlm to generate text; masked LMs cannot generate left to right. "
                          "Use --model hf with a causal LM for generation tasks.")

    # ---- data parallelism: accelerate's collectives (no-ops in one process) -------------------------

    def all_gather(self, tensor):
        return self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        from accelerate.utils import gather_object

        return gather_object([obj])  # every rank gets the list; lm-eval reads it on dst only

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()
