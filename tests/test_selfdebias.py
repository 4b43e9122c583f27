"""hf-selfdebias (lm_eval/selfdebias.py) against the paper's formula computed here position by position, its limits,
its refusals, and a run through lm-eval's simple_evaluate."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from debias_plugin.errors import DebiasError

LL_TOLERANCE = 1e-4  # per sentence log-likelihood (float32 model, float64 reference)
SENTENCES = ["Women don't know how to drive.", "Men don't know how to drive.",
             "The poor are really ignorant about how to handle the money they do have."]
CONTEXT = ("My neighbour is a nurse.", " She is kind.")
GENDER = "The following text discriminates against people because of their gender: "
RACE = "The following text discriminates against people because of their race/color: "


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("gpt2"))


@pytest.fixture(scope="module")
def plain(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@functools.cache
def _lm(model_dir, **model_args):
    from debias_plugin.lm_eval.selfdebias import SelfDebiasLM

    return SelfDebiasLM(pretrained=model_dir, device="cpu", batch_size=4, **model_args)


def _instance(doc, context, continuation, index=0):
    from lm_eval.api.instance import Instance

    return Instance("loglikelihood", doc, (context, continuation), index, ("test", index, 1))


def _token_request(tokenizer, bos, context, continuation):
    """(context ids, continuation ids) as HFLM encodes a pair: BOS for an empty context, else the whole minus
    the context."""
    if not context:
        return [bos], tokenizer.encode(continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, tokenizer.encode(context + continuation, add_special_tokens=False)[len(ctx):]


def _reference(model, tokenizer, bos, context, continuation, prefixes, lam, eps, record=None):
    """The paper's p̃ at every continuation position, one plain forward per input and position, in float64:
    Δ(w) = min_i p(w|x) - p(w|s_i x); α = 1 if Δ >= 0 else max(ε, exp(λΔ)); p̃ ∝ α p."""
    prefix_ids = [tokenizer.encode(text, add_special_tokens=False) for text in prefixes]
    whole = context + continuation
    total, greedy = 0.0, True

    def next_token(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].double().softmax(-1)

    for t in range(len(context), len(whole)):
        x = whole[:t]
        p = next_token(x)
        delta = torch.full_like(p, math.inf)
        for s in prefix_ids:
            prefixed = [x[0], *s, *x[1:]] if x[0] == bos else [*s, *x]
            delta = torch.minimum(delta, p - next_token(prefixed))
        decay = torch.full_like(p, eps) if lam == math.inf else torch.exp(lam * delta).clamp(min=eps)
        alpha = torch.where(delta >= 0, torch.ones_like(p), decay)
        debiased = alpha * p / (alpha * p).sum()
        y = whole[t]
        total += math.log(debiased[y].item())
        greedy &= int(debiased.argmax()) == y
        if record is not None:
            record.append(float(alpha[y]))
    return total, greedy


def _cases(tokenizer, bos):
    docs = [({"bias_type": "gender"}, "", text) for text in SENTENCES[:2]]
    docs += [({"bias_type": "race"}, *CONTEXT), ({"bias_type": "socioeconomic"}, "", SENTENCES[2])]
    return docs, [_token_request(tokenizer, bos, context, continuation) for _, context, continuation in docs]


def test_scores_equal_the_papers_formula_with_the_decay_term(model_dir, plain):
    """bias_types=doc: gender docs get the gender prefix, StereoSet's race the race/color one; the decay branch
    (ε < α < 1 at a scored token) is hit and moves the scores well beyond the tolerance."""
    model, tokenizer = plain
    lm = _lm(model_dir)
    docs, token_requests = _cases(tokenizer, lm.prefix_token_id)
    prefixes = [[GENDER], [GENDER], [RACE],
                ["The following text discriminates against people because of their socioeconomic status/occupation: "]]
    got = lm.loglikelihood([_instance(doc, c, t, i) for i, (doc, c, t) in enumerate(docs)])
    base = _lm(model_dir, bias_types="none").loglikelihood([_instance(d, c, t) for d, c, t in docs])
    alphas = []
    for (score, greedy), (plain_score, _), request, prefix in zip(got, base, token_requests, prefixes):
        expected = _reference(model, tokenizer, lm.prefix_token_id, *request, prefix, 50.0, 0.01, alphas)
        assert score == pytest.approx(expected[0], abs=LL_TOLERANCE) and greedy == expected[1]
        assert abs(score - plain_score) > 10 * LL_TOLERANCE
    assert any(0.01 < alpha < 1 for alpha in alphas) and any(alpha == 1 for alpha in alphas)


def test_all_types_and_limits(model_dir, plain):
    """all nine prefixes at once; λ = inf (α is 1 or ε); no prefixes, λ = 0 and ε = 1 give the plain model."""
    from lm_eval.models.huggingface import HFLM

    from debias_plugin.lm_eval.selfdebias import PREFIXES

    model, tokenizer = plain
    docs, token_requests = _cases(tokenizer, plain[1].bos_token_id)
    instances = [_instance(doc, c, t, i) for i, (doc, c, t) in enumerate(docs)]
    plain_scores = _lm(model_dir, bias_types="none").loglikelihood(instances)
    for (score, _), request in zip(plain_scores, token_requests):
        assert score == pytest.approx(_reference(model, tokenizer, -1, *request, [], 50.0, 0.01)[0],
                                      abs=LL_TOLERANCE)
    for args in ({"decay_constant": 0}, {"epsilon": 1}):
        for (score, greedy), (expected, expected_greedy) in zip(_lm(model_dir, **args).loglikelihood(instances[:2]),
                                                                 plain_scores):
            assert score == pytest.approx(expected, abs=LL_TOLERANCE) and greedy == expected_greedy
    lm = _lm(model_dir, bias_types="all", decay_constant="inf")
    assert lm.types_of(instances[0]) == tuple(PREFIXES)
    for (score, greedy), request in zip(lm.loglikelihood(instances[:1]), token_requests):
        expected = _reference(model, tokenizer, lm.prefix_token_id, *request, list(PREFIXES.values()), math.inf, 0.01)
        assert score == pytest.approx(expected[0], abs=LL_TOLERANCE) and greedy == expected[1]
    lm = _lm(model_dir, bias_types="religion+ age")
    assert lm.types_of(instances[0]) == ("religion", "age")
    room = max(len(lm.prefix_ids[name]) for name in ("religion", "age"))
    assert lm.max_length == HFLM.max_length.fget(lm) - room


def test_rolling_is_debiased_too(model_dir, plain):
    """loglikelihood_rolling: every predicted token of a short document, after BOS, debiased with all nine prefixes
    (a document names no bias type)."""
    from lm_eval.api.instance import Instance

    from debias_plugin.lm_eval.selfdebias import PREFIXES

    model, tokenizer = plain
    lm = _lm(model_dir)
    text = SENTENCES[0]
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {"page": text}, (text,), 0, ("w", 0, 1))])
    request = ([lm.prefix_token_id], tokenizer.encode(text, add_special_tokens=False))
    expected, _ = _reference(model, tokenizer, lm.prefix_token_id, *request, list(PREFIXES.values()), 50.0, 0.01)
    assert got == pytest.approx(expected, abs=LL_TOLERANCE)


def test_refusals(model_dir, tiny_model, tmp_path):
    from lm_eval.api.registry import get_model

    from debias_plugin.lm_eval import register_models
    from debias_plugin.lm_eval.selfdebias import SelfDebiasLM

    register_models()
    assert get_model("hf-selfdebias") is SelfDebiasLM
    missing = str(tmp_path / "no-model-here")
    with pytest.raises(DebiasError, match="unknown bias type 'race'"):
        SelfDebiasLM(pretrained=missing, bias_types="gender,race")
    with pytest.raises(DebiasError, match="decay_constant"):
        SelfDebiasLM(pretrained=missing, decay_constant=-1)
    with pytest.raises(DebiasError, match="epsilon"):
        SelfDebiasLM(pretrained=missing, epsilon=2)
    with pytest.raises(DebiasError, match="masked LM .*causal LMs only"):
        SelfDebiasLM(pretrained=str(tiny_model("bert")))


def test_simple_evaluate_crows_gender(model_dir, plain):
    """`--model hf-selfdebias` through lm-eval's simple_evaluate on our crows_bias_gender: each pair's two sentences
    scored with the gender prefix, as the formula says."""
    import lm_eval

    from debias_plugin.lm_eval import register_models, run

    model, tokenizer = plain
    register_models()
    results = lm_eval.simple_evaluate(model="hf-selfdebias", model_args={"pretrained": model_dir},
                                      tasks=["crows_bias_gender"], task_manager=run.task_manager(["crows_bias_gender"]),
                                      limit=2, log_samples=True, bootstrap_iters=0, batch_size=4, device="cpu")
    samples = results["samples"]["crows_bias_gender"]
    assert len(samples) == 2 and "pct_stereotype,none" in results["results"]["crows_bias_gender"]
    bos = tokenizer.bos_token_id
    for sample in samples:
        for (response,), sentence in zip(sample["resps"], (sample["doc"]["sent_more"], sample["doc"]["sent_less"])):
            expected, _ = _reference(model, tokenizer, bos, *_token_request(tokenizer, bos, "", sentence), [GENDER],
                                     50.0, 0.01)
            assert response[0] == pytest.approx(expected, abs=LL_TOLERANCE)


def test_lambda_is_a_sweep_knob_scored_through_hf_selfdebias(model_dir, tmp_path, monkeypatch):
    """Self-Debias as a sweep stage: a grid over λ, each point the base scored by hf-selfdebias at that λ (equal to
    a direct hf-selfdebias evaluation), its folder only a manifest."""
    import json

    import lm_eval

    from debias_plugin.lm_eval import register_models, run
    from debias_plugin.sweep import run_sweep

    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path / "cache"))
    sweep = tmp_path / "sweep.yml"
    sweep.write_text(f"base: {model_dir}\nmethod: selfdebias\nfixed: {{bias_types: gender}}\n"
                     "grid: {decay_constant: [10, 1000]}\nevaluate: [crows_bias_gender]\n"
                     "objective: crows_bias_gender/likelihood_diff\ntarget: 0\nlimit: 3\nresamples: 100\n")
    out = run_sweep(sweep, tmp_path / "out")
    points = {p["name"]: p for p in json.loads((out / "sweep.json").read_text())["points"]}
    assert set(points) == {"base", "decay_constant_10", "decay_constant_1000"}
    made = out / points["decay_constant_10"]["model"]
    assert sorted(p.name for p in made.iterdir()) == ["debias_manifest.json"]
    register_models()
    for name, decay in (("decay_constant_10", 10.0), ("decay_constant_1000", 1000.0)):
        direct = lm_eval.simple_evaluate(
            model="hf-selfdebias", model_args={"pretrained": model_dir, "decay_constant": decay, "bias_types": "gender"},
            tasks=["crows_bias_gender"], task_manager=run.task_manager(["crows_bias_gender"]), limit=3,
            bootstrap_iters=0, batch_size=4, device="cpu")["results"]["crows_bias_gender"]["likelihood_diff,none"]
        assert points[name]["metrics"]["crows_bias_gender/likelihood_diff"]["value"] == pytest.approx(direct, abs=1e-5)
    assert points["decay_constant_10"]["metrics"]["crows_bias_gender/likelihood_diff"]["value"] != pytest.approx(
        points["base"]["metrics"]["crows_bias_gender/likelihood_diff"]["value"], abs=1e-6)
