"""crows_bias / stereoset_bias / wikitext2_ppl through lm-eval on tiny causal models vs. independent references."""

from __future__ import annotations

import math
import re
from collections import defaultdict

import pytest
import torch

from debias_plugin.paths import tasks_dir

LIMIT = 24


def _sentence_logprob(model, tokenizer, text: str, context: str = "") -> tuple[float, int]:
    """Σ log p(x_t | x_<t) of `text` after BOS (or after `context`), by one plain forward pass."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if context:
        context_ids = tokenizer.encode(context)
        ids = tokenizer.encode(context + text)
        scored_from = len(context_ids)
    else:
        context_ids = []
        ids = [prefix] + tokenizer.encode(text, add_special_tokens=False)
        scored_from = 1
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    total = sum(logits[t - 1, ids[t]].item() for t in range(scored_from, len(ids)))
    return total, len(ids) - scored_from


_CACHE = {}


def _evaluate(model_dir, tasks, limit):
    """Run lm-eval in-process; the task index and each model are built once per test session."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    key = str(model_dir)
    if key not in _CACHE:
        _CACHE[key] = (HFLM(pretrained=key, device="cpu", batch_size=16, dtype="float32"),
                       TaskManager(include_path=str(tasks_dir()), include_defaults=False,
                                   metadata={"pretrained": key}))
    lm, manager = _CACHE[key]
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True,
                                   bootstrap_iters=0)


def _reference_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_crows_bias_matches_definition_pair_by_pair(tiny_model, kind):
    model_dir = tiny_model(kind)
    out = _evaluate(model_dir, ["crows_bias_overall", "crows_bias"], LIMIT)
    model, tokenizer = _reference_model(model_dir)

    def check(samples):
        wins = []
        for sample in samples:
            doc = sample["doc"]
            more = _sentence_logprob(model, tokenizer, doc["sent_more"])[0]
            less = _sentence_logprob(model, tokenizer, doc["sent_less"])[0]
            assert (sample["pct_stereotype"] == 100.0) == (more > less), doc["pair_id"]
            assert sample["likelihood_diff"] == pytest.approx(abs(more - less), abs=1e-3)
            wins.append(more > less)
        return wins

    wins = check(out["samples"]["crows_bias_overall"])
    assert len(wins) == LIMIT
    assert out["results"]["crows_bias_overall"]["pct_stereotype,none"] == pytest.approx(100 * sum(wins) / len(wins))
    stereo = [w for w, s in zip(wins, out["samples"]["crows_bias_overall"]) if s["doc"]["stereo_antistereo"] == "stereo"]
    assert out["results"]["crows_bias_overall"]["pct_stereotype_stereo,none"] == pytest.approx(
        100 * sum(stereo) / len(stereo))

    _check_type_gaps(out, wins)

    group_wins = []
    for bias_type in ("gender", "religion", "age"):
        type_wins = check(out["samples"][f"crows_bias_{bias_type}"])
        assert all(s["doc"]["bias_type"] == bias_type for s in out["samples"][f"crows_bias_{bias_type}"])
        assert out["results"][f"crows_bias_{bias_type}"]["pct_stereotype,none"] == pytest.approx(
            100 * sum(type_wins) / len(type_wins))
    for name, samples in out["samples"].items():
        if name.startswith("crows_bias_") and name != "crows_bias_overall":
            group_wins += [s["pct_stereotype"] == 100.0 for s in samples]
    assert out["results"]["crows_bias"]["pct_stereotype,none"] == pytest.approx(100 * sum(group_wins) / len(group_wins))


def _check_type_gaps(out, wins):
    """type_mean_gap / worst_type_gap on crows_bias_overall, and the gate's statistic, from the pairs' wins."""
    import numpy as np

    from debias_plugin.gate.results import metric_samples, results_from_dict

    by_type = defaultdict(list)
    for won, sample in zip(wins, out["samples"]["crows_bias_overall"]):
        by_type[sample["doc"]["bias_type"]].append(won)
    gaps = [abs(100 * sum(type_wins) / len(type_wins) - 50) for type_wins in by_type.values()]
    expected = {"type_mean_gap": sum(gaps) / len(gaps), "worst_type_gap": max(gaps)}
    results = results_from_dict(out, "lm-eval")
    for metric, value in expected.items():
        assert out["results"]["crows_bias_overall"][f"{metric},none"] == pytest.approx(value)
        samples, _ = metric_samples(results, "crows_bias_overall", metric)
        assert float(samples.statistic()(np.arange(samples.units))) == pytest.approx(value)
        assert sorted(np.bincount(samples.strata).tolist()) == sorted(map(len, by_type.values()))


def _reference_stereoset(rows):
    """Straight from the paper: per target counts, SS/LMS per target, unweighted means, ICAT from the means."""
    per_target = defaultdict(list)
    for target, s, a, u in rows:
        per_target[target].append((s, a, u))
    ss = [100 * sum(s > a for s, a, _ in v) / len(v) for v in per_target.values()]
    lms = [100 * sum((s > u) + (a > u) for s, a, u in v) / (2 * len(v)) for v in per_target.values()]
    ss, lms = sum(ss) / len(ss), sum(lms) / len(lms)
    return ss, lms, lms * min(ss, 100 - ss) / 50


@pytest.mark.parametrize("task, kind", [("stereoset_bias", "intrasentence"), ("stereoset_bias_inter", "intersentence")])
def test_stereoset_bias_matches_definition(tiny_model, task, kind):
    from debias_plugin.data import load_stereoset

    model_dir = tiny_model("gpt2")
    out = _evaluate(model_dir, [task], 40)
    model, tokenizer = _reference_model(model_dir)
    examples = {e.id: e for e in load_stereoset(kind=kind)}
    rows = []
    for sample in out["samples"][task]:
        example = examples[sample["doc"]["id"]]
        scores = []
        for sentence in (example.stereotype, example.anti_stereotype, example.unrelated):
            if kind == "intrasentence":
                total, count = _sentence_logprob(model, tokenizer, sentence)
            else:
                total, count = _sentence_logprob(model, tokenizer, " " + sentence, context=example.context)
            scores.append(total / count)
        rows.append((example.target, *scores))
    ss, lms, icat = _reference_stereoset(rows)
    results = out["results"][task]
    assert results["ss,none"] == pytest.approx(ss) and results["lms,none"] == pytest.approx(lms)
    assert results["icat,none"] == pytest.approx(icat)
    gender = [row for row, s in zip(rows, out["samples"][task]) if s["doc"]["bias_type"] == "gender"]
    if gender:
        assert results["ss_gender,none"] == pytest.approx(_reference_stereoset(gender)[0])


def test_wikitext2_ppl_matches_rolling_definition(tiny_model):
    """Disjoint windows of max_length tokens, each conditioned on the token before it (BOS first)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    model_dir = tiny_model("gpt2")
    out = _evaluate(model_dir, ["wikitext2_ppl"], 2)
    model, tokenizer = _reference_model(model_dir)
    max_length = model.config.n_positions
    total_ll, total_words = 0.0, 0
    for sample in out["samples"]["wikitext2_ppl"]:
        page = sample["doc"]["page"]
        inputs = [tokenizer.bos_token_id] + tokenizer.encode(wikitext_detokenizer({"page": page}),
                                                             add_special_tokens=False)
        # Predict tokens inputs[s+1 : e+1] in chunks of max_length; each chunk sees up to max_length inputs
        # ending right before its last target (the final chunk borrows earlier tokens as context).
        for start in range(0, len(inputs) - 1, max_length):
            end = min(start + max_length, len(inputs) - 1)
            first_input = max(0, end - max_length)
            with torch.no_grad():
                logp = model(torch.tensor([inputs[first_input:end]])).logits[0].log_softmax(-1)
            total_ll += sum(logp[i - first_input, inputs[i + 1]].item() for i in range(start, end))
        total_words += len(re.split(r"\s+", page))
    expected = math.exp(-total_ll / total_words)
    assert out["results"]["wikitext2_ppl"]["word_perplexity,none"] == pytest.approx(expected, rel=1e-4)
