"""`debias direction` and hf-steered-safe: directions against plain numpy, clamp semantics, lm-eval's steered (.pt)
against ours (.safetensors, never unpickled), LEACE's zero cross-covariance, and hook vs folded LEACE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from debias_plugin.errors import DebiasError

PAIRS = 24


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory):
    """made(name, model kind, **options) -> output folder (built once per name)."""
    from debias_plugin.methods.direction import DirectionOptions, DirectionStage

    root, built = tmp_path_factory.mktemp("direction"), {}

    def make(name: str, kind: str = "llama", **options):
        if name not in built:
            opts = DirectionOptions(max_pairs=PAIRS, **options)
            built[name] = DirectionStage(opts).make(tiny_model(kind), root / name, progress=False)
        return built[name]

    return make


def _numpy_states(model_dir, sentences):
    """Each sentence alone, lm-eval style: [BOS] + tokens; block 0's output and the final norm's, mean over tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    first, final = [], []
    for sentence in sentences:
        ids = tokenizer(sentence)["input_ids"]
        ids = ids if ids[0] == tokenizer.bos_token_id else [tokenizer.bos_token_id] + ids
        with torch.no_grad():
            states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        first.append(states[1][0, 1:].double().numpy().mean(0))  # hidden_states[1]: block 0's output
        final.append(states[-1][0, 1:].double().numpy().mean(0))  # after the final norm: the head's input
    return {"layers.0": np.array(first), "norm": np.array(final)}


@pytest.fixture(scope="module")
def numpy_states(tiny_model):
    from debias_plugin.data.pairs import load_pairs

    pairs = load_pairs("winogender")[:PAIRS]
    states = _numpy_states(tiny_model("llama"), [p.advantaged for p in pairs] + [p.disadvantaged for p in pairs])
    return {point: (rows[:PAIRS], rows[PAIRS:]) for point, rows in states.items()}


def _pt(folder):
    return torch.load(folder / "steer.pt", weights_only=False)  # lm-eval's own format, read as lm-eval reads it


def test_mean_difference_and_pca_equal_numpy(made, numpy_states):
    from debias_plugin.lm_eval.steered_safe import read_steering
    from debias_plugin.outputs import read_manifest

    for estimator in ("mean_difference", "pca"):
        folder = made(estimator, layers=["0", "final"], estimator=estimator)
        pt, (safe, erase) = _pt(folder), read_steering(folder / "steer.safetensors")
        assert set(pt) == set(safe) == {"layers.0", "norm"} and not erase
        inputs = read_manifest(folder)["inputs"]
        assert set(inputs) == {"model", "pairs"} and inputs["pairs"]["path"].endswith("all_sentences.tsv")
        for point, (a, b) in numpy_states.items():
            differences = a - b
            if estimator == "mean_difference":
                expected = differences.mean(0)
            else:
                expected = np.linalg.svd(differences, full_matrices=False)[2][0]
                expected *= np.sign(expected @ differences.mean(0))
            entry = pt[point]
            assert entry["action"] == "clamp" and entry["steering_coefficient"] == 0.0
            assert entry["bias"] is None and entry["head_index"] is None
            np.testing.assert_allclose(entry["steering_vector"].double().numpy(), expected, rtol=2e-3,
                                       atol=2e-4 * np.abs(expected).max())
            assert torch.equal(safe[point]["steering_vector"], entry["steering_vector"])
            assert {k: v for k, v in safe[point].items() if k != "steering_vector"} == {
                k: v for k, v in entry.items() if k != "steering_vector"}


def _hooked_outputs(lm, points, text="The engineer told the nurse that she was late."):
    """The hookpoints' outputs as the steered forward pass produces them (our capture runs after the steering)."""
    from lm_eval.models.hf_steered import steer

    seen = {}
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with steer(lm.model, lm.hook_to_steer):
        handles = [lm.model.base_model.get_submodule(p).register_forward_hook(
            lambda _m, _a, out, p=p: seen.__setitem__(p, out[0] if isinstance(out, tuple) else out)) for p in points]
        try:
            with torch.no_grad():
                lm.model(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()
    return seen


def test_clamp_sets_every_projection_to_the_coefficient(made, tiny_model):
    from debias_plugin.lm_eval.steered_safe import SafeSteeredModel

    for name, center in (("clamp", False), ("clamp_centred", True)):
        folder = made(name, layers=["0", "final"], coefficient=0.75, center=center)
        lm = SafeSteeredModel(pretrained=str(tiny_model("llama")), steer_path=str(folder / "steer.safetensors"),
                              device="cpu", batch_size=1)
        entries = _pt(folder)
        for point, output in _hooked_outputs(lm, entries).items():
            vector, bias = entries[point]["steering_vector"], entries[point]["bias"]
            unit = vector / vector.norm()
            shifted = output if bias is None else output - bias
            projections = shifted @ unit
            assert projections.numel() > 5
            torch.testing.assert_close(projections, torch.full_like(projections, 0.75), atol=1e-4, rtol=0)


def test_rank_k_projection_removes_every_component(made, tiny_model):
    from debias_plugin.lm_eval.steered_safe import SafeSteeredModel, read_steering

    folder = made("pca3", layers=["1"], estimator="pca", rank=3)
    assert not (folder / "steer.pt").exists()  # lm-eval's format holds one direction per hookpoint
    _, erase = read_steering(folder / "steer.safetensors")
    left, right, bias = erase["layers.1"]
    assert bias is None and torch.allclose(left.T, right)
    torch.testing.assert_close(right @ left, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal
    lm = SafeSteeredModel(pretrained=str(tiny_model("llama")), steer_path=str(folder / "steer.safetensors"),
                          device="cpu", batch_size=1)
    output = _hooked_outputs(lm, ["layers.1"])["layers.1"]
    assert float((output @ left).abs().max()) < 1e-4 * float(output.abs().max())


def test_lm_eval_steered_and_ours_score_the_same_without_unpickling(made, tiny_model, monkeypatch):
    from debias_plugin.lm_eval.run import evaluate_tasks

    folder = made("add", layers=["0", "1"], action="add", coefficient=-40.0)
    model_dir = tiny_model("llama")
    tasks = ["crows_bias_gender"]

    def run(model_class, steer_file):
        results = evaluate_tasks(model_dir, tasks, model_class=model_class, model_args={"steer_path": str(steer_file)},
                                 batch_size=4, limit=6, device="cpu")
        return results["results"], [s["resps"] for s in results["samples"]["crows_bias_gender"]]

    theirs = run("steered", folder / "steer.pt")
    from debias_plugin.methods.direction import DirectionOptions, DirectionStage

    stage = DirectionStage(DirectionOptions(layers=["0"]))
    assert stage.evaluated_as(model_dir, folder) == (model_dir, "hf-steered-safe",
                                                     {"steer_path": str(folder / "steer.safetensors")})

    def refuse(*args, **kwargs):
        raise AssertionError("hf-steered-safe called torch.load")

    monkeypatch.setattr(torch, "load", refuse)
    ours = run("hf-steered-safe", folder / "steer.safetensors")
    assert ours[1] == theirs[1]
    assert ours[0]["crows_bias_gender"] == theirs[0]["crows_bias_gender"]
    with pytest.raises(DebiasError, match="never unpickles"):
        run("hf-steered-safe", folder / "steer.pt")


def test_steering_changes_the_scores(made, tiny_model):
    """The steered scores above are not the base's: the hooks were applied."""
    from debias_plugin.lm_eval.steered_safe import SafeSteeredModel

    folder = made("add", layers=["0", "1"], action="add", coefficient=-40.0)
    lm = SafeSteeredModel(pretrained=str(tiny_model("llama")), steer_path=str(folder / "steer.safetensors"),
                          device="cpu", batch_size=1)
    ids = lm.tokenizer("The doctor said she was late.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        steered, base = lm._model_call(ids), lm.model(input_ids=ids).logits
    assert not torch.allclose(steered, base, atol=1e-3)


def test_leace_erases_the_label_covariance(made, tiny_model):
    from debias_plugin.data.pairs import load_pairs
    from debias_plugin.lm_eval.steered_safe import read_steering
    from debias_plugin.methods.direction import fit_leace, hidden_states
    from debias_plugin.models import load_model

    folder = made("leace", layers=["0", "final"], estimator="leace")
    assert not (folder / "steer.pt").exists()
    _, erase = read_steering(folder / "steer.safetensors")
    model, tokenizer, _ = load_model(tiny_model("llama"))
    pairs = load_pairs("winogender")[:PAIRS]
    sentences = [p.advantaged for p in pairs] + [p.disadvantaged for p in pairs]
    states = hidden_states(model, tokenizer, sentences, ["layers.0", "norm"], max_length=128, batch_size=16)
    labels = np.r_[np.ones(PAIRS), np.zeros(PAIRS)]

    def cross_covariance(x):
        return ((x - x.mean(0)) * (labels - labels.mean())[:, None]).mean(0)

    for point, x in states.items():
        before = np.abs(cross_covariance(x.numpy())).max()
        exact = fit_leace(x[:PAIRS], x[PAIRS:])  # float64, as fitted
        assert np.abs(cross_covariance(exact(x).numpy())).max() < 1e-9 * before
        left, right, bias = (t.double() for t in erase[point])  # the file's float32 copy
        erased = (x - ((x - bias) @ right.T) @ left.T).numpy()
        assert np.abs(cross_covariance(erased)).max() < 1e-4 * before, point


def test_leace_hook_equals_folded_head(made, tiny_model):
    from transformers import AutoModelForCausalLM

    from debias_plugin.lm_eval.steered_safe import SafeSteeredModel
    from debias_plugin.outputs import read_manifest

    options = dict(layers=["final"], estimator="leace", affine=False)
    hooked, folded = made("leace_hook", "gpt2", **options), made("leace_fold", "gpt2", fold=True, **options)
    assert read_manifest(folded)["results"]["folded_into"] == "lm_head"
    base_dir = tiny_model("gpt2")
    lm = SafeSteeredModel(pretrained=str(base_dir), steer_path=str(hooked / "steer.safetensors"), device="cpu",
                          batch_size=1)
    assert list(lm.hook_to_steer) == ["ln_f"]
    model = AutoModelForCausalLM.from_pretrained(folded).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert base.config.tie_word_embeddings and not model.config.tie_word_embeddings  # untied to fold
    assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
    ids = lm.tokenizer("The secretary called the mechanic because he was late.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hook_logits, folded_logits, base_logits = lm._model_call(ids), model(input_ids=ids).logits, base(
            input_ids=ids).logits
    torch.testing.assert_close(folded_logits, hook_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(folded_logits, base_logits, atol=1e-4)


def test_counterfactual_swaps():
    from debias_plugin.methods.direction import counterfactual_pairs

    groups = [["he", "she"], ["man", "woman"], ["black", "caucasian", "asian"]]
    pairs = counterfactual_pairs(["She said the man was late.", "Nothing to swap here.", "He is asian"],
                                 groups, "comments.csv")
    assert [(p.advantaged, p.disadvantaged) for p in pairs] == [
        ("He said the man was late.", "She said the woman was late."), ("He is black", "She is caucasian")]
    assert pairs[1].origin == "comments.csv, text 3"


def test_crows_refused(tmp_path, data_dir):
    from debias_plugin.cli import main
    from debias_plugin.methods.direction import DirectionOptions, read_pairs

    with pytest.raises(ValueError, match="CrowS-Pairs is the evaluation set"):
        DirectionOptions(pairs="crows", layers=["0"])
    crows_file = data_dir / "crows_pairs" / "crows_pairs_anonymized.csv"
    with pytest.raises(DebiasError, match="CrowS-style file"):
        read_pairs(DirectionOptions(pairs=str(crows_file), layers=["0"]))
    reused = tmp_path / "pairs.csv"
    from debias_plugin.data import load_crows_pairs

    crows = load_crows_pairs()[0]
    reused.write_text(f'advantaged,disadvantaged\n"{crows.sent_more}","{crows.sent_less}"\n')
    with pytest.raises(DebiasError, match="reuse CrowS-Pairs sentences"):
        read_pairs(DirectionOptions(pairs=str(reused), layers=["0"]))
    with pytest.raises(SystemExit) as exit_info:
        main(["direction", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--pairs", "crows",
              "--layers", "0"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("options, message", [
    (dict(estimator="leace", coefficient=1.0), "leace erases"),
    (dict(fold=True, estimator="leace", affine=False, layers=["0"]), "fold is exact only"),
    (dict(fold=True, estimator="leace", layers=["final"]), "fold is exact only"),
    (dict(rank=2), "rank above 1"),
    (dict(action="add", center=True), "add action takes no bias"),
    (dict(layers=["x"]), "neither a block number"),
])
def test_option_combinations_refused(options, message):
    from debias_plugin.methods.direction import DirectionOptions

    with pytest.raises(ValueError, match=message):
        DirectionOptions(**{"layers": ["0"], **options})


def test_bad_steering_files_are_one_clear_error(tmp_path, made, tiny_model):
    from safetensors.torch import save_file

    from debias_plugin.errors import DataError
    from debias_plugin.lm_eval.steered_safe import SafeSteeredModel, read_steering

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(DataError, match="header field 'format'"):
        read_steering(foreign)
    with pytest.raises(DebiasError, match="not modules of"):  # a llama file on gpt2 (h.N, not layers.N)
        SafeSteeredModel(pretrained=str(tiny_model("gpt2")),
                         steer_path=str(made("clamp", layers=["0", "final"], coefficient=0.75) / "steer.safetensors"),
                         device="cpu")
