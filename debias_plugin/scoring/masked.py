"""Masked-LM scores in large padded batches: CrowS (Nangia et al. 2020), AUL (Kaneko & Bollegala 2022),
StereoSet intrasentence (Nadeem et al. 2021, as bias-bench scores it) and pseudo-log-likelihood (Salazar et al. 2020).

Every score is built from queries "log p(target | input_ids) at one position". The engine deduplicates
identical inputs, sorts them by length, packs them under a padded-token budget (the memory cap) and runs
the vocabulary projection only at the queried positions, so thousands of masked copies cost a few
large forward passes instead of one small pass each. No lm-eval imports here.
"""

from __future__ import annotations

import difflib
import math
import string
from typing import Iterable, Sequence

from debias_plugin.errors import DebiasError
from debias_plugin.models import logits_at

BLANK = "BLANK"
Query = tuple[tuple[int, ...], int, int]  # (input ids, position, target id)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def shared_token_positions(ids_a: Sequence[int], ids_b: Sequence[int]) -> tuple[list[int], list[int]]:
    """Positions of the tokens both sentences share: difflib's 'equal' spans, as in Nangia et al.'s metric.py."""
    matcher = difflib.SequenceMatcher(None, [str(i) for i in ids_a], [str(i) for i in ids_b])
    shared_a, shared_b = [], []
    for operation, a_start, a_end, b_start, b_end in matcher.get_opcodes():
        if operation == "equal":
            shared_a += range(a_start, a_end)
            shared_b += range(b_start, b_end)
    return shared_a, shared_b


def pll_windows(n_tokens: int, max_tokens: int) -> list[tuple[int, int, int, int]]:
    """(window_start, window_end, scored_start, scored_end) covering a long text with half-overlapping windows.

    Each token is scored exactly once, in the window where it sits nearest the middle, so it sees at
    least max_tokens/4 tokens on each side wherever the text has them.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    if n_tokens <= max_tokens:
        return [(0, n_tokens, 0, n_tokens)] if n_tokens else []
    stride = max(1, max_tokens // 2)
    starts = list(range(0, n_tokens - max_tokens, stride)) + [n_tokens - max_tokens]
    windows, scored_start = [], 0
    for k, start in enumerate(starts):
        end = start + max_tokens
        scored_end = n_tokens if k == len(starts) - 1 else (starts[k + 1] + end) // 2
        if scored_end > scored_start:
            windows.append((start, end, scored_start, scored_end))
        scored_start = max(scored_start, scored_end)
    return windows


def stereoset_attribute_word(context: str, sentence: str) -> str:
    """The word filling BLANK, found as StereoSet's own loader does: same word index, punctuation stripped."""
    context_words = context.split(" ")
    blank_indices = [i for i, word in enumerate(context_words) if BLANK in word]
    sentence_words = sentence.split(" ")
    if not blank_indices or blank_indices[-1] >= len(sentence_words):
        raise DebiasError(f"StereoSet sentence {sentence!r} does not fit context {context!r}: expected a word at "
                          f"the {BLANK} position.")
    word = sentence_words[blank_indices[-1]].translate(_PUNCTUATION)
    if not word:
        raise DebiasError(f"StereoSet sentence {sentence!r}: the word at the {BLANK} of {context!r} is only punctuation.")
    return word


def is_uncased(tokenizer) -> bool:
    """An uncased model's tokenizer lower-cases (flag or behaviour); such models are fed lower-cased text."""
    if (getattr(tokenizer, "init_kwargs", None) or {}).get("do_lower_case"):
        return True
    probe = "Hello World Zebra"
    return tokenizer.tokenize(probe) == tokenizer.tokenize(probe.lower())


def model_max_length(model, tokenizer) -> int:
    """Longest input the model's position embeddings and tokenizer allow (RoBERTa reserves padding_idx + 1)."""
    limits = []
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions:
        embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
        padding_idx = getattr(embeddings, "padding_idx", None)
        limits.append(positions - (padding_idx + 1 if isinstance(padding_idx, int) else 0))
    return min(limits) if limits else 512


class MaskedScorer:
    """Batched masked-LM scoring for one model; `token_budget` caps the padded tokens of one forward pass."""

    def __init__(self, model, tokenizer, *, token_budget: int = 2048, max_batch_size: int | None = None,
                 max_length: int | None = None, progress: bool = False):
        if tokenizer.mask_token_id is None:
            raise DebiasError(f"Tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no mask token; masked-LM "
                              "scoring needs one (expected a BERT/RoBERTa/ALBERT-style tokenizer).")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = next((i for i in (tokenizer.pad_token_id, getattr(model.config, "pad_token_id", None))
                            if i is not None), 0)
        self.uncased = is_uncased(tokenizer)
        self.max_length = max_length or model_max_length(model, tokenizer)
        self.token_budget = token_budget  # a single longer input still gets its own batch
        self.max_batch_size = max_batch_size
        self.progress = progress

    # ---- engine -------------------------------------------------------------------------------------

    def log_probs(self, queries: Sequence[Query], description: str = "masked LM") -> list[float]:
        """log p(target) at each query's position; identical (input, position, target) computed once."""
        import torch

        wanted: dict[tuple[int, ...], dict[tuple[int, int], None]] = {}
        for ids, position, target in queries:
            wanted.setdefault(ids, {})[(position, target)] = None
        inputs = sorted(wanted, key=lambda ids: (-len(ids), ids))
        results: dict[Query, float] = {}
        batches = list(self._pack(inputs))
        device = next(self.model.parameters()).device
        from tqdm.auto import tqdm

        with torch.inference_mode():
            for batch in tqdm(batches, desc=description, unit="batch", disable=not self.progress):
                width = len(batch[0])
                padded = any(len(ids) != width for ids in batch)
                input_ids = torch.tensor([list(ids) + [self.pad_id] * (width - len(ids)) for ids in batch])
                attention = (torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
                             if padded else None)  # no mask: the faster attention path, as an unbatched call
                flat, targets, keys = [], [], []
                for row, ids in enumerate(batch):
                    for position, target in wanted[ids]:
                        flat.append(row * width + position)
                        targets.append(target)
                        keys.append((ids, position, target))
                logits = logits_at(self.model, input_ids.to(device),
                                   None if attention is None else attention.to(device), torch.tensor(flat, device=device))
                scores = logits.float().log_softmax(-1).gather(1, torch.tensor(targets, device=device)[:, None])
                results.update(zip(keys, scores[:, 0].tolist()))
        return [results[query] for query in queries]

    def _pack(self, inputs: list[tuple[int, ...]]) -> Iterable[list[tuple[int, ...]]]:
        """Length-sorted inputs into batches under the token budget; a shorter input joins a batch (as padding)
        only while that batch is under half the budget, so most batches need no padding and no attention mask."""
        batch: list[tuple[int, ...]] = []
        for ids in inputs:
            if batch:
                width = len(batch[0])
                fits = (len(batch) + 1) * width <= self.token_budget and (
                    self.max_batch_size is None or len(batch) < self.max_batch_size)
                if not fits or (len(ids) != width and 2 * len(batch) * width >= self.token_budget):
                    yield batch
                    batch = []
            batch.append(ids)
        if batch:
            yield batch

    # ---- inputs -------------------------------------------------------------------------------------

    def prepare(self, text: str) -> str:
        return text.lower() if self.uncased else text

    def encode(self, text: str) -> tuple[int, ...]:
        """Token ids with the special tokens, as Nangia et al. tokenize (lower-cased for uncased models)."""
        ids = tuple(self.tokenizer(self.prepare(text))["input_ids"])
        if len(ids) > self.max_length:
            raise DebiasError(f"Sentence of {len(ids)} tokens is longer than the model's {self.max_length}: "
                              f"{text[:80]!r}...")
        return ids

    def _masked(self, ids: tuple[int, ...], position: int) -> Query:
        return ids[:position] + (self.mask_id,) + ids[position + 1:], position, ids[position]

    # ---- scores -------------------------------------------------------------------------------------

    def crows_scores(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, float]]:
        """Per pair (score_a, score_b): sum of log p(shared token | rest) masking one shared token at a time.

        The first and last shared positions (CLS/SEP) are skipped, as in metric.py; round to 3 decimals
        before comparing to reproduce the paper's tie rule.
        """
        plans, queries = [], []
        for sentence_a, sentence_b in pairs:
            ids_a, ids_b = self.encode(sentence_a), self.encode(sentence_b)
            shared_a, shared_b = shared_token_positions(ids_a, ids_b)
            span_a = [self._masked(ids_a, p) for p in shared_a[1:-1]]
            span_b = [self._masked(ids_b, p) for p in shared_b[1:-1]]
            plans.append((len(queries), len(span_a), len(span_b)))
            queries += span_a + span_b
        scores = self.log_probs(queries, "CrowS masked tokens")
        return [(math.fsum(scores[start:start + n_a]), math.fsum(scores[start + n_a:start + n_a + n_b]))
                for start, n_a, n_b in plans]

    def aul_scores(self, sentences: Sequence[str]) -> list[float]:
        """AUL: mean log p(token | whole unmasked sentence) over the sentence's non-special tokens."""
        plans, queries = [], []
        for sentence in sentences:
            encoding = self.tokenizer(self.prepare(sentence), return_special_tokens_mask=True)
            ids = tuple(encoding["input_ids"])
            if len(ids) > self.max_length:
                raise DebiasError(f"Sentence of {len(ids)} tokens is longer than the model's {self.max_length}.")
            positions = [p for p, special in enumerate(encoding["special_tokens_mask"]) if not special]
            plans.append((len(queries), len(positions)))
            queries += [(ids, p, ids[p]) for p in positions]
        scores = self.log_probs(queries, "AUL tokens")
        return [math.fsum(scores[start:start + n]) / n if n else float("nan") for start, n in plans]

    def stereoset_queries(self, context: str, sentence: str) -> list[Query]:
        """bias-bench's inputs: input i is the context with t1..t(i-1) and a mask at BLANK, predicting ti."""
        word = self.prepare(stereoset_attribute_word(context, sentence))
        pieces = [self.prepare(piece) for piece in context.split(BLANK)]
        subtokens = self.tokenizer.encode(word, add_special_tokens=False)
        if not subtokens:
            raise DebiasError(f"StereoSet attribute word {word!r} (context {context!r}) tokenizes to nothing.")
        queries = []
        for i, target in enumerate(subtokens):
            filled = self.tokenizer.decode(subtokens[:i]) + self.tokenizer.mask_token
            # several BLANKs (2 contexts in dev): the last one is scored, earlier ones get the word itself
            text = word.join(pieces[:-1]) + filled + pieces[-1] if len(pieces) > 2 else filled.join(pieces)
            ids = tuple(self.tokenizer(text)["input_ids"])
            mask_positions = [p for p, token in enumerate(ids) if token == self.mask_id]
            if len(mask_positions) != 1:
                raise DebiasError(f"StereoSet input {text!r} has {len(mask_positions)} mask tokens; expected one.")
            queries.append((ids, mask_positions[0], target))
        return queries

    def stereoset_scores(self, items: Sequence[tuple[str, str]]) -> list[float]:
        """Per (context, sentence): mean probability of the attribute subtokens (bias-bench intrasentence)."""
        plans, queries = [], []
        for context, sentence in items:
            item_queries = self.stereoset_queries(context, sentence)
            plans.append((len(queries), len(item_queries)))
            queries += item_queries
        scores = self.log_probs(queries, "StereoSet masked subtokens")
        return [math.fsum(math.exp(s) for s in scores[start:start + n]) / n for start, n in plans]

    def pseudo_log_likelihoods(self, texts: Sequence[str]) -> list[float]:
        """PLL: sum over tokens of log p(token | all other tokens), each masked in turn; long texts in windows."""
        return [total for total, _ in self._pll(texts)]

    def pseudo_perplexity(self, texts: Sequence[str]) -> float:
        """PPPL over a corpus: exp(-(sum of PLLs) / (tokens scored)), as Salazar et al. define it."""
        results = self._pll(texts)
        return math.exp(-math.fsum(total for total, _ in results) / max(1, sum(n for _, n in results)))

    def _pll(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(PLL, number of tokens scored) per text."""
        plans, queries = [], []
        for text in texts:
            encoding = self.tokenizer(self.prepare(text), return_special_tokens_mask=True, verbose=False)
            ids, special = encoding["input_ids"], encoding["special_tokens_mask"]
            content = [i for i, s in zip(ids, special) if not s]
            lead = next((p for p, s in enumerate(special) if not s), len(ids))
            leading = tuple(ids[:lead])
            trailing = tuple(ids[lead + len(content):]) if content else tuple(ids[lead:])
            room = self.max_length - len(leading) - len(trailing)
            if room < 1:
                raise DebiasError(f"Model max length {self.max_length} leaves no room for text between special tokens.")
            start_count = len(queries)
            for w_start, w_end, s_start, s_end in pll_windows(len(content), room):
                window = leading + tuple(content[w_start:w_end]) + trailing
                queries += [self._masked(window, len(leading) + t - w_start) for t in range(s_start, s_end)]
            plans.append((start_count, len(queries) - start_count))
        scores = self.log_probs(queries, "PLL tokens")
        return [(math.fsum(scores[start:start + n]), n) for start, n in plans]
