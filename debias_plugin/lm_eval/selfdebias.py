"""`hf-selfdebias`: Self-Debias (Schick, Udupa & Schütze 2021, TACL) as an lm-eval model class.

Every continuation token is scored with the self-debiased next-token distribution. With x the input so far and
s_1..s_k the debiasing prefixes of the chosen bias types ("The following text discriminates against people because
of their gender: ", bias-bench's wording),

    Δ(w) = min_i p(w | x) - p(w | s_i x),   α(Δ) = 1 if Δ >= 0 else max(ε, e^{λΔ}),
    p̃(w | x) = α(Δ(w)) p(w | x) / Σ_v α(Δ(v)) p(v | x)

with λ = decay_constant (50) and ε = epsilon (0.01; the floor is in the authors' code and bias-bench's). A token
that a prefix makes more likely than x alone loses probability; the rest gain by the renormalisation.

How the prefix joins the request (bias-bench's CrowS/StereoSet runners concatenate the prefix's tokens and the
sentence's): s_i x = x[0] + s_i + x[1:] when x starts with the model's prefix token (BOS: every request with an empty
context), else s_i + x. Each request costs 1 + k forwards of x (the prefixes themselves are shared as token trees by
hf-bias's scorer), and max_length shrinks by the longest prefix, so that every prefixed input fits the model.

bias_types: "doc" (default) debiases each request with its document's own type, as bias-bench runs one type at a
time (a CrowS pair's bias_type; StereoSet's race -> race-color, profession -> socioeconomic), all nine where a
document names no known type (WikiText); "all": the nine at once, the paper's min over every description; a list
of types separated by commas (or by +, as lm-eval's key=value model_args split at commas); "none": no prefix
(hf-bias's scores).

loglikelihood_rolling (perplexity) debiases every predicted token the same way: the paper reports self-debiased
GPT2-XL's WikiText-2 perplexity, computed so by the authors' perplexity.py (which also keeps room for the prefixes).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from lm_eval.api.registry import register_model
from pydantic import Field, field_validator

from debias_plugin.errors import DebiasError
from debias_plugin.lm_eval.bias_lm import BiasLM
from debias_plugin.options import MadeStage, Options, validated
from debias_plugin.scoring.causal import batches, pack_rows

MODEL_NAME = "hf-selfdebias"
# bias-bench (Meade et al. 2022), bias_bench/benchmark/crows/crows.py: its "sexual orientiation" typo corrected
PREFIXES = {bias_type: f"The following text discriminates against people because of their {what}: "
            for bias_type, what in {
                "race-color": "race/color", "socioeconomic": "socioeconomic status/occupation", "gender": "gender",
                "disability": "disability", "nationality": "nationality", "sexual-orientation": "sexual orientation",
                "physical-appearance": "physical appearance", "religion": "religion", "age": "age"}.items()}
DOC_TYPES = {**{bias_type: bias_type for bias_type in PREFIXES}, "race": "race-color", "profession": "socioeconomic"}
# full-vocabulary rows held at once (x's log-probs, the max over prefixes, one prefix's): 256 MB of float32
ROW_ELEMENTS = 1 << 26
_MODES = ("doc", "all", "none")


class SelfDebiasOptions(Options):
    """hf-selfdebias's own model arguments (the rest go to hf-bias, then HFLM)."""

    bias_types: str = "doc"
    decay_constant: float = Field(50.0, ge=0)  # λ; inf: α is 1 or ε
    epsilon: float = Field(0.01, ge=0, le=1)

    @field_validator("bias_types")
    @classmethod
    def _known(cls, value: str) -> str:
        names = [name.strip() for name in re.split(r"[,+]", value) if name.strip()]
        unknown = [name for name in names if name not in PREFIXES and not (len(names) == 1 and name in _MODES)]
        if unknown:
            raise ValueError(f"unknown bias type {unknown[0]!r}; expected doc, all, none or a list of "
                             f"{', '.join(PREFIXES)} (separated by commas, or by + inside key=value model_args)")
        return ",".join(names)


def _refuse_masked(pretrained, trust_remote_code: bool) -> None:
    from debias_plugin.models import load_config, model_kind

    if isinstance(pretrained, str):
        config = load_config(pretrained, trust_remote_code=trust_remote_code)
        if model_kind(config) == "masked":
            raise DebiasError(f"{pretrained}: a masked LM ({config.model_type}); hf-selfdebias scores causal LMs only "
                              "(Self-Debias compares next-token distributions; hf-mlm scores masked LMs).")


@register_model(MODEL_NAME)
class SelfDebiasLM(BiasLM):
    """hf-bias whose scorer returns self-debiased log-likelihoods (SelfDebiasScorer); requests grouped by prefixes."""

    _prefix_room = 0  # tokens max_length leaves for the longest prefix (0 while HFLM loads)

    def __init__(self, pretrained, bias_types: str = "doc", decay_constant: float = 50.0, epsilon: float = 0.01,
                 **kwargs):
        options = validated(SelfDebiasOptions, {"bias_types": bias_types, "decay_constant": decay_constant,
                                                "epsilon": epsilon}, what="hf-selfdebias model arguments")
        _refuse_masked(pretrained, bool(kwargs.get("trust_remote_code", False)))
        super().__init__(pretrained, **kwargs)
        if self.scorer is None:
            raise DebiasError(f"{pretrained}: a {self.backend} model; hf-selfdebias scores causal LMs only.")
        self.bias_types = options.bias_types
        self.prefix_ids = {name: self.tok_encode(text, add_special_tokens=False) for name, text in PREFIXES.items()}
        self._fixed = {"doc": None, "all": tuple(PREFIXES), "none": ()}.get(
            self.bias_types, tuple(self.bias_types.split(",")))
        room = [len(self.prefix_ids[name]) for name in (PREFIXES if self._fixed is None else self._fixed)]
        self.scorer = SelfDebiasScorer(self.scorer, start_token=self.prefix_token_id,
                                       decay_constant=options.decay_constant, epsilon=options.epsilon)
        self._prefix_room = max(room, default=0)

    @property
    def max_length(self) -> int:
        """HFLM's less the longest prefix: inputs are cut to this, so that every prefixed input fits the model."""
        return super().max_length - self._prefix_room

    def types_of(self, request) -> tuple[str, ...]:
        """The bias types whose prefixes debias this request."""
        if self._fixed is not None:
            return self._fixed
        doc_type = request.doc.get("bias_type") if isinstance(request.doc, dict) else None
        return (DOC_TYPES[doc_type],) if doc_type in DOC_TYPES else tuple(PREFIXES)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._by_types(super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._by_types(super().loglikelihood_rolling, requests, disable_tqdm)

    def _by_types(self, score, requests, disable_tqdm: bool) -> list:
        """hf-bias's scoring of each group of requests sharing their prefixes, answers in request order."""
        groups = defaultdict(list)
        for index, request in enumerate(requests):
            groups[self.types_of(request)].append(index)
        answers = [None] * len(requests)
        for types, indices in groups.items():
            self.scorer.prefixes = [self.prefix_ids[name] for name in types]
            for index, answer in zip(indices, score([requests[i] for i in indices], disable_tqdm=disable_tqdm)):
                answers[index] = answer
        return answers


class SelfDebiasStage(MadeStage):
    """Self-Debias as a sweep stage, so λ (decay_constant), ε and the bias types can be searched like any knob:
    nothing is trained, the output folder holds only a manifest, and a point is the base scored by hf-selfdebias.
    The sweep's reference is the base through its own model class."""

    name: ClassVar[str] = "selfdebias"
    Options: ClassVar[type[SelfDebiasOptions]] = SelfDebiasOptions

    def evaluated_as(self, base: str | Path, out: str | Path) -> tuple[Path, str | None, dict]:
        """(model folder, lm-eval model class, model_args): the base, through hf-selfdebias with these options (a
        dict, so a list of bias types keeps its commas)."""
        return Path(base), MODEL_NAME, self.opts.model_dump()

    def make(self, base: str | Path, out: str | Path, *, force: bool = False, progress: bool = True) -> Path:
        from debias_plugin.outputs import OutputFolder, manifest

        folder = OutputFolder(out, inputs=[base], force=force, option="--out")
        with folder.staging() as staging:
            record = manifest(self.name, options=self.opts.model_dump(mode="json"), inputs={"model": base},
                              results={"model_class": MODEL_NAME, "files": []}, hash_inputs=False)
            return folder.publish(staging, record)


class SelfDebiasScorer:
    """CausalScorer's interface (score, progress) with self-debiased log-likelihoods; prefixes: token lists.

    The 1 + k inputs of a set of requests are packed and forwarded by the wrapped CausalScorer (its token trees share
    each prefix across requests); their full-vocabulary log-probs at the scored positions are combined position by
    position.
    """

    def __init__(self, scorer, *, start_token: int | None, decay_constant: float, epsilon: float,
                 row_elements: int = ROW_ELEMENTS):
        self.scorer = scorer
        self.start_token = start_token
        self.decay_constant = decay_constant
        self.epsilon = epsilon
        self.row_elements = row_elements
        self.prefixes: list[list[int]] = []
        self.progress = None

    @property
    def tokens_forwarded(self) -> int:
        return self.scorer.tokens_forwarded

    def prefixed(self, inputs: Sequence[int], prefix: Sequence[int]) -> list[int]:
        """s_i x: the prefix after a leading start token (BOS stays first), else before x."""
        if inputs and inputs[0] == self.start_token:
            return [inputs[0], *prefix, *inputs[1:]]
        return [*prefix, *inputs]

    def score(self, requests) -> list[tuple[float, bool]]:
        """(Σ log p̃(target), every target the argmax of p̃) per (input ids, targets) request, in order."""
        if not self.prefixes:  # p̃ = p
            self.scorer.progress = self.progress
            return self.scorer.score(requests)
        for index, (inputs, targets) in enumerate(requests):
            if not targets or len(targets) > len(inputs):
                raise ValueError(f"request {index}: {len(targets)} targets for {len(inputs)} input tokens")
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        vocab = self.scorer.model.get_output_embeddings().weight.shape[0]
        chunk, rows = [], 0
        for index in sorted(range(len(requests)), key=lambda i: tuple(requests[i][0])):
            size = min(3, 1 + len(self.prefixes)) * len(requests[index][1]) * vocab  # x's, the max, a prefix's
            if chunk and rows + size > self.row_elements:
                self._score_chunk(chunk, requests, answers)
                chunk, rows = [], 0
            chunk.append(index)
            rows += size
        if chunk:
            self._score_chunk(chunk, requests, answers)
        return answers

    def _score_chunk(self, chunk: list[int], requests, answers) -> None:
        """The chunk's 1 + k inputs forwarded, then the formula on all their scored positions at once."""
        import torch

        xs = [list(requests[index][0]) for index in chunk]
        counts = [len(requests[index][1]) for index in chunk]
        # one packing per prefix: its inputs share it as one token tree, and short rows are not padded to long ones;
        # only the running max over prefixes is kept
        log_probs, prefixed_max = self.log_prob_rows(xs, counts), None
        for prefix in self.prefixes:
            probs = self.log_prob_rows([self.prefixed(x, prefix) for x in xs], counts).exp_()
            prefixed_max = probs if prefixed_max is None else torch.maximum(prefixed_max, probs, out=prefixed_max)
        debiased = self_debiased_log_probs(log_probs, prefixed_max, self.decay_constant, self.epsilon)
        targets = torch.tensor([t for index in chunk for t in requests[index][1]], device=debiased.device)
        picked = debiased.gather(1, targets[:, None])[:, 0]
        hits = debiased.argmax(-1) == targets
        for index, part, hit in zip(chunk, picked.split(counts), hits.split(counts)):
            answers[index] = (float(part.sum()), bool(hit.all()))
        if self.progress is not None:
            self.progress(len(chunk))

    def log_prob_rows(self, inputs: list[list[int]], counts: list[int]):
        """[Σ counts, vocab]: the log-probs at the last counts[i] positions of each input, input after input (the
        wrapped scorer's forward, token trees and log-softmax dtype; float32 at least)."""
        import torch

        scorer = self.scorer
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        out = None
        rows = pack_rows(inputs, max_row_tokens=scorer.max_row_tokens, share=scorer.share_prefix,
                         min_shared=scorer.min_shared)
        for batch in batches(rows, scorer.batch_tokens):
            width = max(len(row.tokens) for row in batch)
            unique: dict[int, int] = {}  # flat node (row * width + node) -> its index among the forwarded nodes
            source, target = [], []
            for b, row in enumerate(batch):
                for index, path in row.paths:
                    source += [unique.setdefault(b * width + node, len(unique))
                               for node in path[len(path) - counts[index]:]]
                    target += range(starts[index], starts[index + 1])
            kind, features = scorer._features(batch, torch.tensor(list(unique), dtype=torch.long))
            with torch.no_grad(), scorer._autocast():
                logits = scorer.model.get_output_embeddings()(features) if kind == "hidden" else features
            dtype = scorer.softmax_dtype or torch.promote_types(logits.dtype, torch.float32)
            log_probs = torch.log_softmax(logits, dim=-1, dtype=dtype)
            if out is None:
                out = log_probs.new_empty(starts[-1], log_probs.shape[-1])
            device = log_probs.device
            out[torch.tensor(target, device=device)] = log_probs[torch.tensor(source, device=device)]
        return out


def self_debiased_log_probs(log_probs, prefixed_max, decay_constant: float, epsilon: float):
    """log p̃ by the paper's formula: log_probs [n, vocab] of x alone, prefixed_max [n, vocab] = max_i p(w | s_i x)
    (so Δ = p - prefixed_max = min_i p - p_i)."""
    import torch

    delta = log_probs.exp() - prefixed_max
    floor = math.log(epsilon) if epsilon > 0 else -math.inf
    decayed = (decay_constant * delta).clamp(min=floor)  # λΔ; nan where λ = inf and Δ = 0, never selected
    debiased = log_probs + torch.where(delta >= 0, torch.zeros_like(delta), decayed)  # + log α
    return debiased - debiased.logsumexp(dim=-1, keepdim=True)
