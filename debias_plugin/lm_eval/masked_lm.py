"""`hf-mlm`: masked LMs (BERT, RoBERTa, ALBERT, DistilBERT, ...) in lm-eval, each task scored by its paper's metric.

A masked LM has no left-to-right likelihood, so each request is answered with the score the benchmark's
paper defines for encoders, chosen by the doc's "scoring" field (set by our task loaders):
- crows_pair: Nangia et al.'s shared-token pseudo-log-likelihood of the sentence (needs its pair partner,
  read from Instance.doc), rounded to 3 decimals;  crows_pair_aul: AUL (Kaneko & Bollegala 2022);
- stereoset_intrasentence: bias-bench's mean probability of the attribute subtokens;
- loglikelihood_rolling (wikitext2_ppl): pseudo-log-likelihood (Salazar et al. 2020) in overlapping windows.
Everything is batched across requests by debias_plugin.scoring.masked; under `accelerate launch` each
process scores the documents lm-eval assigns to it.
"""

from __future__ import annotations

import logging

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from debias_plugin.errors import DebiasError
from debias_plugin.scoring.masked import MaskedScorer

log = logging.getLogger(__name__)

CROWS = "crows_pair"
CROWS_AUL = "crows_pair_aul"
STEREOSET_INTRA = "stereoset_intrasentence"
STEREOSET_INTER = "stereoset_intersentence"


def load_masked_lm(pretrained: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                   allow_pickle: bool = False):
    """(model, tokenizer) of a folder that really holds a masked-LM head; anything else is a DebiasError."""
    import torch
    from transformers import AutoConfig

    from debias_plugin.models import check_weights, load_model, model_kind

    check_weights(pretrained, allow_pickle)
    config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    if model_kind(config) != "masked":
        raise DebiasError(f"{pretrained}: a causal LM ({config.model_type}); hf-mlm scores masked LMs only. "
                          "Use --model hf for causal models.")
    model, tokenizer, _ = load_model(pretrained, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                     dtype=getattr(torch, dtype))
    if tokenizer.mask_token_id is None:
        raise DebiasError(f"{pretrained}: the tokenizer has no mask token; hf-mlm needs one to mask tokens.")
    return model.eval(), tokenizer


@register_model("hf-mlm")
class MaskedLM(LM):
    """lm-eval model for masked LMs; batch size is a padded-token budget (`batch_tokens`), not a request count."""

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "float32",
                 batch_tokens: int | str | None = None, max_batch_size: int | str | None = None,
                 max_length: int | str | None = None, trust_remote_code: bool = False, allow_pickle: bool = False,
                 batch_size=None, **unused):
        super().__init__()
        import torch
        from accelerate import Accelerator

        if unused:
            log.warning("hf-mlm ignores model arguments it does not know: %s", ", ".join(sorted(unused)))
        if batch_size not in (None, 1, "1", "auto"):
            log.info("hf-mlm packs batches by batch_tokens=%s; --batch_size %s is not used.", batch_tokens, batch_size)
        # cpu=True lets torchrun / `accelerate launch --multi_gpu` start data-parallel CPU processes (gloo)
        accelerator = Accelerator(cpu=str(device or "").startswith("cpu") or not torch.cuda.is_available())
        if accelerator.num_processes > 1:
            self.accelerator = accelerator
            self._device = accelerator.device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, tokenizer = load_masked_lm(pretrained, dtype=dtype, trust_remote_code=_flag(trust_remote_code),
                                          allow_pickle=_flag(allow_pickle))
        self.model = model.to(self._device)
        self.tokenizer = tokenizer
        if batch_tokens is None:  # small batches stay in CPU caches; a GPU wants large ones
            batch_tokens = 2048 if self._device.type == "cpu" else 32768
        self.scorer = MaskedScorer(
            self.model, tokenizer, token_budget=int(batch_tokens),
            max_batch_size=int(max_batch_size) if max_batch_size else None,
            max_length=int(max_length) if max_length else None, progress=self._rank == 0,
        )

    # ---- lm-eval request types ----------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Each request answered with its task's masked-LM score (see module docstring); is_greedy is False."""
        self.scorer.progress = self._rank == 0 and not disable_tqdm
        by_scoring: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_scoring.setdefault(_scoring_of(request), []).append(index)
        answers: list[float | None] = [None] * len(requests)
        for scoring, indices in by_scoring.items():
            group = [requests[i] for i in indices]
            for i, value in zip(indices, self._score_group(scoring, group)):
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

    # ---- scoring per doc kind -----------------------------------------------------------------------

    def _score_group(self, scoring: str, requests) -> list[float]:
        if scoring == CROWS:
            pairs = list(dict.fromkeys((r.doc["sent_more"], r.doc["sent_less"]) for r in requests))
            scores = dict(zip(pairs, self.scorer.crows_scores(pairs)))
            return [round(_pick(scores[(r.doc["sent_more"], r.doc["sent_less"])], r), 3) for r in requests]
        if scoring == CROWS_AUL:
            sentences = list(dict.fromkeys(_continuation(r) for r in requests))
            scores = dict(zip(sentences, self.scorer.aul_scores(sentences)))
            return [scores[_continuation(r)] for r in requests]
        if scoring == STEREOSET_INTRA:
            items = list(dict.fromkeys((r.doc["context"], _continuation(r)) for r in requests))
            scores = dict(zip(items, self.scorer.stereoset_scores(items)))
            return [scores[(r.doc["context"], _continuation(r))] for r in requests]
        if scoring == STEREOSET_INTER:
            raise DebiasError("StereoSet intersentence (task stereoset_bias_inter) has no masked-LM score in "
                              "Nadeem et al. or bias-bench; hf-mlm supports stereoset_bias (intrasentence) only.")
        task = requests[0].task_name
        raise DebiasError(
            f"Task {task!r}: hf-mlm cannot answer a generic loglikelihood(context, continuation) request, because a "
            "masked LM has no conditional left-to-right likelihood. Supported: crows_bias (and crows_bias_aul), "
            "stereoset_bias, and loglikelihood_rolling tasks such as wikitext2_ppl."
        )

    # ---- distributed primitives (as lm-eval's HFLM) -------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def all_gather(self, tensor):
        return tensor if self.world_size <= 1 else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj=obj, object_gather_list=gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _continuation(request) -> str:
    context, continuation = request.args[:2]
    if context:
        raise DebiasError(f"Task {request.task_name!r}: hf-mlm expects the whole sentence as the continuation with an "
                          f"empty context, got context {context[:60]!r}.")
    return continuation


def _scoring_of(request) -> str:
    doc = request.doc if isinstance(request.doc, dict) else {}
    return doc.get("scoring") or ""


def _pick(pair_scores: tuple[float, float], request) -> float:
    """The score of the sentence this request asks about: sent_more's or sent_less's."""
    sentence = _continuation(request)
    if sentence == request.doc["sent_more"]:
        return pair_scores[0]
    if sentence == request.doc["sent_less"]:
        return pair_scores[1]
    raise DebiasError(f"Task {request.task_name!r}: continuation {sentence[:60]!r} is neither sent_more nor sent_less "
                      "of its CrowS doc; expected doc_to_choice = [sent_more, sent_less].")
