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

Memory (docs/SCALING.md): the advantaged gradient is held (bf16 when the run computes in bf16); the disadvantaged
one is scored tensor by tensor as backward produces it and dropped, so a step needs the weights, one gradient copy
and the activations, never two gradient copies. Forward passes run under the accelerator's autocast.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from debias_plugin.errors import DebiasError
from debias_plugin.methods import pad
from debias_plugin.methods.base import TrainingMethod, compute_dtype
from debias_plugin.models import causal_start_token, logits_at, pad_id
from debias_plugin.options import InputPathOrName, Options

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
    from transformers.pytorch_utils import Conv1D

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


def tensor_scores(part: TensorPartitions, grad_adv, grad_dis, rank_by: str = "similarity",
                  direction: str = "advantaged") -> torch.Tensor:
    """Scores of one tensor's partitions (lower = more contrastive), float32; +inf when a side has no gradient."""
    if grad_adv is None or grad_dis is None:
        return torch.full((part.count,), _UNUSED_SCORE, device=part.param.device)
    grad_adv, grad_dis = grad_adv.float(), grad_dis.float()  # bf16 gradients are compared in float32
    score = cosine_rows(part.view(grad_adv), part.view(grad_dis))
    if rank_by == "flexibility":
        step = torch.linalg.vector_norm(part.view(update_direction(grad_adv, grad_dis, direction)), dim=-1)
        weights = part.view(part.param.detach())
        floor = _FLEXIBILITY_FLOOR * math.sqrt(weights.shape[-1])
        norms = (torch.linalg.vector_norm(weights, dim=-1) if weights.dtype == torch.float32
                 else torch.linalg.vector_norm(weights, dim=-1, dtype=torch.float32))
        score = score * (step / (norms + floor))
    return score.float()


def select_partitions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Global indices of the k lowest scores; ties go to the lower index."""
    return torch.sort(scores, stable=True).indices[:k]


@torch.no_grad()
def apply_masked_update(layout, updates, selected: torch.Tensor, lr: float) -> None:
    """theta -= lr * u on the selected partitions only, one masked multiply-add per tensor."""
    chosen = torch.zeros(sum(part.count for part in layout), dtype=torch.bool, device=selected.device)
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
    picked = picked.float()  # bf16 logits under autocast: objectives and their sums in float32
    if kind == "causal" or objective == "logprob":
        picked = torch.log_softmax(picked, dim=-1)
    values = picked.gather(1, tokens.unsqueeze(1)).squeeze(1)
    rows = positions.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)


@dataclass
class PairStatistics:
    """What one step needs of both sides' gradients: per-partition scores and one update direction per tensor."""

    scores: torch.Tensor
    updates: list  # u per tensor (None: no gradient), in the held dtype
    objective_gap: float  # summed over sequences (all processes)
    sequences: int


class _GradientStream:
    """Post-accumulate-grad hooks that consume each parameter's gradient as backward produces it.

    Advantaged passes add into one held tensor per parameter (the only full-size copy). In the last
    disadvantaged pass each parameter's summed gradient is scored against the held one right away and folded
    into the update direction, then dropped: the disadvantaged side exists only as partition statistics.
    With similarity_batches > 1 the earlier disadvantaged passes are summed into a second held copy first
    (the norms are not additive). Under DDP a finished tensor is all-reduced before scoring, in one fixed
    order on every process (reverse layout order, about the order backward produces them)."""

    def __init__(self, layout, *, held_dtype, rank_by: str, direction: str):
        import torch.distributed as dist

        self.layout, self.held_dtype, self.rank_by, self.direction = layout, held_dtype, rank_by, direction
        count = len(layout)
        self.held: list = [None] * count  # advantaged sums, then update directions
        self.pending: list = [None] * count  # disadvantaged sums of earlier micro-batches
        self.ready: list = [None] * count  # last-pass disadvantaged sums waiting for their turn to reduce (DDP)
        self.scores: list = [None] * count
        self.phase, self.last = "adv", False
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.order = list(reversed(range(count)))
        self.cursor = 0
        self.handles = [part.param.register_post_accumulate_grad_hook(self._hook(i)) for i, part in enumerate(layout)]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _store(self, grad):
        return grad if self.held_dtype is None else grad.to(self.held_dtype)

    def _hook(self, index: int):
        def consume(param):
            grad, param.grad = param.grad, None  # the only reference now: dropping it frees the memory
            if self.phase == "adv":
                self.held[index] = self._store(grad) if self.held[index] is None else self.held[index].add_(grad)
                return
            pending, self.pending[index] = self.pending[index], None
            if not self.last:
                self.pending[index] = self._store(grad) if pending is None else pending.add_(grad)
                return
            total = grad if pending is None else pending.add_(grad)
            if self.world == 1:
                self._finish(index, total)
            else:
                self.ready[index] = total
                self._reduce_in_order(flush=False)
        return consume

    def _finish(self, index: int, grad_dis) -> None:
        """Score one tensor's partitions, then keep only its update direction."""
        part, grad_adv = self.layout[index], self.held[index]
        self.scores[index] = tensor_scores(part, grad_adv, grad_dis, self.rank_by, self.direction)
        if grad_adv is None or grad_dis is None:
            self.held[index] = None
        elif self.direction == "disadvantaged":
            self.held[index] = self._store(grad_dis.neg_())
        elif self.direction == "both":
            self.held[index] = grad_adv.sub_(grad_dis)

    def _reduce_in_order(self, flush: bool) -> None:
        import torch.distributed as dist

        while self.cursor < len(self.order):
            index = self.order[self.cursor]
            total = self.ready[index]
            if total is None:
                if not flush:
                    return
                if not self.used[index]:
                    self._finish(index, None)
                    self.cursor += 1
                    continue
                total = torch.zeros_like(self.layout[index].param, dtype=self.held_dtype)
            self.ready[index] = None
            dist.all_reduce(total)
            self._finish(index, total)
            self.cursor += 1

    def reduce_advantaged(self) -> None:
        """DDP: sum the held advantaged gradients over processes (a tensor unused here but used elsewhere is 0)."""
        import torch.distributed as dist

        if self.world == 1:
            return
        device = self.layout[0].param.device
        used = torch.tensor([g is not None for g in self.held], dtype=torch.int32, device=device)
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
        self.used = used.bool().tolist()
        for i, part in enumerate(self.layout):
            if self.held[i] is None and self.used[i]:
                self.held[i] = torch.zeros_like(part.param, dtype=self.held_dtype)
            if self.held[i] is not None:
                dist.all_reduce(self.held[i])

    def finish(self) -> tuple[torch.Tensor, list]:
        if self.world > 1:
            self._reduce_in_order(flush=True)
        for index, score in enumerate(self.scores):
            if score is None:  # no disadvantaged gradient reached this tensor
                self._finish(index, None)
        return torch.cat(self.scores), self.held


def pair_statistics(model, layout, micro_batches, kind: str, objective: str, *, rank_by: str = "similarity",
                    direction: str = "advantaged", held_dtype=None, autocast=nullcontext) -> PairStatistics:
    """Both sides' gradients, summed over micro-batches (and processes), reduced to what the step needs.

    Memory: the held side (one copy of the trainable weights in held_dtype, default the weights' dtype) plus the
    gradient of the tensor being scored, instead of two full gradient copies. Forward passes run under
    `autocast` (the accelerator's, for bf16)."""
    for part in layout:
        part.param.grad = None
    stream = _GradientStream(layout, held_dtype=held_dtype, rank_by=rank_by, direction=direction)
    gap = torch.zeros((), dtype=torch.float64, device=layout[0].param.device)
    sequences = 0
    try:
        for number, batch in enumerate(micro_batches):
            last = number == len(micro_batches) - 1
            stream.phase = "adv"
            with autocast():
                adv = sequence_objectives(model, batch, "adv", kind, objective)
            adv.sum().backward()
            if last:
                stream.reduce_advantaged()
            stream.phase, stream.last = "dis", last
            with autocast():
                dis = sequence_objectives(model, batch, "dis", kind, objective)
            dis.sum().backward()
            gap += (adv.detach() - dis.detach()).sum().double()
            sequences += adv.shape[0]
        scores, updates = stream.finish()
    finally:
        stream.close()
    if stream.world > 1:  # DDP: the gap and the sequence count over all processes
        totals = torch.stack([gap, torch.tensor(float(sequences), dtype=torch.float64, device=gap.device)])
        torch.distributed.all_reduce(totals)
        gap, sequences = totals[0], int(totals[1])
    return PairStatistics(scores, updates, float(gap), sequences)


@dataclass
class StepResult:
    selected: torch.Tensor  # global partition indices, ascending by score
    scores: torch.Tensor
    objective_gap: float  # mean over pairs of objective(advantaged) - objective(disadvantaged), before the step


def pcgu_step(model, layout, micro_batches, *, kind: str, k: int, lr: float, objective: str = "logit",
              direction: str = "advantaged", rank_by: str = "similarity", held_dtype=None,
              autocast=nullcontext) -> StepResult:
    """One PCGU update: pair gradients -> per-partition scores -> k lowest -> masked SGD step."""
    stats = pair_statistics(model, layout, micro_batches, kind, objective, rank_by=rank_by, direction=direction,
                            held_dtype=held_dtype, autocast=autocast)
    selected = select_partitions(stats.scores, k)
    apply_masked_update(layout, stats.updates, selected, lr)
    return StepResult(selected, stats.scores, stats.objective_gap / max(stats.sequences, 1))


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
    shorter = min(len(first), len(second))
    prefix = next((i for i in range(shorter) if first[i] != second[i]), shorter)
    suffix = next((i for i in range(shorter - prefix) if first[-1 - i] != second[-1 - i]), shorter - prefix)
    return range(prefix, len(first) - suffix), range(prefix, len(second) - suffix)


def encode_pair(pair, tokenizer, kind: str, max_length: int = 128) -> EncodedPair | None:
    """Token ids with the target span marked (masked in masked LMs); None if a side has no target."""
    prefix = []  # causal LMs: BOS (EOS if none) instead of the tokenizer's special tokens
    if kind == "causal":
        start = causal_start_token(tokenizer)
        prefix = [] if start is None else [start]
    elif tokenizer.mask_token_id is None:
        raise DebiasError("This masked LM's tokenizer has no mask token; PCGU masks the target tokens.")
    adv_ids, dis_ids = [prefix + tokenizer(text, add_special_tokens=kind == "masked", truncation=True,
                                           max_length=max_length - len(prefix))["input_ids"]
                        for text in (pair.advantaged, pair.disadvantaged)]
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
        ids = pad([e.input_ids for e in encoded], pad_value)
        attention = pad([[1] * len(e.input_ids) for e in encoded], 0)
        target = torch.zeros_like(ids, dtype=torch.bool)
        target_ids = torch.zeros_like(ids)
        for row, e in enumerate(encoded):
            target[row, e.target_positions] = True
            target_ids[row, e.target_positions] = torch.tensor(e.target_ids)
        batch.update({f"{name}_input_ids": ids, f"{name}_attention_mask": attention,
                      f"{name}_target_mask": target, f"{name}_target_ids": target_ids})
    return batch


# -- the training-core method ----------------------------------------------------------------------------
class PCGUOptions(Options):
    """PCGU's own options (the shared ones — steps, lr, batch, seed — live in training.TrainConfig)."""

    pairs: InputPathOrName = Field("winogender",
                                   description="winogender | crows | stereoset | bbq (from $DEBIAS_DATA_DIR), "
                                               "a WinoGender folder, a pair CSV/TSV (advantaged,disadvantaged or "
                                               "sent_more,sent_less) or a StereoSet .json/.jsonl.")
    groups: list[str] = Field([], description="Keep pairs of this group (CrowS bias type, StereoSet domain, "
                                              "WinoGender occupation, BBQ category e.g. Religion); repeatable.",
                              json_schema_extra={"flag": "--group"})
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
    owns_update = True  # masked plain SGD: no optimizer, scheduler, accumulation or clipping
    uses_optimizer = False
    unused_training_options = ("grad_accum", "weight_decay", "scheduler", "warmup_steps", "max_grad_norm")
    training_defaults = {"batch_size": 16}
    training_help = {"batch_size": "Pairs per forward pass (processes share it); the paper's default is 16.",
                     "lr": "Plain SGD learning rate (the paper's 1e-5)."}

    def __init__(self, options: PCGUOptions):
        super().__init__(options)
        self.encoded: list[EncodedPair] = []
        self.files: list[str] = []
        self.skipped = 0
        self.overlap: dict = {}
        self.selection_counts: dict[str, int] = {}
        self.counts = None  # selections per tensor, on the device until reported
        self.steps_done = 0

    def read_inputs(self) -> None:
        from debias_plugin.data.pairs import load_pairs

        self.pairs = load_pairs(self.opts.pairs, self.opts.groups or None)
        self.files = sorted({pair.origin.rsplit(", ", 1)[0] for pair in self.pairs})
        stats = [Path(f).with_name("occupations-stats.tsv") for f in self.files if f.endswith("all_sentences.tsv")]
        self.files += [str(f) for f in stats if f.is_file()]

    def examples_per_step(self, batch_size: int) -> int:
        return batch_size * self.opts.similarity_batches

    def sharding_refusal(self) -> str | None:
        return ("each partition's two gradients are compared whole on one process, and FSDP shards them. Run PCGU "
                "on one GPU (a 7B model in bf16 needs ~4P bytes: weights plus one held gradient; docs/SCALING.md) "
                "or with DDP (accelerate launch --multi_gpu).")

    def setup(self, run) -> list:
        from debias_plugin.data.pairs import warn_on_evaluation_overlap

        if run.is_main:
            self.overlap = warn_on_evaluation_overlap(self.pairs)
        self.kind = run.kind
        self.objective = self.opts.objective
        if self.objective == "auto":
            self.objective = "logit" if run.kind == "masked" else "logprob"
        if run.kind == "causal" and self.objective == "logit":
            raise DebiasError("objective 'logit' is for masked LMs; a causal LM's objective is the target "
                              "span's log-probability (objective 'logprob' or 'auto').")
        encoded = [encode_pair(p, run.tokenizer, run.kind, run.config.max_length) for p in self.pairs]
        self.encoded = [e for e in encoded if e is not None]
        self.skipped = len(encoded) - len(self.encoded)
        self.pad_id = pad_id(run.tokenizer)
        self.layout = partition_layout(run.model, self.opts.aggregation)
        self.total = sum(part.count for part in self.layout)
        self.owners = torch.repeat_interleave(torch.arange(len(self.layout)),  # partition -> its tensor
                                              torch.tensor([p.count for p in self.layout]))
        self.k = resolve_k(self.opts.k, self.total)
        self.held_dtype = compute_dtype(run.config)
        return self.encoded

    def collate(self, examples: list, positions: list[int]) -> dict:
        return collate_pairs(examples, self.pad_id)

    def _micro_batches(self, batch: dict) -> list[dict]:
        size = batch["adv_input_ids"].shape[0]
        chunk = max(1, math.ceil(size / self.opts.similarity_batches))
        return [{key: value[start:start + chunk] for key, value in batch.items()} for start in range(0, size, chunk)]

    def update(self, run, batch: dict) -> float:
        """Pair gradients over this process's share, all-reduced, then one selection and masked step."""
        result = pcgu_step(run.unwrapped, self.layout, self._micro_batches(batch), kind=self.kind, k=self.k,
                           lr=run.config.lr, objective=self.objective, direction=self.opts.direction,
                           rank_by=self.opts.rank_by, held_dtype=self.held_dtype, autocast=run.accelerator.autocast)
        if self.counts is None:
            self.owners = self.owners.to(result.selected.device)
            self.counts = torch.zeros(len(self.layout), dtype=torch.int64, device=result.selected.device)
        self.counts += torch.bincount(self.owners[result.selected], minlength=len(self.layout))
        self.steps_done += 1
        return result.objective_gap

    def _selections(self) -> dict[str, int]:
        """Selections per tensor so far (restored ones plus this run's), read from the device once."""
        totals = dict(self.selection_counts)
        if self.counts is not None:
            for part, count in zip(self.layout, self.counts.tolist()):
                if count:
                    totals[part.name] = totals.get(part.name, 0) + count
        return totals

    def evaluate(self, run) -> dict:
        """On the training pairs: % where the advantaged side scores higher, and the mean objective gap."""
        from tqdm.auto import tqdm

        model, wins, gap = run.unwrapped, 0, 0.0
        size = run.config.batch_size
        for start in tqdm(range(0, len(self.encoded), size), desc="pair preference", unit="batch", leave=False,
                          disable=not run.is_main):
            batch = collate_pairs(self.encoded[start:start + size], self.pad_id)
            batch = {key: value.to(run.device) for key, value in batch.items()}
            adv = sequence_objectives(model, batch, "adv", self.kind, self.objective)
            dis = sequence_objectives(model, batch, "dis", self.kind, self.objective)
            wins += int((adv > dis).sum())
            gap += float((adv - dis).sum())
        return {"pairs_preferring_advantaged_pct": 100.0 * wins / len(self.encoded),
                "mean_objective_gap": gap / len(self.encoded)}

    def report(self) -> dict:
        order = {part.name: i for i, part in enumerate(getattr(self, "layout", []))}
        top = sorted(self._selections().items(), key=lambda item: (-item[1], order.get(item[0], 0)))[:15]
        return {"pairs_used": len(self.encoded), "pairs_skipped_no_target": self.skipped,
                "partitions_total": self.total, "k": self.k, "objective": self.objective,
                "evaluation_overlap": self.overlap, "steps": self.steps_done,
                "selections_by_tensor_top15": dict(top)}

    def state_dict(self) -> dict:
        return {"selection_counts": self._selections(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.selection_counts = dict(state["selection_counts"])
        self.counts = None
        self.steps_done = int(state["steps_done"])

    def inputs(self) -> dict:
        if self.files:
            return {f"pairs[{i}]": f for i, f in enumerate(self.files)}
        return {"pairs": self.opts.pairs} if Path(self.opts.pairs).exists() else {}
