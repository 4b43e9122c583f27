"""Partitioned contrastive gradient unlearning (Yu et al. 2023; Dige et al. 2024 for decoders), vectorized.

For each (advantaged, disadvantaged) pair we take the gradient of a per-sequence objective on both sides,
split every weight into partitions (vectors), and update only the k partitions whose two gradients
point most apart (lowest cosine similarity). Everything is whole-tensor arithmetic on the parameters'
device: one cosine-similarity call per tensor, one sort over all partitions, one masked update per tensor.

Partitions ("aggregation"). The official code splits a weight of shape [..., A, B] along its last axis
for "input aggregation" (each partition = one row = the weights that feed one output unit of an
nn.Linear [out, in]) and along axis -2 for "output aggregation" (one column = the weights leaving one
input unit). We keep that meaning per unit, not per storage order: transformers' Conv1D (GPT-2) stores
its weight as [in, out], so there input aggregation takes columns and output aggregation rows.
nn.Embedding rows (one token's vector, the tied LM head's output unit) are input-aggregation partitions,
as in the official code. Parameters with one dimension (biases, norms) are a single partition.

Objective per sequence: masked LMs — the raw logit of the original token at each masked target position
(the paper's choice; `objective="logprob"` uses its log-probability), summed over the target span;
causal LMs — the log-probability of the target span given everything before it. The target span is what
remains of each sentence after removing the longest common token prefix and suffix of the pair.

Selection: cos(g_adv_p, g_dis_p) per partition p (gradients summed over the similarity batch and, under
DDP, all-reduced first, so N processes select exactly what one process selects on the whole batch);
the k lowest are updated; ties go to the lower partition index (stable sort), so the choice is
deterministic. `rank_by="flexibility"` (the paper's open question 1) ranks by cos_p * f_p with
f_p = ||u_p|| / (||theta_p|| + 1e-3 * sqrt(n_p)), n_p the partition's size: the size of the step u
relative to the weights it changes (the floor, an RMS of 1e-3 per weight, keeps all-zero weights from
dominating), so among disagreeing partitions those a step would change most, relatively, rank first.

Update (plain SGD, as the official code: its momentum option never reaches the optimizer): theta_p -=
lr * u_p on the selected partitions, with u = g_adv ("advantaged": lower the advantaged sequence,
default), u = -g_dis ("disadvantaged": raise the disadvantaged one), or u = g_adv - g_dis ("both").
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from debias_plugin.errors import DebiasError
from debias_plugin.methods.base import TrainingMethod
from debias_plugin.models import causal_start_token, logits_at, pad_id
from debias_plugin.options import Options

AGGREGATIONS = ("input", "output")
_UNUSED_SCORE = math.inf  # a parameter without gradient is never selected (the official code used 5)
_FLEXIBILITY_FLOOR = 1e-3  # per-weight RMS floor: all-zero weights (fresh biases) must not rank infinitely high


# -- partitions ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorPartitions:
    """How one parameter splits into partitions: 'whole', 'rows' (last axis) or 'columns' (axis -2)."""

    name: str
    param: torch.nn.Parameter
    mode: str
    count: int

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """[count, size] view: one partition per row (no copy for rows and 2-D columns)."""
        if self.mode == "whole":
            return tensor.reshape(1, -1)
        if self.mode == "rows":
            return tensor.reshape(-1, tensor.shape[-1])
        return tensor.movedim(-2, -1).reshape(-1, tensor.shape[-2])

    def expand(self, mask: torch.Tensor) -> torch.Tensor:
        """A per-partition mask shaped to broadcast against the parameter."""
        shape = self.param.shape
        if self.mode == "whole":
            return mask.reshape((1,) * len(shape))
        if self.mode == "rows":
            return mask.reshape(*shape[:-1], 1)
        return mask.reshape(*shape[:-2], shape[-1]).unsqueeze(-2)


def _transposed_weights(model) -> set[str]:
    """Names of weights stored as [in, out] (transformers' Conv1D), whose units are columns."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return set()
    return {f"{name}.weight" if name else "weight" for name, module in model.named_modules()
            if isinstance(module, Conv1D)}


def partition_layout(model, aggregation: str = "input") -> list[TensorPartitions]:
    """Partitions of every trainable parameter, in named_parameters order (the global partition index)."""
    if aggregation not in AGGREGATIONS:
        raise DebiasError(f"aggregation must be one of {AGGREGATIONS}, not '{aggregation}'.")
    transposed = _transposed_weights(model)
    layout = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = tuple(param.shape)
        if len(shape) == 0:
            raise DebiasError(f"Parameter {name} is a scalar; PCGU needs vectors to compare gradients.")
        if len(shape) == 1:
            layout.append(TensorPartitions(name, param, "whole", 1))
            continue
        rows = (aggregation == "input") != (name in transposed)
        count = math.prod(shape[:-1]) if rows else math.prod(shape[:-2]) * shape[-1]
        layout.append(TensorPartitions(name, param, "rows" if rows else "columns", count))
    return layout


def resolve_k(k: float, total: int | float) -> int:
    """k as a count (an integer >= 1, at most the partitions there are) or a fraction of all partitions (0 < k < 1)."""
    if 0 < k < 1:
        return max(1, round(k * total))
    if not (k >= 1 and float(k).is_integer()):
        raise DebiasError(f"k must be a partition count (integer >= 1) or a fraction in (0, 1), not {k}.")
    if k > total:
        raise DebiasError(f"k = {int(k)} partitions, but the model has only {total}; pass a smaller count or a "
                          "fraction (e.g. 0.05).")
    return int(k)


# -- similarity, selection, update ---------------------------------------------------------------------
def update_direction(grad_adv, grad_dis, direction: str):
    """The gradient SGD descends along: lower advantaged, raise disadvantaged, or both."""
    if grad_adv is None or grad_dis is None:
        return None
    if direction == "advantaged":
        return grad_adv
    if direction == "disadvantaged":
        return -grad_dis
    return grad_adv - grad_dis


def cosine_rows(first: torch.Tensor, second: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise cosine similarity as F.cosine_similarity defines it (norms clamped at eps), without its
    normalised copies of both inputs: one fused dot product and two norms."""
    dots = torch.einsum("ij,ij->i", first, second)
    first_norms = torch.linalg.vector_norm(first, dim=-1).clamp_min(eps)
    return dots / (first_norms * torch.linalg.vector_norm(second, dim=-1).clamp_min(eps))


def partition_scores(layout, grads_adv, grads_dis, rank_by: str = "similarity",
                     direction: str = "advantaged") -> torch.Tensor:
    """One score per partition (lower = more contrastive), concatenated over all tensors."""
    scores = []
    for part, grad_adv, grad_dis in zip(layout, grads_adv, grads_dis):
        if grad_adv is None or grad_dis is None:
            scores.append(torch.full((part.count,), _UNUSED_SCORE, device=part.param.device))
            continue
        score = cosine_rows(part.view(grad_adv), part.view(grad_dis))
        if rank_by == "flexibility":
            step = torch.linalg.vector_norm(part.view(update_direction(grad_adv, grad_dis, direction)), dim=-1)
            weights = part.view(part.param.detach())
            floor = _FLEXIBILITY_FLOOR * math.sqrt(weights.shape[-1])
            score = score * (step / (torch.linalg.vector_norm(weights, dim=-1) + floor))
        scores.append(score.float())
    return torch.cat(scores)


def select_partitions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Global indices of the k lowest scores; ties go to the lower index."""
    return torch.sort(scores, stable=True).indices[:k]


@torch.no_grad()
def apply_masked_update(layout, updates, selected: torch.Tensor, lr: float) -> None:
    """theta -= lr * u on the selected partitions only, one masked multiply-add per tensor."""
    total = sum(part.count for part in layout)
    chosen = torch.zeros(total, dtype=torch.bool, device=selected.device)
    chosen[selected] = True
    for part, update, mask in zip(layout, updates, chosen.split([p.count for p in layout])):
        if update is None:
            continue
        part.param.addcmul_(update, part.expand(mask.to(part.param.device)).to(update.dtype), value=-lr)


# -- objectives and gradients --------------------------------------------------------------------------
def sequence_objectives(model, batch: dict, side: str, kind: str, objective: str) -> torch.Tensor:
    """Per-sequence objective [B]: target logits / log-probs (masked) or target-span log-prob (causal)."""
    input_ids, target = batch[f"{side}_input_ids"], batch[f"{side}_target_mask"]
    if kind == "causal":  # position t-1 predicts target token t
        positions = torch.zeros_like(target)
        positions[:, :-1] = target[:, 1:]
        tokens = input_ids[:, 1:][target[:, 1:]]
    else:
        positions, tokens = target, batch[f"{side}_target_ids"][target]
    picked = logits_at(model, input_ids, batch[f"{side}_attention_mask"], positions.flatten().nonzero()[:, 0])
    if kind == "causal" or objective == "logprob":
        picked = torch.log_softmax(picked.float(), dim=-1)
    values = picked.gather(1, tokens.unsqueeze(1)).squeeze(1)
    rows = positions.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)


def _sum_into(total, grads):
    if total is None:
        return [None if g is None else g.detach() for g in grads]
    for i, g in enumerate(grads):
        if g is not None:
            total[i] = g.detach() if total[i] is None else total[i].add_(g)
    return total


@dataclass
class PairGradients:
    """Summed gradients of both sides over a similarity batch, plus the summed objectives (for logs)."""

    advantaged: list
    disadvantaged: list
    objective_gap: float
    sequences: int


def pair_gradients(model, layout, micro_batches, kind: str, objective: str) -> PairGradients:
    """Sum gradients of the advantaged and disadvantaged objectives over micro-batches, then all-reduce."""
    params = [part.param for part in layout]
    grads_adv = grads_dis = None
    gap = torch.zeros((), dtype=torch.float64)
    sequences = 0
    for batch in micro_batches:
        adv = sequence_objectives(model, batch, "adv", kind, objective)
        grads_adv = _sum_into(grads_adv, torch.autograd.grad(adv.sum(), params, allow_unused=True))
        dis = sequence_objectives(model, batch, "dis", kind, objective)
        grads_dis = _sum_into(grads_dis, torch.autograd.grad(dis.sum(), params, allow_unused=True))
        gap += (adv.detach() - dis.detach()).sum().double().cpu()
        sequences += adv.shape[0]
    grads_adv, grads_dis, gap, sequences = _all_reduce(layout, grads_adv, grads_dis, gap, sequences)
    return PairGradients(grads_adv, grads_dis, gap, sequences)


def _all_reduce(layout, grads_adv, grads_dis, gap, sequences):
    """Sum over processes (DDP): selection then equals one process on the concatenated batch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return grads_adv, grads_dis, float(gap), sequences
    device = layout[0].param.device
    used = torch.tensor([g is not None for g in grads_adv], dtype=torch.int32, device=device)
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    reduced = []
    for grads in (grads_adv, grads_dis):
        grads = [torch.zeros_like(part.param) if g is None and used[i] else g
                 for i, (part, g) in enumerate(zip(layout, grads))]
        for g in grads:
            if g is not None:
                dist.all_reduce(g)
        reduced.append(grads)
    totals = torch.tensor([float(gap), float(sequences)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return reduced[0], reduced[1], float(totals[0]), int(totals[1])


@dataclass
class StepResult:
    selected: torch.Tensor  # global partition indices, ascending by score
    scores: torch.Tensor
    objective_gap: float  # mean over pairs of objective(advantaged) - objective(disadvantaged), before the step


def pcgu_step(model, layout, micro_batches, *, kind: str, k: int, lr: float, objective: str = "logit",
              direction: str = "advantaged", rank_by: str = "similarity") -> StepResult:
    """One PCGU update: summed pair gradients -> per-partition scores -> k lowest -> masked SGD step."""
    grads = pair_gradients(model, layout, micro_batches, kind, objective)
    scores = partition_scores(layout, grads.advantaged, grads.disadvantaged, rank_by, direction)
    selected = select_partitions(scores, k)
    updates = [update_direction(a, d, direction) for a, d in zip(grads.advantaged, grads.disadvantaged)]
    apply_masked_update(layout, updates, selected, lr)
    return StepResult(selected, scores, grads.objective_gap / max(grads.sequences, 1))


# -- pairs -> token ids --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedSide:
    input_ids: list[int]
    target_positions: list[int]
    target_ids: list[int]


@dataclass(frozen=True)
class EncodedPair:
    advantaged: EncodedSide
    disadvantaged: EncodedSide


def target_spans(first: list[int], second: list[int]) -> tuple[range, range]:
    """Positions that differ: each sequence minus the pair's longest common prefix and suffix."""
    prefix = 0
    while prefix < min(len(first), len(second)) and first[prefix] == second[prefix]:
        prefix += 1
    suffix = 0
    while (suffix < min(len(first), len(second)) - prefix
           and first[len(first) - 1 - suffix] == second[len(second) - 1 - suffix]):
        suffix += 1
    return range(prefix, len(first) - suffix), range(prefix, len(second) - suffix)


def encode_pair(pair, tokenizer, kind: str, max_length: int = 128) -> EncodedPair | None:
    """Token ids with the target span marked (masked in masked LMs); None if a side has no target."""
    if kind == "causal":
        start = causal_start_token(tokenizer)
        prefix = [] if start is None else [start]
        encode = lambda text: prefix + tokenizer(text, add_special_tokens=False, truncation=True,  # noqa: E731
                                                 max_length=max_length - len(prefix))["input_ids"]
    else:
        if tokenizer.mask_token_id is None:
            raise DebiasError("This masked LM's tokenizer has no mask token; PCGU masks the target tokens.")
        encode = lambda text: tokenizer(text, truncation=True, max_length=max_length)["input_ids"]  # noqa: E731
    adv_ids, dis_ids = encode(pair.advantaged), encode(pair.disadvantaged)
    adv_span, dis_span = target_spans(adv_ids, dis_ids)
    if not adv_span or not dis_span or (kind == "causal" and (adv_span.start == 0 or dis_span.start == 0)):
        return None
    sides = []
    for ids, span in ((adv_ids, adv_span), (dis_ids, dis_span)):
        targets = [ids[i] for i in span]
        if kind == "masked":
            ids = [tokenizer.mask_token_id if i in span else token for i, token in enumerate(ids)]
        sides.append(EncodedSide(list(ids), list(span), targets))
    return EncodedPair(*sides)


def collate_pairs(pairs: list[EncodedPair], pad_value: int) -> dict:
    """Right-padded tensors for both sides: ids, attention mask, target mask, original target ids."""
    batch = {}
    for side, name in (("advantaged", "adv"), ("disadvantaged", "dis")):
        encoded = [getattr(pair, side) for pair in pairs]
        length = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), length), pad_value, dtype=torch.long)
        attention = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        target_ids = torch.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
            attention[row, :len(e.input_ids)] = 1
            target[row, e.target_positions] = True
            target_ids[row, e.target_positions] = torch.tensor(e.target_ids)
        batch.update({f"{name}_input_ids": ids, f"{name}_attention_mask": attention,
                      f"{name}_target_mask": target, f"{name}_target_ids": target_ids})
    return batch


# -- the training-core method ----------------------------------------------------------------------------
class PCGUOptions(Options):
    """PCGU's own options (the shared ones — steps, lr, batch, seed — live in training.TrainConfig)."""

    pairs: str = Field("winogender", description="winogender | crows | stereoset | bbq (from $DEBIAS_DATA_DIR), "
                                                 "a WinoGender folder, a pair CSV/TSV (advantaged,disadvantaged or "
                                                 "sent_more,sent_less) or a StereoSet .json/.jsonl.")
    groups: list[str] = Field([], description="Keep pairs of this group (CrowS bias type, StereoSet domain, "
                                              "WinoGender occupation); repeatable.", json_schema_extra={"flag": "--group"})
    k: float = Field(10000, description="Partitions updated per step: a count, or a fraction of all partitions "
                                        "(e.g. 0.05). Official default: 10,000 (of ~115k in bert-base).")
    aggregation: Literal["input", "output"] = Field(
        "input", description="input: one partition per output unit (rows of nn.Linear [out, in]); output: per "
                             "input unit.")
    direction: Literal["advantaged", "disadvantaged", "both"] = Field(
        "advantaged", description="Lower the advantaged sequence, raise the disadvantaged one, or both.")
    objective: Literal["auto", "logit", "logprob"] = Field(
        "auto", description="auto: target logit for masked LMs (the paper), target-span log-prob for causal LMs.")
    rank_by: Literal["similarity", "flexibility"] = Field(
        "similarity", description="flexibility: cosine x (|step| / |weights|) per partition.")
    similarity_batches: int = Field(1, ge=1, description="Batches whose gradients are summed before one "
                                                         "selection and update.")

    @field_validator("k")
    @classmethod
    def _count_or_fraction(cls, k: float) -> float:
        try:
            resolve_k(k, sys.maxsize)  # the form only; the partition count is known once the model loads
        except DebiasError as err:
            raise ValueError(str(err)) from None
        return k


class PCGUMethod(TrainingMethod):
    """Update only the weight partitions whose gradients for the advantaged and disadvantaged
    sentence of each pair disagree most (PCGU, Yu et al. 2023), for masked and causal LMs.

    --batch-size is pairs per forward pass (default 16, the paper's); --lr is the plain SGD rate.
    """

    name = "pcgu"
    Options = PCGUOptions
    owns_update = True  # masked plain SGD in fp32: no optimizer, scheduler, accumulation or clipping
    uses_optimizer = False
    unused_training_options = ("grad_accum", "weight_decay", "scheduler", "warmup_steps", "max_grad_norm",
                               "precision")
    training_defaults = {"batch_size": 16}
    training_help = {"batch_size": "Pairs per forward pass (processes share it); the paper's default is 16.",
                     "lr": "Plain SGD learning rate (the paper's 1e-5)."}

    def __init__(self, options: PCGUOptions, pairs=None):
        super().__init__(options)
        self.pairs = pairs
        self.encoded: list[EncodedPair] = []
        self.files: list[str] = []
        self.skipped = 0
        self.overlap: dict = {}
        self.selection_counts: dict[str, int] = {}
        self.steps_done = 0

    def read_inputs(self) -> None:
        from debias_plugin.data.pairs import load_pairs

        if self.pairs is None:
            self.pairs = load_pairs(self.opts.pairs, self.opts.groups or None)
        self.files = sorted({pair.origin.rsplit(", ", 1)[0] for pair in self.pairs})
        stats = [Path(f).with_name("occupations-stats.tsv") for f in self.files if f.endswith("all_sentences.tsv")]
        self.files += [str(f) for f in stats if f.is_file()]

    def examples_per_step(self, batch_size: int) -> int:
        return batch_size * self.opts.similarity_batches

    def setup(self, run) -> list:
        from debias_plugin.data.pairs import warn_on_evaluation_overlap

        pairs = self.pairs
        if run.is_main:
            self.overlap = warn_on_evaluation_overlap(pairs)
        self.kind = run.kind
        self.objective = self.opts.objective
        if self.objective == "auto":
            self.objective = "logit" if run.kind == "masked" else "logprob"
        if run.kind == "causal" and self.objective == "logit":
            raise DebiasError("objective 'logit' is for masked LMs; a causal LM's objective is the target "
                              "span's log-probability (objective 'logprob' or 'auto').")
        encoded = [encode_pair(p, run.tokenizer, run.kind, run.config.max_length) for p in pairs]
        self.encoded = [e for e in encoded if e is not None]
        self.skipped = len(encoded) - len(self.encoded)
        self.pad_id = pad_id(run.tokenizer)
        self.layout = partition_layout(run.model, self.opts.aggregation)
        self.total = sum(part.count for part in self.layout)
        self.owners = torch.repeat_interleave(torch.arange(len(self.layout)),  # partition -> its tensor
                                              torch.tensor([p.count for p in self.layout]))
        self.k = resolve_k(self.opts.k, self.total)
        return self.encoded

    def collate(self, examples: list, positions: list[int]) -> dict:
        return collate_pairs(examples, self.pad_id)

    def _micro_batches(self, batch: dict) -> list[dict]:
        size = batch["adv_input_ids"].shape[0]
        chunk = max(1, math.ceil(size / self.opts.similarity_batches))
        return [{key: value[start:start + chunk] for key, value in batch.items()} for start in range(0, size, chunk)]

    def update(self, run, batch: dict) -> float:
        """Pair gradients over this process's share, all-reduced, then one selection and masked step."""
        model = run.unwrapped
        result = pcgu_step(model, self.layout, self._micro_batches(batch), kind=self.kind, k=self.k,
                           lr=run.config.lr, objective=self.objective, direction=self.opts.direction,
                           rank_by=self.opts.rank_by)
        for index, count in zip(*torch.unique(self.owners[result.selected.cpu()], return_counts=True)):
            name = self.layout[int(index)].name
            self.selection_counts[name] = self.selection_counts.get(name, 0) + int(count)
        self.steps_done += 1
        return result.objective_gap

    def evaluate(self, run) -> dict:
        """On the training pairs: % where the advantaged side scores higher, and the mean objective gap."""
        model, wins, gap = run.unwrapped, 0, 0.0
        size = run.config.batch_size
        for start in range(0, len(self.encoded), size):
            batch = collate_pairs(self.encoded[start:start + size], self.pad_id)
            batch = {key: value.to(run.device) for key, value in batch.items()}
            adv = sequence_objectives(model, batch, "adv", self.kind, self.objective)
            dis = sequence_objectives(model, batch, "dis", self.kind, self.objective)
            wins += int((adv > dis).sum())
            gap += float((adv - dis).sum())
        return {"pairs_preferring_advantaged_pct": 100.0 * wins / len(self.encoded),
                "mean_objective_gap": gap / len(self.encoded)}

    def report(self) -> dict:
        top = sorted(self.selection_counts.items(), key=lambda item: -item[1])[:15]
        return {"pairs_used": len(self.encoded), "pairs_skipped_no_target": self.skipped,
                "partitions_total": self.total, "k": self.k, "objective": self.objective,
                "evaluation_overlap": self.overlap, "steps": self.steps_done,
                "selections_by_tensor_top15": dict(top)}

    def state_dict(self) -> dict:
        return {"selection_counts": self.selection_counts, "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.selection_counts = dict(state["selection_counts"])
        self.steps_done = int(state["steps_done"])

    def inputs(self) -> dict:
        if self.files:
            return {f"pairs[{i}]": f for i, f in enumerate(self.files)}
        return {"pairs": self.opts.pairs} if Path(self.opts.pairs).exists() else {}
