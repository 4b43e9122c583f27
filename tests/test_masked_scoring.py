"""Batched masked-LM scores vs. straightforward one-forward-per-masked-token references of each paper's definition."""

from __future__ import annotations

import math
import string

import pytest

from debias_plugin.errors import DebiasError
from debias_plugin.scoring import stereoset
from debias_plugin.scoring.crows import aul_scores, masked_pair_scores, shared_token_positions
from debias_plugin.scoring.masked import MaskedScorer, pll_windows
from reference_crows import reference_crows_pair  # Nangia et al.'s metric.py, shared with the benchmark

MASKED_KINDS = ("bert", "roberta", "albert", "distilbert")
UNCASED_KINDS = {"bert", "albert", "distilbert"}  # the WordPiece tokenizer of the tiny models is uncased


# ---- independent references (written from the papers / their scripts, not from scoring/) ----------------------

def reference_aul(model, tokenizer, sentence, uncased):
    """Kaneko & Bollegala 2022: mean log-probability of every token of the unmasked sentence (CLS/SEP excluded)."""
    import torch

    ids = tokenizer.encode(sentence.lower() if uncased else sentence, return_tensors="pt")
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0], dim=-1)
    token_log_probs = log_probs.gather(1, ids[0].view(-1, 1))[1:-1]
    return token_log_probs.mean().item()


def reference_stereoset(model, tokenizer, context, sentence):
    """bias-bench IntrasentenceLoader + _likelihood_score: decode(t1..ti-1) + mask at BLANK, mean probability."""
    import torch

    word_index = [i for i, word in enumerate(context.split(" ")) if "BLANK" in word][-1]
    word = sentence.split(" ")[word_index].translate(str.maketrans("", "", string.punctuation))
    subtokens = tokenizer.encode(word, add_special_tokens=False)
    probabilities = []
    for i, target in enumerate(subtokens):
        text = context.replace("BLANK", f"{tokenizer.decode(subtokens[:i])}{tokenizer.mask_token}")
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        position = (ids[0] == tokenizer.mask_token_id).nonzero()[0].item()
        with torch.no_grad():
            probabilities.append(model(ids).logits[0, position].softmax(-1)[target].item())
    return sum(probabilities) / len(probabilities), len(subtokens)


def reference_pll(model, ids, positions):
    """Salazar et al. 2020: sum of log p(token) over `positions`, each masked alone in its own forward pass."""
    import torch

    total = 0.0
    for position in positions:
        masked = torch.tensor([ids])
        masked[0, position] = model.config_mask_id
        with torch.no_grad():
            total += torch.log_softmax(model(masked).logits[0, position], -1)[ids[position]].item()
    return total


# ---- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and the reference loops suffer badly from oversubscription."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def crows_pairs(data_dir):
    from debias_plugin.data import load_crows_pairs

    pairs = load_crows_pairs()
    chosen = [pairs[i] for i in (0, 1, 3, 250, 500, 750, 1000, 1507)]
    sentences = [(p.sent_more, p.sent_less) for p in chosen]
    sentences.append((chosen[0].sent_more, chosen[0].sent_more))  # identical sentences: a tie, no win
    sentences.append(("The doctor said she was tired.", "The doctor said he was very tired."))  # unequal lengths
    return sentences


def _load(folder):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=MASKED_KINDS)
def masked(request, tiny_model):
    model, tokenizer = _load(tiny_model(request.param))
    return request.param, model, tokenizer


# ---- CrowS ----------------------------------------------------------------------------------------------------

def test_crows_scores_equal_per_token_reference(masked, crows_pairs):
    kind, model, tokenizer = masked
    scorer = MaskedScorer(model, tokenizer, token_budget=256)  # small budget: many batches with padding
    assert scorer.uncased == (kind in UNCASED_KINDS)
    batched = masked_pair_scores(scorer, crows_pairs)
    for (more, less), (score_more, score_less) in zip(crows_pairs, batched):
        ref_more, ref_less = reference_crows_pair(model, tokenizer, more, less, kind in UNCASED_KINDS)
        assert score_more == pytest.approx(ref_more, abs=1e-4)
        assert score_less == pytest.approx(ref_less, abs=1e-4)
        assert (round(score_more, 3) > round(score_less, 3)) == (round(ref_more, 3) > round(ref_less, 3))
    tie_more, tie_less = batched[-2]
    assert tie_more == tie_less  # identical sentences: equal scores, so no win


def test_shared_positions_skip_the_modified_tokens():
    shared_a, shared_b = shared_token_positions([101, 7, 8, 9, 102], [101, 7, 5, 6, 9, 102])
    assert shared_a == [0, 1, 3, 4] and shared_b == [0, 1, 4, 5]


# ---- AUL ------------------------------------------------------------------------------------------------------

def test_aul_equals_unmasked_reference(masked, crows_pairs):
    kind, model, tokenizer = masked
    sentences = [s for pair in crows_pairs[:5] for s in pair]
    batched = aul_scores(MaskedScorer(model, tokenizer), sentences)
    for sentence, score in zip(sentences, batched):
        assert score == pytest.approx(reference_aul(model, tokenizer, sentence, kind in UNCASED_KINDS), abs=1e-5)


# ---- StereoSet --------------------------------------------------------------------------------------------------

def test_stereoset_equals_bias_bench_reference(masked, data_dir):
    from debias_plugin.data import load_stereoset

    kind, model, tokenizer = masked
    examples = [e for e in load_stereoset(kind="intrasentence") if e.context.count("BLANK") == 1][:5]
    items = [(e.context, s) for e in examples for s in (e.stereotype, e.anti_stereotype, e.unrelated)]
    batched = stereoset.masked_scores(MaskedScorer(model, tokenizer, token_budget=300), items)
    subtoken_counts = []
    for (context, sentence), score in zip(items, batched):
        reference, n_subtokens = reference_stereoset(model, tokenizer, context, sentence)
        subtoken_counts.append(n_subtokens)
        assert score == pytest.approx(reference, rel=1e-4, abs=1e-7)
    assert max(subtoken_counts) > 1  # the n-input path (t1..ti-1 filled) is exercised


def test_stereoset_several_blanks_score_one_mask(tiny_model):
    model, tokenizer = _load(tiny_model("bert"))
    scorer = MaskedScorer(model, tokenizer)
    queries = stereoset.masked_queries(scorer, "brahmin is very BLANK and is strict about BLANK",
                                       "brahmin is very religious and is strict about religion")
    assert queries and all(ids.count(tokenizer.mask_token_id) == 1 for ids, _, _ in queries)


def test_stereoset_sentence_not_fitting_context_is_an_error(tiny_model):
    model, tokenizer = _load(tiny_model("bert"))
    with pytest.raises(DebiasError, match="does not fit"):
        stereoset.masked_scores(MaskedScorer(model, tokenizer), [("The man is a BLANK person.", "short")])


# ---- pseudo-log-likelihood ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_tokens,max_tokens", [(0, 8), (5, 8), (8, 8), (9, 8), (37, 8), (100, 16), (1000, 510)])
def test_pll_windows_score_every_token_once_with_context(n_tokens, max_tokens):
    windows = pll_windows(n_tokens, max_tokens)
    scored = [t for _, _, start, end in windows for t in range(start, end)]
    assert scored == list(range(n_tokens))
    for w_start, w_end, s_start, s_end in windows:
        assert 0 <= w_start <= s_start < s_end <= w_end <= n_tokens and w_end - w_start <= max_tokens
        for t in range(s_start, s_end):  # at least a quarter window of context on each side, where the text has it
            assert t - w_start >= min(t, max_tokens // 4) and w_end - 1 - t >= min(n_tokens - 1 - t, max_tokens // 4)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_pll_equals_per_token_reference(kind, tiny_model, tokenizer_texts):
    model, tokenizer = _load(tiny_model(kind))
    model.config_mask_id = tokenizer.mask_token_id
    short = "The quick brown fox jumps over the lazy dog."
    long = " ".join(tokenizer_texts[-60:])[:350]
    scorer = MaskedScorer(model, tokenizer, max_length=24, token_budget=200)
    short_pll, long_pll = scorer.pseudo_log_likelihoods([short, long])

    encoding = tokenizer(short, return_special_tokens_mask=True)
    positions = [p for p, special in enumerate(encoding["special_tokens_mask"]) if not special]
    assert short_pll == pytest.approx(reference_pll(model, encoding["input_ids"], positions), abs=1e-4)

    # long text: each token masked alone inside the window pll_windows gives it (windows tested above)
    encoding = tokenizer(long, return_special_tokens_mask=True)
    ids, special = encoding["input_ids"], encoding["special_tokens_mask"]
    content = [i for i, s in zip(ids, special) if not s]
    first, last = ids[:1], ids[-1:]
    assert len(content) > 2 * 22  # several windows
    expected = 0.0
    for w_start, w_end, s_start, s_end in pll_windows(len(content), 24 - 2):
        window = first + content[w_start:w_end] + last
        expected += reference_pll(model, window, [1 + t - w_start for t in range(s_start, s_end)])
    assert long_pll == pytest.approx(expected, abs=1e-3)


def test_training_pseudo_perplexity_equals_per_token_reference(tiny_model):
    """The fine-tune/unlearn eval curves (methods.perplexity) report exp(-sum PLL / tokens) over the texts."""
    import math

    from debias_plugin.methods import perplexity

    model, tokenizer = _load(tiny_model("bert"))
    model.config_mask_id = tokenizer.mask_token_id
    texts = ["The quick brown fox jumps over the lazy dog.", "She is a nurse.", "He works as an engineer today."]
    total = count = 0
    for text in texts:
        encoding = tokenizer(text, return_special_tokens_mask=True)
        positions = [p for p, special in enumerate(encoding["special_tokens_mask"]) if not special]
        total += reference_pll(model, encoding["input_ids"], positions)
        count += len(positions)
    got = perplexity(model, tokenizer, "masked", texts, max_length=64, device="cpu", batch_size=4)
    assert got == pytest.approx(math.exp(-total / count), rel=1e-5)


# ---- the engine: dedup, packing, memory cap, errors ------------------------------------------------------------

def test_engine_deduplicates_and_respects_token_budget(tiny_model):
    model, tokenizer = _load(tiny_model("bert"))
    shapes = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    scorer = MaskedScorer(model, tokenizer, token_budget=64)
    sentences = ["a man walked in.", "a woman walked in quietly today.", "a man walked in."]
    pairs = [(sentences[0], sentences[1]), (sentences[2], sentences[1]), (sentences[0], sentences[1])]
    scores = masked_pair_scores(scorer, pairs)
    assert scores[0] == scores[1] == scores[2]
    unique_inputs = set()
    for more, less in pairs[:1]:
        ids_a, ids_b = (tuple(scorer.encode(s)["input_ids"]) for s in (more, less))
        span_a, span_b = shared_token_positions(ids_a, ids_b)
        unique_inputs |= {(ids_a, p) for p in span_a[1:-1]} | {(ids_b, p) for p in span_b[1:-1]}
    assert sum(rows for rows, _ in shapes) == len(unique_inputs)  # each masked copy computed once
    assert all(rows * width <= 64 for rows, width in shapes) and len(shapes) > 1


def test_scores_do_not_depend_on_batching(tiny_model, crows_pairs):
    model, tokenizer = _load(tiny_model("roberta"))
    small = masked_pair_scores(MaskedScorer(model, tokenizer, token_budget=1, max_batch_size=1), crows_pairs[:4])
    large = masked_pair_scores(MaskedScorer(model, tokenizer, token_budget=100_000), crows_pairs[:4])
    for a, b in zip(small, large):
        assert a == pytest.approx(b, abs=1e-5)


def test_tokenizer_without_mask_token_is_an_error(tiny_model):
    from transformers import AutoTokenizer

    model, _ = _load(tiny_model("bert"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("bert"), mask_token=None)
    with pytest.raises(DebiasError, match="no mask token"):
        MaskedScorer(model, tokenizer)


def test_reference_helpers_are_not_trivial(masked, crows_pairs):
    """Guard: the reference must see different scores for different sentences (else equality proves nothing)."""
    kind, model, tokenizer = masked
    more, less = reference_crows_pair(model, tokenizer, *crows_pairs[0], kind in UNCASED_KINDS)
    assert not math.isclose(more, less) and more < 0 and less < 0
