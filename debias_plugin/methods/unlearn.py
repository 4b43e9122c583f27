"""Masked-token gradient-ascent unlearning (Lu et al., "Towards Transfer Unlearning").

Only chosen tokens are unlearned: the loss is their mean log-probability, minimised, so the model
forgets the association between a group word and its harmful context and keeps the rest of the text.
Causal models score a target token given its left context; masked models see every target replaced by
the tokenizer's mask token and predict it. Targets come from

- a word list (``targets="words"``): whole-word, case-insensitive matches of the words of the chosen
  domains in bias_attribute_words.json (domain -> groups of words) or of a plain .txt list (one per line);
- inline markup (``targets="markup"``): the text marks each span to unlearn as ``[[span]]``; the brackets
  are removed before tokenization, e.g. ``"I think [[women]] should not vote"``.

A text with no target token (after truncation) cannot be trained on; it is counted and reported (the
manifest's ``report``), never dropped silently. An optional retain regulariser holds the rest of the
language steady: ``gd`` (gradient difference: plus the retain corpus's NLL) or ``kl`` (plus
KL(original || current) of next-token / masked-token distributions on the retain corpus). The original model
is a frozen copy without gradients (bf16 when the run computes in bf16), or under LoRA the same model with its
adapter disabled: no second copy at all.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import Field, FiniteFloat, model_validator

from debias_plugin.errors import DataError, DebiasError
from debias_plugin.methods import (
    encode, label_logprobs, lm_batch, pad, pad_id, per_example_mean, perplexity, special_positions,
)
from debias_plugin.methods.base import StreamOrder, TrainingMethod, compute_dtype
from debias_plugin.methods.lora import (
    SHARDING_REFUSAL, LoraOptions, output_format, reference_forward, save_lora_or_full, wrap_lora,
)
from debias_plugin.options import InputPath

logger = logging.getLogger(__name__)
MARKUP = re.compile(r"\[\[(.+?)\]\]")


class UnlearnOptions(LoraOptions):
    """Forget set, how to choose its target tokens, optional held-out and retain corpora; LoRA or all weights."""

    corpus: InputPath = Field(description="Forget set: .txt, .csv/.tsv or .jsonl.")
    column: str | None = Field(None, description="Text column of a CSV/JSONL corpus (default 'text').")
    where: dict[str, str] = Field({}, description="Keep forget rows with COLUMN=VALUE (repeatable), e.g. split=dev.")
    targets: Literal["words", "markup"] = Field(
        "words", description="words: matches of a word list; markup: spans written as [[word]] in the text.")
    words: InputPath | None = Field(None, description="Word list: domain-keyed JSON (bias_attribute_words.json layout) "
                                                "or .txt, one word per line (default: bias_attribute_words.json "
                                                "in $DEBIAS_DATA_DIR).")
    domains: list[str] = Field(["gender"], min_length=1,
                               description="Domain(s) of the JSON word list (repeatable): several unlearn the union "
                                           "of their words (bundled list: gender, race, religion).",
                               json_schema_extra={"flag": "--domain"})
    heldout: InputPath | None = Field(None, description="Held-out corpus for perplexity logging.")
    heldout_column: str | None = None
    heldout_where: dict[str, str] = Field({}, description="COLUMN=VALUE filter for the held-out corpus, e.g. "
                                                          "split=test.")
    retain: InputPath | None = Field(None, description="Retain corpus for the regulariser.")
    retain_column: str | None = None
    retain_where: dict[str, str] = {}
    regulariser: Literal["none", "gd", "kl"] = Field(
        "none", description="gd: plus the retain corpus NLL (gradient difference); kl: plus KL to the original "
                            "model.")
    retain_weight: FiniteFloat = Field(1.0, ge=0)
    eval_texts: int = Field(64, ge=0, description="Texts per evaluation (before, after, every --eval-every "
                                                 "steps); 0 = all.")

    @model_validator(mode="after")
    def _regulariser_needs_retain(self):
        if self.regulariser != "none" and not self.retain:
            raise ValueError(f"regulariser {self.regulariser} needs a retain corpus (retain)")
        return self


def load_word_list(path: str | None, domains: list[str]) -> tuple[set[str], str]:
    """Words to unlearn and the file they came from: a domain-keyed JSON or a .txt (one word per line)."""
    from debias_plugin.data import domain_words, load_attribute_words
    from debias_plugin.data._io import read_text

    if path and Path(path).suffix.lower() == ".txt":
        words = {line.strip() for line in read_text(Path(path)).splitlines() if line.strip()}
        return words, str(path)
    from debias_plugin.data.words import ATTRIBUTE_WORDS_RELATIVE_PATH
    from debias_plugin.paths import data_file

    source = str(data_file(path, ATTRIBUTE_WORDS_RELATIVE_PATH, "Bias attribute words"))
    table = load_attribute_words(source)
    words = set()
    for domain in domains:
        words |= domain_words(table, domain, source)
    return words, source


def word_spans(text: str, pattern: re.Pattern) -> list[tuple[int, int]]:
    return [match.span() for match in pattern.finditer(text)]


def markup_spans(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Strip [[...]] markup; return the plain text and the character spans that were marked."""
    plain, spans, last = "", [], 0
    for match in MARKUP.finditer(text):
        plain += text[last:match.start()]
        spans.append((len(plain), len(plain) + len(match.group(1))))
        plain += match.group(1)
        last = match.end()
    return plain + text[last:], spans


def target_mask(offsets: list[tuple[int, int]], specials: list[bool], spans: list[tuple[int, int]]) -> list[bool]:
    """Tokens whose characters overlap a target span (special tokens never)."""
    return [not special and end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
            for (start, end), special in zip(offsets, specials)]


class Unlearn(TrainingMethod):
    """Unlearn chosen tokens by gradient ascent on their likelihood (Lu et al., "Towards Transfer Unlearning").

    Defaults follow the paper: batch 8, 50 steps, lr 1e-5. Texts without a target token are counted and
    reported. --eval-every N logs forget-set and held-out perplexity into the manifest's history.
    """

    name = "unlearn"
    Options = UnlearnOptions

    def __init__(self, options: UnlearnOptions):
        super().__init__(options)
        self.counts: dict = {}
        self.reference = None
        self.word_source = None
        self.words: set[str] = set()

    def inputs(self) -> dict:
        return {"corpus": self.opts.corpus, "heldout": self.opts.heldout, "retain": self.opts.retain,
                "words": self.word_source or self.opts.words}

    def report(self) -> dict:
        return {**self.counts, "output_format": output_format(self.opts)}

    def sharding_refusal(self) -> str | None:
        return SHARDING_REFUSAL if self.opts.trains_lora else None

    def read_inputs(self) -> None:
        from debias_plugin.data import load_texts

        self.texts = load_texts(self.opts.corpus, self.opts.column, self.opts.where)
        if self.opts.targets == "words":
            self.words, self.word_source = load_word_list(self.opts.words, self.opts.domains)
            if not self.words:
                raise DataError(self.word_source, "word list", "at least one word", "none")
        self.heldout_texts = (load_texts(self.opts.heldout, self.opts.heldout_column, self.opts.heldout_where)
                              if self.opts.heldout else [])
        self.retain_texts = (load_texts(self.opts.retain, self.opts.retain_column, self.opts.retain_where)
                             if self.opts.retain else [])

    # -- data -------------------------------------------------------------------------------------------
    def _forget_examples(self, run) -> list[tuple[list[int], list[bool]]]:
        texts, pattern = self.texts, None
        if self.opts.targets == "words":
            alternatives = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
            pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        examples, skipped, matched, self.plain_texts = [], [], Counter(), []
        for index, text in enumerate(texts):
            if pattern is None:
                text, spans = markup_spans(text)
            else:
                spans = word_spans(text, pattern)
            self.plain_texts.append(text)
            ids, offsets = encode(run.tokenizer, text, run.kind, run.config.max_length)
            targets = target_mask(offsets, special_positions(run.tokenizer, ids), spans)
            if any(targets):
                examples.append((ids, targets))
                matched.update(text[a:b].lower() for a, b in spans)
            else:
                skipped.append(index)
        self.counts = {"texts": len(texts), "texts_with_targets": len(examples), "texts_without_targets": len(skipped),
                       "target_tokens": sum(sum(t) for _, t in examples),
                       "skipped_text_indices": skipped[:50], "most_matched": dict(matched.most_common(15))}
        if pattern is None:
            what, found = "[[...]] markup", "no [[...]] markup in any text"
        else:
            domains = "" if self.word_source.endswith(".txt") else f" ({', '.join(self.opts.domains)})"
            what, found = f"the words of {self.word_source}{domains}", "no match in any text"
        if not examples:
            raise DataError(self.opts.corpus, f"column '{self.opts.column or 'text'}'",
                            f"texts containing target tokens ({what})", f"{found} of {len(texts)}")
        if skipped and run.is_main:
            logger.warning("unlearn: %d of %d texts have no target token (%s) and are not trained on; see 'report' "
                           "in the manifest.", len(skipped), len(texts), what)
        return examples

    def setup(self, run) -> list:
        self.kind, self.tokenizer, self.seed = run.kind, run.tokenizer, run.config.seed
        self.max_length = run.config.max_length
        if run.kind == "masked" and run.tokenizer.mask_token_id is None:
            raise DebiasError(f"{run.config.model}: the tokenizer has no mask token, needed to unlearn masked tokens.")
        self.eval_examples = self._forget_examples(run)
        self.retain_examples = [encode(run.tokenizer, t, run.kind, run.config.max_length)[0] for t in self.retain_texts]
        self.retain_order = StreamOrder(len(self.retain_examples), run.config.seed + 1)
        self.autocast = run.accelerator.autocast
        if self.opts.trains_lora:
            run.model = wrap_lora(run, self.opts)
            self.peft_model = run.model  # the reference: this model with its adapter disabled
        elif self.needs_reference():
            self.reference = frozen_copy(run.model, compute_dtype(run.config)).to(run.device)
        return self.eval_examples

    def needs_reference(self) -> bool:
        """The original model's predictions (for KL; NPO's forget loss always needs them)."""
        return self.opts.regulariser == "kl"

    @contextmanager
    def original_model(self):
        """The model as loaded, for a no-grad pass: the frozen copy, or the LoRA model with its adapter off."""
        import torch

        with torch.no_grad(), self.autocast():
            if self.opts.trains_lora:
                with reference_forward(self.peft_model) as model:
                    yield model
            else:
                yield self.reference

    def collate(self, examples: list, positions: list[int]) -> dict:
        batch = self._forget_batch(examples)
        if self.retain_examples:
            retain = [self.retain_examples[self.retain_order[p]] for p in positions]
            # the retain corpus: a plain LM batch, masked with its own seed (masked models)
            plain = lm_batch(retain, positions, self.kind, self.tokenizer, self.seed + 1)
            batch.update({f"retain_{k}": v for k, v in plain.items()})
        return batch

    def _forget_batch(self, examples: list) -> dict:
        """Token ids (masked models: targets replaced by the mask token), labels and the target mask."""
        import torch

        ids = inputs = [e[0] for e in examples]
        if self.kind == "masked":
            inputs = [[self.tokenizer.mask_token_id if t else token for token, t in zip(i, tg)] for i, tg in examples]
        return {"attention_mask": pad([[1] * len(i) for i in ids], 0), "labels": pad(ids, 0),
                "targets": pad([e[1] for e in examples], 0).to(torch.bool),
                "input_ids": pad(inputs, pad_id(self.tokenizer))}

    # -- objective --------------------------------------------------------------------------------------
    def forget_loss(self, model, batch: dict):
        """Mean over examples of the mean target log-probability: minimised = gradient ascent on its NLL."""
        return per_example_mean(label_logprobs(model, self.kind, batch), batch["targets"]).mean()

    def loss(self, model, batch: dict):
        """The forget loss + optional retain term."""
        forget = self.forget_loss(model, batch)
        if self.opts.regulariser == "gd":
            retain_nll = -per_example_mean(label_logprobs(model, self.kind, batch, "retain_"), batch["retain_targets"])
            return forget + self.opts.retain_weight * retain_nll.mean()
        if self.opts.regulariser == "kl":
            return forget + self.opts.retain_weight * self._kl(model, batch).mean()
        return forget

    def _kl(self, model, batch: dict):
        """Per-example mean KL(original || current) over the retain tokens' predictive distributions."""
        import torch

        ids, attention = batch["retain_input_ids"], batch["retain_attention_mask"]
        current = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), -1)
        with self.original_model() as reference:
            original = torch.log_softmax(reference(input_ids=ids, attention_mask=attention).logits.float(), -1)
        kl = (original.exp() * (original - current)).sum(-1)
        targets = batch["retain_targets"]
        if self.kind == "causal":  # distribution at t-1 predicts token t
            kl, targets = kl[:, :-1], targets[:, 1:]
        return per_example_mean(kl, targets)

    # -- metrics (the paper's Figure 1) -----------------------------------------------------------------
    def evaluate(self, run) -> dict:
        limit = self.opts.eval_texts or None
        model, device = run.eval_model, run.device
        shown = (lambda what: f"{what} perplexity") if run.is_main else (lambda what: None)
        metrics = {"forget_perplexity": perplexity(model, run.tokenizer, run.kind, self.plain_texts[:limit],
                                                   self.max_length, device, progress=shown("forget"))}
        if self.heldout_texts:
            metrics["heldout_perplexity"] = perplexity(model, run.tokenizer, run.kind, self.heldout_texts[:limit],
                                                       self.max_length, device, progress=shown("held-out"))
        examples = self.eval_examples[:limit]
        target_sum = target_count = other_sum = other_count = 0.0
        for start in range(0, len(examples), 16):
            chunk = examples[start:start + 16]
            batch = {k: v.to(device) for k, v in self._forget_batch(chunk).items()}
            logprobs = label_logprobs(model, self.kind, batch)
            targets = batch["targets"]
            target_sum += float(logprobs[targets].sum())
            target_count += int(targets.sum())
            if self.kind == "causal":
                others = batch["attention_mask"].bool() & ~targets
                others[:, 0] = False
                other_sum += float(logprobs[others].sum())
                other_count += int(others.sum())
        metrics["target_logprob"] = target_sum / max(target_count, 1)
        if other_count:
            metrics["nontarget_logprob"] = other_sum / other_count
        return metrics

    def save(self, run, folder: Path) -> None:
        save_lora_or_full(run, folder, self.opts)


def frozen_copy(model, dtype):
    """A copy without gradients, in `dtype`, made one tensor at a time: never two full copies of the weights.

    deepcopy's memo maps every parameter to its converted clone before the copy starts, so the module tree
    is copied around them (buffers, tied weights and hooks as in the original)."""
    import torch

    if any(parameter.is_meta for parameter in model.parameters()):
        raise DebiasError("The model's weights are not loaded on this process (FSDP cpu_ram_efficient_loading?), so "
                          "no reference copy can be made; set fsdp_cpu_ram_efficient_loading: false for stages "
                          "with a reference model (unlearn --regulariser kl, npo).")
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()
