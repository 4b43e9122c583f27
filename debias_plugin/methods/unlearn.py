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
KL(original || current) of next-token / masked-token distributions on the retain corpus).
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from debias_plugin.data import load_texts
from debias_plugin.errors import DataError, DebiasError
from debias_plugin.methods import (
    encode, lm_batch, pad, pad_id, per_example_mean, perplexity, special_positions, token_logprobs,
)
from debias_plugin.training import StreamOrder

logger = logging.getLogger(__name__)
MARKUP = re.compile(r"\[\[(.+?)\]\]")
REGULARISERS = ("none", "gd", "kl")


@dataclass
class UnlearnOptions:
    """Forget set, how to choose its target tokens, optional held-out and retain corpora."""

    corpus: str
    column: str | None = None
    where: dict[str, str] = field(default_factory=dict)
    targets: str = "words"  # words | markup
    words: str | None = None  # None: bias_attribute_words.json from $DEBIAS_DATA_DIR
    domains: list[str] = field(default_factory=lambda: ["gender"])
    heldout: str | None = None
    heldout_column: str | None = None
    heldout_where: dict[str, str] = field(default_factory=dict)
    retain: str | None = None
    retain_column: str | None = None
    retain_where: dict[str, str] = field(default_factory=dict)
    regulariser: str = "none"  # none | gd | kl
    retain_weight: float = 1.0
    eval_texts: int = 0  # 0 = all forget / held-out texts


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
    plain, spans, last = [], [], 0
    length = 0
    for match in MARKUP.finditer(text):
        before = text[last:match.start()]
        plain.append(before)
        length += len(before)
        inner = match.group(1)
        spans.append((length, length + len(inner)))
        plain.append(inner)
        length += len(inner)
        last = match.end()
    plain.append(text[last:])
    return "".join(plain), spans


def target_mask(offsets: list[tuple[int, int]], specials: list[bool], spans: list[tuple[int, int]]) -> list[bool]:
    """Tokens whose characters overlap a target span (special tokens never)."""
    return [not special and end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
            for (start, end), special in zip(offsets, specials)]


class Unlearn:
    """Gradient ascent on the chosen tokens' likelihood, as a `training.train` method."""

    stage = "unlearn"

    def __init__(self, options: UnlearnOptions):
        if options.targets not in ("words", "markup"):
            raise DebiasError(f"--targets must be 'words' or 'markup', not '{options.targets}'.")
        if options.regulariser not in REGULARISERS:
            raise DebiasError(f"--regulariser must be one of {', '.join(REGULARISERS)}, not '{options.regulariser}'.")
        if options.regulariser != "none" and not options.retain:
            raise DebiasError(f"--regulariser {options.regulariser} needs a retain corpus (--retain PATH).")
        self.opts = options
        self.counts: dict = {}
        self.reference = None
        self.word_source = None

    def options(self) -> dict:
        return asdict(self.opts)

    def input_files(self) -> list[str]:
        files = [self.opts.corpus, self.opts.heldout, self.opts.retain]
        files.append(self.word_source)
        return [f for f in files if f]

    def report(self) -> dict:
        return self.counts

    # -- data -------------------------------------------------------------------------------------------
    def _forget_examples(self, run) -> list[tuple[list[int], list[bool]]]:
        texts = load_texts(self.opts.corpus, self.opts.column, self.opts.where)
        pattern = None
        if self.opts.targets == "words":
            words, self.word_source = load_word_list(self.opts.words, self.opts.domains)
            if not words:
                raise DataError(self.word_source, "word list", "at least one word", "none")
            alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
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
            what = "[[...]] markup"
        else:
            domains = "" if self.word_source.endswith(".txt") else f" ({', '.join(self.opts.domains)})"
            what = f"the words of {self.word_source}{domains}"
        if not examples:
            found = "no match in any text" if pattern is not None else "no [[...]] markup in any text"
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
        examples = self._forget_examples(run)
        self.eval_examples = examples
        self.heldout_texts = (load_texts(self.opts.heldout, self.opts.heldout_column, self.opts.heldout_where)
                              if self.opts.heldout else [])
        self.retain_examples = []
        if self.opts.retain:
            retain_texts = load_texts(self.opts.retain, self.opts.retain_column, self.opts.retain_where)
            self.retain_examples = [encode(run.tokenizer, t, run.kind, run.config.max_length)[0] for t in retain_texts]
            self.retain_order = StreamOrder(len(self.retain_examples), run.config.seed + 1)
        if self.opts.regulariser == "kl":
            self.reference = copy.deepcopy(run.model).to(run.device).eval().requires_grad_(False)
        return examples

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

        ids = [e[0] for e in examples]
        batch = {"attention_mask": pad([[1] * len(i) for i in ids], 0), "labels": pad(ids, 0),
                 "targets": pad([e[1] for e in examples], 0).to(torch.bool)}
        if self.kind == "masked":
            masked = [[self.tokenizer.mask_token_id if t else token for token, t in zip(i, tg)] for i, tg in examples]
            batch["input_ids"] = pad(masked, pad_id(self.tokenizer))
        else:
            batch["input_ids"] = pad(ids, pad_id(self.tokenizer))
        return batch

    # -- objective --------------------------------------------------------------------------------------
    def _label_logprobs(self, model, batch: dict, prefix: str = ""):
        logprobs = token_logprobs(model, self.kind, batch[prefix + "input_ids"], batch[prefix + "attention_mask"])
        if self.kind == "masked":
            logprobs = logprobs.gather(-1, batch[prefix + "labels"][..., None])[..., 0]
        return logprobs

    def loss(self, model, batch: dict):
        """Mean target log-probability (minimised = gradient ascent on its NLL) + optional retain term."""
        forget = per_example_mean(self._label_logprobs(model, batch), batch["targets"]).mean()
        if self.opts.regulariser == "gd":
            retain_nll = -per_example_mean(self._label_logprobs(model, batch, "retain_"), batch["retain_targets"])
            return forget + self.opts.retain_weight * retain_nll.mean()
        if self.opts.regulariser == "kl":
            return forget + self.opts.retain_weight * self._kl(model, batch).mean()
        return forget

    def _kl(self, model, batch: dict):
        """Per-example mean KL(original || current) over the retain tokens' predictive distributions."""
        import torch

        ids, attention = batch["retain_input_ids"], batch["retain_attention_mask"]
        current = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), -1)
        with torch.no_grad():
            original = torch.log_softmax(self.reference(input_ids=ids, attention_mask=attention).logits.float(), -1)
        kl = (original.exp() * (original - current)).sum(-1)
        targets = batch["retain_targets"]
        if self.kind == "causal":  # distribution at t-1 predicts token t
            kl, targets = kl[:, :-1], targets[:, 1:]
        return per_example_mean(kl, targets)

    # -- metrics (the paper's Figure 1) -----------------------------------------------------------------
    def evaluate(self, run) -> dict:
        limit = self.opts.eval_texts or None
        model, device = run.unwrapped, run.device
        metrics = {"forget_perplexity": perplexity(model, run.tokenizer, run.kind, self.plain_texts[:limit],
                                                   self.max_length, device)}
        if self.heldout_texts:
            metrics["heldout_perplexity"] = perplexity(model, run.tokenizer, run.kind, self.heldout_texts[:limit],
                                                       self.max_length, device)
        examples = self.eval_examples[:limit]
        target_sum = target_count = other_sum = other_count = 0.0
        for start in range(0, len(examples), 16):
            chunk = examples[start:start + 16]
            batch = {k: v.to(device) for k, v in self._forget_batch(chunk).items()}
            logprobs = self._label_logprobs(model, batch)
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
