"""The batched masked-LM engine: every masked score is a set of queries "log p(target | input_ids) at one position".

Identical inputs are computed once, sorted by length and packed under a padded-token budget (the memory cap), and
the vocabulary projection runs only at the queried positions: a few large forward passes instead of one per masked
copy. Benchmarks build their queries in scoring/crows.py and scoring/stereoset.py; pseudo-log-likelihood (Salazar
et al. 2020) is the engine's own score. No lm-eval imports here.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

from debias_plugin.errors import DebiasError
from debias_plugin.models import logits_at, pad_id

Query = tuple[tuple[int, ...], int, int]  # (input ids, position, target id)


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


def is_uncased(tokenizer) -> bool:
    """An uncased model's tokenizer lower-cases (flag or behaviour); such models are fed lower-cased text."""
    if (getattr(tokenizer, "init_kwargs", None) or {}).get("do_lower_case"):
        return True
    probe = "Hello World Zebra"
    return tokenizer.tokenize(probe) == tokenizer.tokenize(probe.lower())


def model_max_length(model, tokenizer) -> int:
    """Longest input the model's position embeddings and tokenizer allow (RoBERTa reserves padding_idx + 1)."""
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    limits = [tokenizer_limit] if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000 else []
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
        self.pad_id = pad_id(tokenizer)
        self.uncased = is_uncased(tokenizer)
        self.max_length = max_length or model_max_length(model, tokenizer)
        self.token_budget = token_budget  # a single longer input still gets its own batch
        self.max_batch_size = max_batch_size
        self.progress = progress

    # ---- engine -------------------------------------------------------------------------------------

    def log_probs(self, queries: Sequence[Query], description: str = "masked LM") -> list[float]:
        """log p(target) at each query's position; identical (input, position, target) computed once."""
        import torch
        from torch.nn.utils.rnn import pad_sequence
        from tqdm.auto import tqdm

        wanted: dict[tuple[int, ...], dict[tuple[int, int], None]] = {}
        for ids, position, target in queries:
            wanted.setdefault(ids, {})[(position, target)] = None
        inputs = sorted(wanted, key=lambda ids: (-len(ids), ids))
        results: dict[Query, float] = {}
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for batch in tqdm(list(self._pack(inputs)), desc=description, unit="batch", disable=not self.progress):
                width = len(batch[0])
                input_ids = pad_sequence([torch.tensor(ids) for ids in batch], batch_first=True,
                                         padding_value=self.pad_id)
                attention = (pad_sequence([torch.ones(len(ids), dtype=torch.long) for ids in batch], batch_first=True)
                             if any(len(ids) != width for ids in batch) else None)  # unpadded: the faster path
                keys = [(ids, position, target) for ids in batch for position, target in wanted[ids]]
                flat = torch.tensor([row * width + position for row, ids in enumerate(batch)
                                     for position, _ in wanted[ids]], device=device)
                logits = logits_at(self.model, input_ids.to(device),
                                   None if attention is None else attention.to(device), flat)
                targets = torch.tensor([target for _, _, target in keys], device=device)
                scores = logits.float().log_softmax(-1).gather(1, targets[:, None])
                results.update(zip(keys, scores[:, 0].tolist()))
        return [results[query] for query in queries]

    def grouped_log_probs(self, groups: Sequence[Sequence[Query]], description: str) -> list[list[float]]:
        """log_probs of every group of queries (one item's queries each), in one batched pass over all groups."""
        scores = iter(self.log_probs([query for group in groups for query in group], description))
        return [list(itertools.islice(scores, len(group))) for group in groups]

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

    def encode(self, text: str, **options) -> dict:
        """The tokenizer's encoding with special tokens (lower-cased for uncased models), refused when too long."""
        encoding = self.tokenizer(self.prepare(text), **options)
        if len(encoding["input_ids"]) > self.max_length:
            raise DebiasError(f"Sentence of {len(encoding['input_ids'])} tokens is longer than the model's "
                              f"{self.max_length}: {text[:80]!r}...")
        return encoding

    def masked(self, ids: tuple[int, ...], position: int) -> Query:
        """The query that masks `position` and asks for its original token."""
        return ids[:position] + (self.mask_id,) + ids[position + 1:], position, ids[position]

    # ---- pseudo-log-likelihood (Salazar et al. 2020) ------------------------------------------------

    def pseudo_log_likelihoods(self, texts: Sequence[str]) -> list[float]:
        """PLL: sum over tokens of log p(token | all other tokens), each masked in turn; long texts in windows."""
        return [math.fsum(scores) for scores in self._pll(texts)]

    def pseudo_perplexity(self, texts: Sequence[str]) -> float:
        """PPPL over a corpus: exp(-(sum of PLLs) / (tokens scored)), as Salazar et al. define it."""
        results = self._pll(texts)
        return math.exp(-math.fsum(math.fsum(scores) for scores in results) / max(1, sum(map(len, results))))

    def _pll(self, texts: Sequence[str]) -> list[list[float]]:
        """The log-probability of every scored token, per text."""
        groups = []
        for text in texts:
            encoding = self.tokenizer(self.prepare(text), return_special_tokens_mask=True, verbose=False)
            ids, special = encoding["input_ids"], encoding["special_tokens_mask"]
            content = [i for i, s in zip(ids, special) if not s]
            lead = next((p for p, s in enumerate(special) if not s), len(ids))
            leading = tuple(ids[:lead])
            trailing = tuple(ids[lead + len(content):])
            room = self.max_length - len(leading) - len(trailing)
            if room < 1:
                raise DebiasError(f"Model max length {self.max_length} leaves no room for text between special tokens.")
            queries = []
            for w_start, w_end, s_start, s_end in pll_windows(len(content), room):
                window = leading + tuple(content[w_start:w_end]) + trailing
                queries += [self.masked(window, len(leading) + t - w_start) for t in range(s_start, s_end)]
            groups.append(queries)
        return self.grouped_log_probs(groups, "PLL tokens")
