"""The batched causal-LM engine: Σ log p(target | input so far) for many requests, doing as little work as it can.

A request is (input ids, targets): its last len(targets) input positions are scored, position t predicting
targets[t - start], exactly as lm-eval's HFLM scores (context, continuation) pairs and rolling windows.

- Shared prefixes are forwarded once. Requests are sorted; a request whose input shares a prefix with the
  previous one joins that one's row as a token tree (a CrowS pair: one prefix, two branches; a StereoSet example:
  three). Each token attends to its own ancestors only (a 4-D attention mask, position id = depth), so it sees
  exactly the tokens it would see alone; identical inputs are one path.
- The vocabulary projection runs only on the scored positions, a chunk of rows at a time, each chunk's log-softmax
  gathered at its targets: the [batch, length, vocab] log-softmax (3.2 GB for 16 x 1024 x 49152 floats) is never
  built.
- Rows are sorted by length and packed under a padded-token budget.

No lm-eval imports here; torch is imported where it is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

Request = tuple[Sequence[int], Sequence[int]]  # (input ids, targets of the last len(targets) input positions)

# A request joins the previous row when the tokens it shares with it outweigh the attention the longer row costs:
# shared_tokens * SHARED_TOKEN_PAIRS >= extra query-key pairs. A token of a small model costs a few thousand pairs
# in FLOPs; masked attention on CPU is slower than its FLOPs, and 100..1000 all gave the same total cost on the
# main job's requests, so 300.
SHARED_TOKEN_PAIRS = 300
MIN_SHARED = 2


@dataclass
class PackedRow:
    """One model input row: a forest of token paths in depth-first order (a parent precedes its children)."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # depth of each node: its position id
    parents: list[int] = field(default_factory=list)  # index of each node's parent in the row, -1 for a root
    paths: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, node of each input position)

    @property
    def is_chain(self) -> bool:
        """One plain sequence (every path a prefix of the longest): no tree mask needed."""
        return all(parent == index - 1 for index, parent in enumerate(self.parents))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def pack_rows(inputs: Sequence[Sequence[int]], *, max_row_tokens: int, share: bool = True,
              min_shared: int = MIN_SHARED) -> list[PackedRow]:
    """Rows covering every input: identical inputs always share a path; with `share`, common prefixes too.

    Inputs are visited in lexicographic order, so each one's longest common prefix with any earlier input of its
    row is the one with the input just before it.
    """
    rows: list[PackedRow] = []
    previous, previous_path = (), []
    for index in sorted(range(len(inputs)), key=lambda i: tuple(inputs[i])):
        sequence = tuple(inputs[index])
        shared = common_prefix_length(sequence, previous)
        added, size = len(sequence) - shared, (len(rows[-1].tokens) if rows else 0)
        extra_pairs = 2 * size * added + added * added - len(sequence) ** 2  # vs. a row of its own
        joins = added == 0 or (share and shared >= min_shared and size + added <= max_row_tokens
                               and shared * SHARED_TOKEN_PAIRS >= extra_pairs)
        if not rows or not joins:
            rows.append(PackedRow())
            shared = 0
        row = rows[-1]
        path = previous_path[:shared]
        for depth in range(shared, len(sequence)):
            row.parents.append(path[-1] if path else -1)
            path.append(len(row.tokens))
            row.tokens.append(sequence[depth])
            row.positions.append(depth)
        row.paths.append((index, path))
        previous, previous_path = sequence, path
    return rows


def batches(rows: Sequence[PackedRow], token_budget: int) -> list[list[PackedRow]]:
    """Rows longest first, as many to a batch as fit `token_budget` padded tokens (at least one)."""
    out: list[list[PackedRow]] = []
    for row in sorted(rows, key=lambda row: -len(row.tokens)):
        if out and (len(out[-1]) + 1) * len(out[-1][0].tokens) <= token_budget:
            out[-1].append(row)
        else:
            out.append([row])
    return out


def ancestor_mask(rows: Sequence[PackedRow], width: int):
    """[rows, width, width] bool: node i may attend to node j iff j is i or one of its ancestors (padding: itself)."""
    import torch

    allowed = torch.zeros(len(rows), width, width, dtype=torch.bool)
    eye = torch.eye(width, dtype=torch.bool)
    for b, row in enumerate(rows):
        if row.is_chain:
            allowed[b] = torch.tril(torch.ones(width, width, dtype=torch.bool))
            continue
        mask = allowed[b]
        for node, parent in enumerate(row.parents):
            if parent >= 0:
                mask[node] = mask[parent]
            mask[node, node] = True
        mask[len(row.tokens):] = eye[len(row.tokens):]
    return allowed


class CausalScorer:
    """Scores requests with a causal LM (any model whose forward calls get_output_embeddings() on [B, T, H]).

    split_head: run the body, then the output layer only on scored rows (check_model tells whether that equals the
    model's own logits); share_prefix: token trees for shared prefixes (check_model tells whether the model honours
    4-D masks and position ids). softmax_dtype: the log-softmax dtype (default: the logits', as lm-eval's HFLM).
    """

    def __init__(self, model, *, batch_tokens: int, max_row_tokens: int, share_prefix: bool = True,
                 split_head: bool = True, softmax_dtype=None, autocast_dtype=None, min_shared: int = MIN_SHARED,
                 logits_chunk_elements: int = 1 << 23, progress=None):
        self.model = model
        self.min_shared = min_shared
        self.batch_tokens = batch_tokens
        self.max_row_tokens = max_row_tokens
        self.share_prefix = share_prefix
        self.split_head = split_head
        self.softmax_dtype = softmax_dtype
        self.autocast_dtype = autocast_dtype
        self.logits_chunk_elements = logits_chunk_elements
        self.progress = progress  # callable(n_requests_done) or None
        self.tokens_forwarded = 0  # padded tokens through the model body, for cost reports

    # ---- the forward pass ----------------------------------------------------------------------------

    def _device(self):
        return next(self.model.parameters()).device

    def _autocast(self):
        import torch

        return torch.autocast(device_type=self._device().type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def _features(self, rows: Sequence[PackedRow], flat_nodes):
        """(kind, tensor [len(flat_nodes), H or V]): hidden states ("hidden") or logits ("logits") of those nodes."""
        import torch
        from torch.nn.utils.rnn import pad_sequence

        device = self._device()
        ids = pad_sequence([torch.tensor(row.tokens, dtype=torch.long) for row in rows], batch_first=True)
        kwargs = {}
        if not all(row.is_chain for row in rows):
            dtype = next(self.model.parameters()).dtype
            dtype = dtype if dtype.is_floating_point else torch.float32
            allowed = ancestor_mask(rows, ids.shape[1])
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
            positions = pad_sequence([torch.tensor(row.positions, dtype=torch.long) for row in rows], batch_first=True)
            kwargs = {"attention_mask": mask[:, None].to(device), "position_ids": positions.to(device)}
        self.tokens_forwarded += ids.numel()
        captured = {}

        def keep_hidden(_module, args):
            hidden = args[0] if args else None
            if hidden is not None and hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(ids.shape):
                captured["hidden"] = hidden
                return (hidden[:, :0], *args[1:])  # the model's own projection then has nothing to do
            return None

        hook = (self.model.get_output_embeddings().register_forward_pre_hook(keep_hidden) if self.split_head
                else contextlib.nullcontext())
        with hook, torch.no_grad(), self._autocast():
            logits = self.model(input_ids=ids.to(device), **kwargs).logits
        kind, features = ("hidden", captured["hidden"]) if "hidden" in captured else ("logits", logits)
        return kind, features.reshape(-1, features.shape[-1]).index_select(0, flat_nodes.to(device))

    # ---- scoring -------------------------------------------------------------------------------------

    def score(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """(Σ log p(target), every target the argmax) per request, in order."""
        for index, (inputs, targets) in enumerate(requests):
            if not targets or len(targets) > len(inputs):
                raise ValueError(f"request {index}: {len(targets)} targets for {len(inputs)} input tokens")
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        rows = pack_rows([inputs for inputs, _ in requests], max_row_tokens=self.max_row_tokens,
                         share=self.share_prefix, min_shared=self.min_shared)
        for batch in batches(rows, self.batch_tokens):
            self._score_batch(batch, requests, answers)
            if self.progress is not None:
                self.progress(sum(len(row.paths) for row in batch))
        return answers

    def _score_batch(self, rows, requests, answers) -> None:
        import torch

        width = max(len(row.tokens) for row in rows)
        unique: dict[int, int] = {}  # flat node (row * width + node) -> index among the scored nodes
        pair_node, pair_target, owners = [], [], []  # one pair per scored position, request by request
        for b, row in enumerate(rows):
            for request, path in row.paths:
                targets = requests[request][1]
                for node, target in zip(path[len(path) - len(targets):], targets):
                    pair_node.append(unique.setdefault(b * width + node, len(unique)))
                    pair_target.append(target)
                owners.append((request, len(targets)))
        kind, features = self._features(rows, torch.tensor(list(unique), dtype=torch.long))
        device = features.device
        pair_node = torch.tensor(pair_node, dtype=torch.long)
        order = torch.argsort(pair_node, stable=True).to(device)  # pairs by scored node, to walk node chunks
        pair_node, pair_target = pair_node.to(device)[order], torch.tensor(pair_target, device=device)[order]
        head = self.model.get_output_embeddings() if kind == "hidden" else None
        vocab = head.weight.shape[0] if head is not None and hasattr(head, "weight") else features.shape[-1]
        chunk = max(1, self.logits_chunk_elements // max(1, vocab))
        bounds = torch.searchsorted(pair_node, torch.arange(0, len(unique) + chunk, chunk, device=device)).tolist()
        values, greedy = None, torch.empty(len(order), dtype=torch.bool, device=device)
        for k, start in enumerate(range(0, len(unique), chunk)):
            lo, hi = bounds[k], bounds[k + 1]
            with torch.no_grad(), self._autocast():
                logits = head(features[start:start + chunk]) if head is not None else features[start:start + chunk]
            # lm-eval's own kernel and dtype: float32 log_softmax on CPU is ~1e-5 per token off the exact value, and
            # logsumexp is not, so an exact log-sum-exp would differ from `hf` by ~3e-4 per CrowS sentence.
            log_probs = torch.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            if values is None:
                values = torch.empty(len(order), dtype=log_probs.dtype, device=device)
            nodes, targets = pair_node[lo:hi] - start, pair_target[lo:hi]
            values[order[lo:hi]] = log_probs[nodes, targets]
            greedy[order[lo:hi]] = log_probs.max(dim=-1).indices[nodes] == targets
        # each request's sum in its own dtype and position order, as HFLM's `.sum()` rounds it
        counts = [count for _, count in owners]
        for (request, _), part, hits in zip(owners, values.split(counts), greedy.split(counts)):
            answers[request] = (float(part.sum()), bool(hits.all()))


def check_model(model, token_ids: Sequence[int], **scorer_options) -> tuple[dict[str, float], float]:
    """({shortcut: largest |log-prob difference| from the model's plain forward}, the probes' context effect).

    Two probes sharing a 3-token prefix (token_ids: at least 9) are scored at every position, with the output layer
    split off and as token trees. The context effect is how much the same target's log-prob moves between the
    probes after they part: a model whose forward post-processes its logits, or that ignores 4-D masks or position
    ids, is off by a good share of it, while float rounding is orders of magnitude below it.
    """
    import torch

    probes = [list(token_ids[:6]), list(token_ids[:3]) + list(token_ids[6:9])]
    candidates = list(dict.fromkeys(token_ids[:9]))[:3]
    device = next(model.parameters()).device
    autocast = CausalScorer(model, batch_tokens=1, max_row_tokens=1, **scorer_options)._autocast
    reference: dict[tuple[tuple[int, ...], int], float] = {}
    for probe in probes:
        with torch.no_grad(), autocast():
            logits = model(input_ids=torch.tensor([probe], device=device)).logits[0]
        log_probs = torch.log_softmax(logits, dim=-1, dtype=scorer_options.get("softmax_dtype")).float().cpu()
        for t in range(len(probe)):
            for target in candidates:
                reference[(tuple(probe[:t + 1]), target)] = float(log_probs[t, target])
    context_effect = max(abs(reference[(tuple(probes[0][:t + 1]), y)] - reference[(tuple(probes[1][:t + 1]), y)])
                         for t in range(3, 6) for y in candidates)
    keys = list(reference)

    def worst(**shortcuts) -> float:
        scorer = CausalScorer(model, batch_tokens=256, max_row_tokens=64, **shortcuts, **scorer_options)
        scores = scorer.score([(list(inputs), [target]) for inputs, target in keys])
        return max(abs(score - reference[key]) for (score, _), key in zip(scores, keys))

    differences = {"split_head": worst(share_prefix=False, split_head=True),
                   "share_prefix": worst(share_prefix=True, split_head=False, min_shared=1)}
    return differences, context_effect
