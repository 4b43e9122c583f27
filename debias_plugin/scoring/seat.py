"""SEAT (May et al. 2019): WEAT's effect size and permutation p-value on sentence embeddings, and the embeddings.

For targets X, Y and attributes A, B (rows of embedding matrices):

    s(w, A, B) = mean_{a in A} cos(w, a) - mean_{b in B} cos(w, b)
    d = (mean_{x in X} s(x, A, B) - mean_{y in Y} s(y, A, B)) / std_{w in X u Y} s(w, A, B)    (ddof = 1)

Sign: d > 0 means X (the file's targ1) sits closer to A (attr1) and Y (targ2) closer to B (attr2); in the
stereotype tests (e.g. sent-weat6: male names / female names vs career / family) that is the stereotypical
direction. The p-value is one-sided, P[sum_{x in X_i} s(x) >= sum_{x in X} s(x)] over the partitions
(X_i, Y_i) of X u Y with |X_i| = |X| (May et al.'s weat.py: that sum orders partitions exactly as the full
statistic does). Exact when there are at most `n_samples` partitions; otherwise `n_samples - 1` random
partitions plus the observed one counted as a hit (May et al.'s conservative bias by one). Ties (within
1e-12 of the statistic's scale) count as hits, as in their code. Random partitions come from
numpy.random.default_rng(seed), re-seeded for every test so a test's p-value does not depend on which tests
ran before it: sample i draws `rng.random(|X u Y|)` and takes the |X| positions with the smallest keys.

Embeddings: a sentence-transformers folder (modules.json) uses its own Pooling config and Normalize; any other
model (encoder, masked or causal LM) is loaded as its base model (AutoModel, safetensors only) and pooled from
the last hidden state: mean over the tokens the tokenizer produces, special tokens included (bias-bench's SEAT
and DESIGN.md), or the first ([CLS]) or last token. Cosines do not change under normalisation.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from debias_plugin.errors import DebiasError

DEFAULT_PERMUTATIONS = 100_000  # bias-bench's and May et al.'s n_samples
POOLINGS = ("mean", "cls", "last")  # what --pooling offers; sentence-transformers configs may also ask for these
_ST_POOLING_KEYS = {  # sentence-transformers Pooling config key -> our mode, in the order it concatenates them
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_lasttoken": "last",
}
_TIE_TOLERANCE = 1e-12
_KEYS_PER_CHUNK = 1 << 22  # random keys drawn at once in the sampled test (memory, not results)


# -- statistics on embeddings ----------------------------------------------------------------------------
def _unit_rows(matrix, name: str) -> np.ndarray:
    rows = np.asarray(matrix, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise DebiasError(f"SEAT: {name} must be a non-empty [n, dim] matrix of embeddings, got shape {rows.shape}.")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if not np.all(np.isfinite(rows)) or np.any(norms == 0):
        raise DebiasError(f"SEAT: {name} holds a zero or non-finite embedding; its cosine is undefined.")
    return rows / norms


def _rows_sorted(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def associations(targets, attr_a, attr_b) -> np.ndarray:
    """s(w, A, B) for every row w of `targets`."""
    w = _unit_rows(targets, "the targets")
    a, b = _unit_rows(attr_a, "attribute set A"), _unit_rows(attr_b, "attribute set B")
    if a.shape == b.shape and np.allclose(_rows_sorted(a), _rows_sorted(b), rtol=0, atol=1e-12):
        raise DebiasError("SEAT: the attribute sets A and B hold the same embeddings; every association is 0 and "
                          "the effect size is undefined.")
    if not w.shape[1] == a.shape[1] == b.shape[1]:
        raise DebiasError(f"SEAT: embedding sizes differ ({w.shape[1]}, {a.shape[1]}, {b.shape[1]}).")
    return (w @ a.T).mean(axis=1) - (w @ b.T).mean(axis=1)


# Associations are differences of mean cosines (|s| <= 2): a spread below this is rounding noise, not a signal.
ROUNDING_SPREAD = 1e-9


def effect_size_from_associations(s_x: np.ndarray, s_y: np.ndarray) -> float:
    """d from the per-target associations of X and Y (sample standard deviation over X u Y)."""
    spread = np.std(np.concatenate([s_x, s_y]), ddof=1)
    if not spread > ROUNDING_SPREAD:
        raise DebiasError(f"SEAT: every target has the same association s(w, A, B) up to rounding (standard "
                          f"deviation {spread:.2g}); the effect size would be rounding noise. Are the attribute sets "
                          "A and B the same sentences, or do they mirror each other?")
    return float((s_x.mean() - s_y.mean()) / spread)


def permutation_p_value(s_x: np.ndarray, s_y: np.ndarray, n_samples: int = DEFAULT_PERMUTATIONS,
                        seed: int = 0) -> tuple[float, bool]:
    """(one-sided p-value, exact?) of sum_X s over equal-size partitions of X u Y (see the module docstring)."""
    if n_samples < 1:
        raise DebiasError(f"SEAT: the number of permutation samples must be at least 1, not {n_samples}.")
    pooled = np.concatenate([s_x, s_y])
    size, total = len(s_x), len(pooled)
    observed = s_x.sum()
    threshold = observed - _TIE_TOLERANCE * max(1.0, float(np.abs(pooled).sum()))
    if math.comb(total, size) <= n_samples:
        combos = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(total), size)),
                             dtype=np.int64).reshape(-1, size)
        return float(np.mean(pooled[combos].sum(axis=1) >= threshold)), True
    rng = np.random.default_rng(seed)
    hits, remaining = 1, n_samples - 1  # the observed partition, counted once (May et al.'s bias by one)
    rows_per_chunk = max(1, _KEYS_PER_CHUNK // total)
    while remaining:
        rows = min(rows_per_chunk, remaining)
        keys = rng.random((rows, total))
        chosen = np.argpartition(keys, size - 1, axis=1)[:, :size] if size < total else np.argsort(keys, axis=1)
        hits += int(np.count_nonzero(pooled[chosen].sum(axis=1) >= threshold))
        remaining -= rows
    return hits / n_samples, False


@dataclass(frozen=True)
class SeatScore:
    effect_size: float
    p_value: float
    exact: bool  # exact permutation test (all partitions) or sampled


def seat_score(x, y, a, b, n_samples: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> SeatScore:
    """Effect size and p-value of one test from the embeddings of X, Y, A, B (rows)."""
    if len(x) != len(y):
        raise DebiasError(f"SEAT: the target sets must be of equal size, got {len(x)} and {len(y)}.")
    s_x, s_y = associations(x, a, b), associations(y, a, b)
    p_value, exact = permutation_p_value(s_x, s_y, n_samples, seed)
    return SeatScore(effect_size_from_associations(s_x, s_y), p_value, exact)


# -- sentence embeddings -----------------------------------------------------------------------------------
@dataclass
class Encoder:
    """A loaded base model with how to turn its last hidden state into one vector per sentence."""

    model: object
    tokenizer: object
    pooling: tuple[str, ...]  # concatenated in this order (sentence-transformers may ask for several)
    normalize: bool
    max_length: int
    lowercase: bool = False
    pooling_source: str = "default"  # where the pooling came from, for reports


def pool_hidden_states(hidden, attention_mask, mode: str):
    """[batch, tokens, dim] hidden states -> [batch, dim], ignoring padding (right-padded inputs)."""
    import torch

    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean":
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    if mode == "mean_sqrt_len":
        return (hidden * mask).sum(dim=1) / torch.sqrt(mask.sum(dim=1).clamp(min=1e-9))
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        return hidden[torch.arange(hidden.shape[0]), (attention_mask.sum(dim=1) - 1).clamp(min=0)]
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    raise DebiasError(f"SEAT: unknown pooling '{mode}'; expected one of {', '.join(POOLINGS)}.")


def sentence_transformers_layout(model_dir: Path) -> dict | None:
    """For a sentence-transformers folder: transformer path, pooling modes, normalisation, length, case."""
    from debias_plugin.data._io import json_document
    from debias_plugin.errors import DataError

    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json_document(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise DataError(modules_file, "top level", "a list of modules, each with 'type' and 'path'")
    layout = {"transformer": None, "pooling": None, "normalize": False}
    for index, module in enumerate(modules):
        kind = str(module["type"]).rsplit(".", 1)[-1]
        path = model_dir / str(module.get("path", ""))
        if kind == "Transformer" and layout["transformer"] is None:
            layout["transformer"] = path
        elif kind == "Pooling" and layout["pooling"] is None:
            config_file = path / "config.json"
            config = json_document(config_file)
            if not isinstance(config, dict):
                raise DataError(config_file, "top level", "a pooling configuration object")
            if config.get("pooling_mode_weightedmean_tokens"):
                raise DebiasError(f"{config_file}: weighted-mean pooling is not supported; use --pooling.")
            modes = tuple(mode for key, mode in _ST_POOLING_KEYS.items() if config.get(key))
            if not modes:
                raise DataError(config_file, "pooling_mode_* fields", "at least one pooling mode set to true")
            layout["pooling"] = modes
        elif kind == "Normalize":
            layout["normalize"] = True
        else:
            raise DebiasError(f"{modules_file}, module {index} ({module['type']}): only Transformer, Pooling and "
                              "Normalize modules are supported (a Dense or other layer would change the "
                              "cosines); pass the transformer folder itself with --pooling to pool its states.")
    if layout["transformer"] is None or layout["pooling"] is None:
        raise DataError(modules_file, "modules", "a Transformer and a Pooling module")
    settings_file = layout["transformer"] / "sentence_bert_config.json"
    if not settings_file.is_file():
        settings_file = model_dir / "sentence_bert_config.json"
    settings = json_document(settings_file) if settings_file.is_file() else {}
    layout["max_length"] = settings.get("max_seq_length") if isinstance(settings, dict) else None
    layout["lowercase"] = bool(settings.get("do_lower_case")) if isinstance(settings, dict) else False
    return layout


def load_encoder(model_dir: str | Path, pooling: str | None = None) -> Encoder:
    """The base model of a folder (no LM head needed), safetensors only, never remote code.

    `pooling` None: a sentence-transformers folder's own pooling, otherwise mean; an explicit value wins.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from debias_plugin.models import check_weights

    if pooling is not None and pooling not in POOLINGS:
        raise DebiasError(f"--pooling must be one of {', '.join(POOLINGS)}, not '{pooling}'.")
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise DebiasError(f"--model {model_dir}: no such folder; expected a Hugging Face model folder.")
    layout = sentence_transformers_layout(model_dir)
    weights_dir = layout["transformer"] if layout else model_dir
    check_weights(weights_dir)
    config = AutoConfig.from_pretrained(weights_dir, trust_remote_code=False)
    try:
        model, info = AutoModel.from_pretrained(weights_dir, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=False, output_loading_info=True)
    except (ValueError, OSError) as err:
        raise DebiasError(f"{weights_dir}: transformers cannot load a base model for {config.model_type!r} "
                          f"from its safetensors ({err}).") from err
    missing = [key for key in info.get("missing_keys", []) if not key.startswith("pooler.")]
    if missing:
        raise DebiasError(f"{weights_dir}: the weights lack {len(missing)} tensor(s) of the encoder "
                          f"({', '.join(sorted(missing)[:5])}...); they would be random. Expected a checkpoint "
                          "of this architecture.")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=False)
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None),
              layout.get("max_length") if layout else None]
    max_length = min([int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000] or [512])
    if pooling is not None:
        modes, source = (pooling,), f"--pooling {pooling}" + (" (overrides sentence-transformers)" if layout else "")
    elif layout:
        modes, source = layout["pooling"], f"sentence-transformers ({'+'.join(layout['pooling'])})"
    else:
        modes, source = ("mean",), "mean (default)"
    return Encoder(model, tokenizer, modes, bool(layout and layout["normalize"]), max_length,
                   bool(layout and layout["lowercase"]), source)


def embed_sentences(encoder: Encoder, sentences: list[str], batch_size: int = 32) -> np.ndarray:
    """[n, dim] float32 embeddings; sentences are batched by length and right-padded (padding never pooled)."""
    import torch

    texts = [s.lower() for s in sentences] if encoder.lowercase else list(sentences)
    tokenizer = encoder.tokenizer
    ids = tokenizer(texts, truncation=True, max_length=encoder.max_length)["input_ids"]
    if any(len(row) == 0 for row in ids):
        raise DebiasError("SEAT: a sentence has no tokens after tokenization; it cannot be embedded.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list = [None] * len(ids)
    device = next(encoder.model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in rows], device=device)
            attention = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in rows], device=device)
            hidden = encoder.model(input_ids=input_ids, attention_mask=attention).last_hidden_state.float()
            pooled = torch.cat([pool_hidden_states(hidden, attention, mode) for mode in encoder.pooling], dim=-1)
            if encoder.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            for r, i in enumerate(rows):
                out[i] = pooled[r].cpu().numpy()
    return np.stack(out).astype(np.float32)


# -- running tests on a model -----------------------------------------------------------------------------
@dataclass
class SeatReport:
    """Per-test scores (file stem -> details) and how the sentences were embedded."""

    model: str
    pooling: str
    n_samples: int
    seed: int
    tests: dict[str, dict] = field(default_factory=dict)

    def average_abs_effect_size(self, bias_type: str | None = None) -> float | None:
        sizes = [abs(t["effect_size"]) for t in self.tests.values() if bias_type in (None, t["bias_type"])]
        return float(np.mean(sizes)) if sizes else None


def score_seat_tests(tests, embed, n_samples: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> dict[str, dict]:
    """Scores of loaded SeatTests, with `embed(list of sentences) -> [n, dim]` called once on all unique ones."""
    from debias_plugin.data.seat import SEAT_SETS, bias_type_of

    unique = list(dict.fromkeys(s for test in tests for key in SEAT_SETS for s in getattr(test, key).examples))
    vectors = embed(unique) if unique else np.zeros((0, 1))
    row = {sentence: i for i, sentence in enumerate(unique)}
    results = {}
    for test in tests:
        x, y, a, b = (vectors[[row[s] for s in getattr(test, key).examples]] for key in SEAT_SETS)
        score = seat_score(x, y, a, b, n_samples=n_samples, seed=seed)
        results[test.name] = {
            **asdict(score), "bias_type": bias_type_of(test.name),
            "categories": [getattr(test, key).category for key in SEAT_SETS],
            "sizes": [len(getattr(test, key).examples) for key in SEAT_SETS],
        }
    return results


def run_seat(model_dir: str | Path, tests: list[str] | None = None, pooling: str | None = None, *,
             seat_dir: str | Path | None = None, n_samples: int = DEFAULT_PERMUTATIONS, seed: int = 0,
             batch_size: int = 32) -> SeatReport:
    """SEAT on a model folder: load the tests (checked first), embed every sentence once, score each test."""
    from debias_plugin.data.seat import load_seat_tests

    if pooling is not None and pooling not in POOLINGS:
        raise DebiasError(f"--pooling must be one of {', '.join(POOLINGS)}, not '{pooling}'.")
    if n_samples < 1 or batch_size < 1:
        raise DebiasError("SEAT: --n-samples and --batch-size must be at least 1.")
    loaded = load_seat_tests(tests, seat_dir)
    encoder = load_encoder(model_dir, pooling)
    results = score_seat_tests(loaded, lambda sentences: embed_sentences(encoder, sentences, batch_size),
                               n_samples=n_samples, seed=seed)
    return SeatReport(str(model_dir), encoder.pooling_source, n_samples, seed, results)


def seat_metrics(model_dir: str | Path, tests: list[str] | None = None, pooling: str | None = None,
                 **options) -> dict[str, float]:
    """Flat metrics for the gate and the sweep: seat/avg_abs_effect_size, per bias type, per test."""
    report = run_seat(model_dir, tests, pooling, **options)
    metrics = {"seat/avg_abs_effect_size": report.average_abs_effect_size()}
    for bias_type in dict.fromkeys(t["bias_type"] for t in report.tests.values() if t["bias_type"]):
        metrics[f"seat/{bias_type}_avg_abs_effect_size"] = report.average_abs_effect_size(bias_type)
    for name, test in report.tests.items():
        metrics[f"seat/{name}_effect_size"] = test["effect_size"]
        metrics[f"seat/{name}_p_value"] = test["p_value"]
    return metrics


def format_report(report: SeatReport) -> str:
    """A plain-text table: one row per test, then the average absolute effect sizes."""
    lines = [f"SEAT on {report.model} (pooling: {report.pooling}; p-values: {report.n_samples} permutations, "
             f"seed {report.seed}, exact where fewer partitions exist)",
             f"{'test':<38} {'bias':<9} {'effect size':>11} {'p-value':>9}"]
    for name, test in report.tests.items():
        lines.append(f"{name:<38} {test['bias_type'] or '-':<9} {test['effect_size']:>11.3f} "
                     f"{test['p_value']:>9.4g}")
    for bias_type in dict.fromkeys(t["bias_type"] for t in report.tests.values() if t["bias_type"]):
        lines.append(f"{'average |effect size|, ' + bias_type:<48} {report.average_abs_effect_size(bias_type):>11.3f}")
    lines.append(f"{'average |effect size|, all tests':<48} {report.average_abs_effect_size():>11.3f}")
    return "\n".join(lines)


def report_to_json(report: SeatReport) -> str:
    """The --output document: file stem -> {effect_size, p_value}."""
    results = {name: {"effect_size": t["effect_size"], "p_value": t["p_value"]} for name, t in report.tests.items()}
    return json.dumps(results, indent=2) + "\n"
