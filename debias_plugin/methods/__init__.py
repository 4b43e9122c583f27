"""Debiasing stages that train, their registry, and the text handling they share.

A stage is one module with a `TrainingMethod` subclass (methods/base.py) and one line in `REGISTRY`; its CLI
command is generated from the registry and its pydantic options. Third-party packages add stages through the
`debias_plugin.methods` entry-point group (name = "module:Class").
"""

from __future__ import annotations

import math

from debias_plugin.errors import DebiasError
from debias_plugin.models import causal_start_token, pad_id

ENTRY_POINT_GROUP = "debias_plugin.methods"
# name -> ("module:Class", one line for `debias --help`); modules are imported only when their stage runs.
REGISTRY: dict[str, tuple[str, str]] = {
    "finetune": ("debias_plugin.methods.finetune:Finetune",
                 "Fine-tune a model on a biased corpus (full or LoRA): a bias vector's source."),
    "npo": ("debias_plugin.methods.npo:NPO", "Unlearn chosen tokens with negative preference optimisation (NPO)."),
    "pcgu": ("debias_plugin.methods.pcgu:PCGUMethod", "Partitioned contrastive gradient unlearning (PCGU)."),
    "unlearn": ("debias_plugin.methods.unlearn:Unlearn",
                "Unlearn chosen tokens by gradient ascent (Lu et al., masked-token unlearning)."),
}


def available_methods() -> dict[str, tuple[str, str]]:
    """Built-in stages plus those other installed packages register under the entry-point group."""
    from importlib.metadata import entry_points

    found = dict(REGISTRY)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(point.name, (point.value, f"Training stage from {point.value.split(':')[0]}."))
    return found


def method_class(name: str):
    """The TrainingMethod subclass registered as `name`."""
    import importlib

    from debias_plugin.methods.base import TrainingMethod

    methods = available_methods()
    if name not in methods:
        raise DebiasError(f"Unknown training stage '{name}'; expected one of {', '.join(sorted(methods))}.")
    module_name, attribute = methods[name][0].split(":")
    cls = getattr(importlib.import_module(module_name), attribute)
    if not (isinstance(cls, type) and issubclass(cls, TrainingMethod)):
        raise DebiasError(f"{methods[name][0]} (stage '{name}') is not a TrainingMethod subclass.")
    return cls


def encode(tokenizer, text: str, kind: str, max_length: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets; causal texts start with BOS (EOS if none) so token 1 is predicted."""
    encoded = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length,
                        return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]
    if kind == "causal":
        start = causal_start_token(tokenizer)
        if start is None:
            raise DebiasError("The tokenizer has neither a BOS nor an EOS token to condition the first token on.")
        if not ids or ids[0] != start:
            ids, offsets = [start] + ids[: max_length - 1], [(0, 0)] + offsets[: max_length - 1]
    return ids, offsets


def special_positions(tokenizer, ids: list[int]) -> list[bool]:
    special = set(tokenizer.all_special_ids)
    return [token in special for token in ids]


def pad(sequences: list[list[int]], value: int):
    """Right-pad a list of int lists into one LongTensor."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    return pad_sequence([torch.tensor(s, dtype=torch.long) for s in sequences], batch_first=True, padding_value=value)


def per_example_mean(values, mask):
    """Mean of `values` over each row's masked positions: every example weighs the same in a batch."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def token_logprobs(model, kind: str, input_ids, attention_mask):
    """log p(token_t | context) for every position; causal rows are aligned so column t scores token t."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    if kind == "causal":
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        return torch.nn.functional.pad(logprobs, (1, 0))  # position 0 (BOS) has no prediction
    return torch.log_softmax(logits, dim=-1)


def label_logprobs(model, kind: str, batch: dict, prefix: str = ""):
    """log p(label_t) per position: causal rows as token_logprobs, masked rows gathered at the original tokens."""
    logprobs = token_logprobs(model, kind, batch[prefix + "input_ids"], batch[prefix + "attention_mask"])
    if kind == "masked":
        logprobs = logprobs.gather(-1, batch[prefix + "labels"][..., None])[..., 0]
    return logprobs


def mlm_mask(ids: list[int], specials: list[bool], tokenizer, generator, probability: float = 0.15):
    """BERT masking (80% mask / 10% random / 10% kept) of non-special tokens; at least one position."""
    import torch

    candidates = [i for i, is_special in enumerate(specials) if not is_special]
    if not candidates:
        return list(ids), []
    draws = torch.rand(len(candidates), generator=generator).tolist()
    chosen = [i for i, draw in zip(candidates, draws) if draw < probability]
    if not chosen:
        chosen = [candidates[int(torch.randint(len(candidates), (1,), generator=generator))]]
    masked = list(ids)
    for i in chosen:
        action = float(torch.rand(1, generator=generator))
        if action < 0.8:
            masked[i] = tokenizer.mask_token_id
        elif action < 0.9:
            masked[i] = int(torch.randint(len(tokenizer), (1,), generator=generator))
    return masked, chosen


def example_generator(seed: int, position: int):
    """A generator owned by one stream position: the same randomness however batches are split."""
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + position)


def lm_batch(examples: list[list[int]], positions: list[int], kind: str, tokenizer, seed: int,
             mlm_probability: float = 0.15) -> dict:
    """Plain LM batch: causal scores every token after BOS; masked applies BERT masking seeded per stream position."""
    import torch

    attention = pad([[1] * len(ids) for ids in examples], 0)
    batch = {"attention_mask": attention, "labels": pad(examples, 0)}
    if kind == "causal":
        targets = attention.clone()
        targets[:, 0] = 0
        return {**batch, "input_ids": pad(examples, pad_id(tokenizer)), "targets": targets.bool()}
    masked_rows, target_rows = [], []
    for ids, position in zip(examples, positions):
        masked, chosen = mlm_mask(ids, special_positions(tokenizer, ids), tokenizer, example_generator(seed, position),
                                  mlm_probability)
        chosen = set(chosen)
        masked_rows.append(masked)
        target_rows.append([i in chosen for i in range(len(ids))])
    return {**batch, "input_ids": pad(masked_rows, pad_id(tokenizer)), "targets": pad(target_rows, 0).to(torch.bool)}


def perplexity(model, tokenizer, kind: str, texts: list[str], max_length: int, device, batch_size: int = 16,
               progress: str | None = None) -> float:
    """Causal: exp(mean token NLL) of texts truncated to max_length. Masked: pseudo-perplexity (Salazar et al.).

    progress: a tqdm label (the main process of a run shows how far an evaluation has got), or None."""
    if kind == "causal":
        from tqdm.auto import tqdm

        total, count, pad_value = 0.0, 0, pad_id(tokenizer)
        encoded = [encode(tokenizer, text, kind, max_length)[0] for text in texts]
        starts = range(0, len(encoded), batch_size)
        for start in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
            chunk = encoded[start:start + batch_size]
            ids = pad(chunk, pad_value).to(device)
            mask = pad([[1] * len(s) for s in chunk], 0).to(device)
            logprobs = token_logprobs(model, kind, ids, mask)
            valid = mask.clone()
            valid[:, 0] = 0
            total -= float((logprobs * valid).sum())
            count += int(valid.sum())
        return math.exp(total / max(count, 1))
    from debias_plugin.scoring.masked import MaskedScorer  # texts longer than max_length: scored in windows

    return MaskedScorer(model, tokenizer, token_budget=batch_size * max_length, max_length=max_length,
                        progress=progress is not None).pseudo_perplexity(texts)
