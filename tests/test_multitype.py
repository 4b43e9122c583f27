"""Issue 38, multi-type removal: several bias vectors negated together (one lambda each, task_arithmetic or TIES),
the negate stage's per-source lambdas, and the transfer heat map's smoke run."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from debias_plugin.errors import DebiasError
from debias_plugin.merge import BASE_PLACEHOLDER, CONFIG_NAME, MANIFEST_NAME, negate
from test_negate import fill, load, perturbed_copy, run_yaml, state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multitype")


@pytest.fixture(scope="module")
def models(tiny_model, work):
    """A llama base and three 'biased' copies with different perturbations."""
    base = tiny_model("llama")
    return base, [perturbed_copy("llama", base, work / f"biased_{i}", seed=20 + i) for i in range(3)]


def adapter(base: Path, out: Path, seed: int) -> Path:
    """A peft LoRA adapter with a seeded nonzero lora_B."""
    from peft import LoraConfig, get_peft_model

    if not out.exists():
        model = get_peft_model(load("llama", base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(out)
    return out


def expected_sum(base: Path, coefficients: dict[Path, float]) -> dict[str, torch.Tensor]:
    """theta = base - sum_k lambda_k * (theta_k - base), in plain torch."""
    base_state = state(load("llama", base))
    others = {path: state(load("llama", path)) for path in coefficients}
    return {name: tensor - sum(lam * (others[p][name] - tensor) for p, lam in coefficients.items())
            for name, tensor in base_state.items()}


def assert_state(out: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load("llama", out).state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_several_biased_models_are_negated_together_exactly(models, work):
    base, biased = models
    lams = [0.25, 0.5, 0.1]
    [out] = negate(base, biased=biased, lambdas=lams, out=work / "multi", progress=False)
    assert out == (work / "multi").resolve()
    assert_state(out, expected_sum(base, dict(zip(biased, lams))))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["options"]["lambda"] == lams and manifest["results"]["formula"].startswith("theta = base - sum_k")
    assert [manifest["inputs"][f"biased_{k}"]["path"] for k in (1, 2, 3)] == [str(p.resolve()) for p in biased]
    rendered = yaml.safe_load((out / CONFIG_NAME).read_text())
    assert [e["parameters"]["weight"] for e in rendered["models"]] == [-0.25, -0.5, -0.1]
    assert rendered["parameters"]["normalize"] is False
    assert "lambdas = 0.25, 0.5, 0.1" in (out / CONFIG_NAME).read_text()


def test_row_blocks_change_no_bit_with_several_models(models, work, monkeypatch):
    from debias_plugin.merge import engine

    base, biased = models
    outputs = []
    for label, chunk in (("whole", 1 << 40), ("chunked", 100)):
        monkeypatch.setattr(engine, "CHUNK_ELEMENTS", chunk)
        outputs.append(state(load("llama", negate(base, biased=biased[:2], lambdas=[0.3, 0.7],
                                                  out=work / f"multi_{label}", progress=False)[0])))
    for name, tensor in outputs[0].items():
        assert torch.equal(tensor, outputs[1][name]), name


def test_several_adapters_through_the_cli_equal_the_merged_adapters(models, work):
    from peft import PeftModel

    from debias_plugin.cli import main

    base, _ = models
    adapters = [adapter(base, work / f"adapter_{i}", seed=30 + i) for i in range(2)]
    merged = []
    for i, path in enumerate(adapters):
        target = work / f"merged_{i}"
        if not target.exists():
            PeftModel.from_pretrained(load("llama", base), path).merge_and_unload().save_pretrained(target)
        merged.append(target)
    out = work / "multi_cli"
    main(["negate", "--base", str(base), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
          "--lambda", "0.25", "--lambda", "0.75", "--out", str(out), "--quiet"])
    assert_state(out, expected_sum(base, {merged[0]: 0.25, merged[1]: 0.75}))
    text = (out / CONFIG_NAME).read_text()
    assert text.count(f"{base}+") == 2 and "--lora-merge-cache" in text  # re-runnable by hand, adapters named


def ties_weighted(base: torch.Tensor, models: list[torch.Tensor], weights: list[float], density: float):
    """TIES with weights and normalize: false, written out: trim each vector, scale, elect sign, sum the agreeing."""
    trimmed = []
    for model, weight in zip(models, weights):
        tau = (model - base).flatten()
        keep = torch.zeros_like(tau)
        keep[tau.abs().topk(max(1, int(density * tau.numel()))).indices] = 1
        trimmed.append(weight * tau * keep)
    stacked = torch.stack(trimmed)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    return (stacked * (torch.sign(stacked) == elected)).sum(0).reshape(base.shape)


def test_ties_option_is_mergekits_own_ties(models, work):
    base, biased = models
    lams = [0.5, 0.25]
    [out] = negate(base, biased=biased[:2], lambdas=lams, out=work / "ties", method="ties", progress=False)
    # mergekit's own TIES on the same config, written by hand
    config = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
              "parameters": {"normalize": False, "lambda": -1.0},
              "models": [{"model": str(p), "parameters": {"weight": lam, "density": 0.2}}
                         for p, lam in zip(biased, lams)]}
    path = work / "ties_by_hand.yml"
    path.write_text(yaml.safe_dump(config))
    run_yaml(path, work / "ties_by_hand")
    mine, theirs = state(load("llama", out)), state(load("llama", work / "ties_by_hand"))
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name
    base_state, others = state(load("llama", base)), [state(load("llama", p)) for p in biased[:2]]
    for name, tensor in base_state.items():
        merged = ties_weighted(tensor, [o[name] for o in others], lams, 0.2)
        torch.testing.assert_close(mine[name], tensor - merged, rtol=0, atol=1e-6, msg=name)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["options"]["method"] == "ties" and manifest["results"]["merge_method"] == "ties"


def test_ties_at_full_density_on_one_vector_is_the_plain_negation(models, work, tmp_path):
    base, biased = models
    text = (REPO / "merge_configs/negate_ties.yml").read_text().replace("density: 0.2", "density: 1.0")
    template = tmp_path / "ties_dense.yml"
    template.write_text(text)
    [out] = negate(base, biased=biased[0], lambdas=[0.4], out=work / "ties_one", method="ties", template=template,
                   progress=False)
    assert_state(out, expected_sum(base, {biased[0]: 0.4}))


def test_negate_multi_lambda_yml_runs_with_mergekit_yaml(models, work):
    base, biased = models
    paths = {f"/path/to/{t}_biased_model": p for t, p in zip(("race", "religion", "gender"), biased)}
    config = fill("negate_multi_lambda.yml", {BASE_PLACEHOLDER: base, **paths}, work / "multi_lambda.yml")
    run_yaml(config, work / "yaml_multi_lambda")
    assert_state(work / "yaml_multi_lambda", expected_sum(base, dict(zip(biased, [0.25, 0.25, 0.1]))))


@pytest.mark.parametrize("kwargs, message", [
    ({"lambdas": [0.5]}, r"3 --biased sources but 1 --lambda values \(\[0.5\]\): pass one --lambda per source"),
    ({"lambdas": [0.5, 0.5, 0.5, 0.5]}, "3 --biased sources but 4 --lambda"),
    ({"lambdas": [0.5, -1, 0.5]}, "lambda must be a positive number"),
    ({"lambdas": [0.5, 0.5, 0.5], "method": "dare"}, "method must be one of task_arithmetic, ties"),
    ({"lambdas": [0.5, 0.5, 0.5], "method": "ties", "capability": "C", "mu": 0.5}, "ties with --capability"),
])
def test_mismatched_or_bad_multi_options_are_refused_before_writing(kwargs, message, models, work):
    base, biased = models
    kwargs = {k: (biased[0] if v == "C" else v) for k, v in kwargs.items()}
    with pytest.raises(DebiasError, match=message):
        negate(base, biased=biased, out=work / "refused", progress=False, **kwargs)
    assert not (work / "refused").exists()


def test_the_same_source_twice_is_refused(models, work):
    base, biased = models
    with pytest.raises(DebiasError, match="given twice"):
        negate(base, biased=[biased[0], biased[0]], lambdas=[0.1, 0.2], out=work / "twice", progress=False)


def test_cli_count_mismatch_exits_2_without_traceback(models, work, capsys):
    from debias_plugin.cli import main

    base, biased = models
    with pytest.raises(SystemExit) as exit_info:
        main(["negate", "--base", str(base), "--biased", str(biased[0]), "--biased", str(biased[1]),
              "--lambda", "0.5", "--out", str(work / "cli_refused")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "2 --biased sources but 1 --lambda" in err and "Traceback" not in err


def test_negate_options_take_one_lambda_per_source_as_sweep_knobs(models, work):
    from pydantic import ValidationError

    from debias_plugin.merge.stage import NegateOptions, NegateStage

    base, biased = models
    options = NegateOptions.model_validate({"biased": [str(p) for p in biased[:2]], "lambda": 0.3, "lambda_2": 0.6})
    assert options.lambdas == [0.3, 0.6]
    with pytest.raises(ValidationError, match=re.escape("2 biased source(s) need one lambda each: lambda, lambda_2 "
                                                        "(found lambda)")):
        NegateOptions.model_validate({"biased": [str(p) for p in biased[:2]], "lambda": 0.3})
    with pytest.raises(ValidationError, match="need one lambda each"):
        NegateOptions.model_validate({"biased": str(biased[0]), "lambda": 0.3, "lambda_2": 0.1})
    with pytest.raises(ValidationError, match="lambda must be a number >= 0"):
        NegateOptions.model_validate({"biased": [str(p) for p in biased[:2]], "lambda": 0.3, "lambda_2": -1})
    assert NegateStage.base_settings({"biased": ["/a", "/b", "/c"]}) == {"lambda": 0.0, "lambda_2": 0.0,
                                                                        "lambda_3": 0.0}
    assert NegateStage.base_settings({"biased": "/a"}) == {"lambda": 0.0}
    made = NegateStage(options).make(base, work / "stage_multi", progress=False)
    assert_state(made, expected_sum(base, {biased[0]: 0.3, biased[1]: 0.6}))
    zero = NegateOptions.model_validate({"biased": [str(p) for p in biased[:2]], "lambda": 0.0, "lambda_2": 0.6})
    assert_state(NegateStage(zero).make(base, work / "stage_zero", progress=False),  # lambda 0: that vector left out
                 expected_sum(base, {biased[1]: 0.6}))
    with pytest.raises(DebiasError, match="every lambda is 0"):
        NegateStage(NegateOptions.model_validate({"biased": [str(p) for p in biased[:2]], "lambda": 0,
                                                  "lambda_2": 0})).make(base, work / "stage_none", progress=False)


def test_transfer_heatmap_smoke(tiny_model, work, tmp_path):
    """Two vectors on a tiny model: fine-tune, negate, evaluate, table and plot; a rerun reads every step's cache."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import numpy as np

    import transfer_heatmap
    from debias_plugin.gate import stats

    args = ["--out", str(work / "heatmap"), "--model", str(tiny_model("llama")), "--steps", "2", "--limit", "4",
            "--results", str(tmp_path), "--label", "tiny", "--vectors", "reddit_race_black,dghs_women"]
    report = transfer_heatmap.main(args)
    assert (tmp_path / "issue38_transfer_tiny.png").is_file() and report["pending"] == []
    assert set(report["cells"]) == {"reddit_race_black", "dghs_women"} and report["lambda"] == 0.25
    assert json.loads((tmp_path / "issue38_transfer_tiny.json").read_text())["cells"] == \
        json.loads(json.dumps(report["cells"]))
    base = json.loads((work / "heatmap/outcomes/base.json").read_text())["types"]["gender"]
    negated = json.loads((work / "heatmap/outcomes/dghs_women_lambda_0.25.json").read_text())["types"]["gender"]
    assert negated["keys"] == base["keys"]
    c, b = np.array(negated["outcome"]), np.array(base["outcome"])
    cell = report["cells"]["dghs_women"]["gender"]
    assert cell["change"] == round(100 * c.mean() - 100 * b.mean(), 2)
    gained, lost = int(np.sum(c & ~b)), int(np.sum(~c & b))
    assert cell["discordant"] == [gained, lost]
    assert cell["p_change"] == min(1.0, 2 * min(stats.sign_test_p(gained, lost), stats.sign_test_p(lost, gained)))
    again = transfer_heatmap.main(args)  # every step cached: the same table
    assert again["cells"] == report["cells"] and again["timings"] == report["timings"]
    partial = transfer_heatmap.main([*args[:-1], "reddit_race_black,reddit_religion_jews", "--report-only"])
    assert list(partial["cells"]) == ["reddit_race_black"] and partial["pending"] == ["reddit_religion_jews"]
    assert not (work / "heatmap/adapters/reddit_religion_jews").exists()


def test_a_sweep_searches_the_lambdas_jointly(tmp_path):
    """The sweep-file form: a list of sources in fixed, each lambda a knob of the several-knob search."""
    from debias_plugin.sweep.plan import load_sweep

    text = """\
base: /m
method: negate
fixed: {adapter: [/race, /religion, /gender], lambda_3: 0.1}
search: {sampler: tpe, trials: 6, knobs: {lambda: {low: 0, high: 0.5}, lambda_2: {low: 0, high: 0.5}}}
evaluate: [crows_bias, wikitext2_ppl]
objective: crows_bias/pct_stereotype
budget: {wikitext2_ppl/word_perplexity: {max_relative_increase: 0.02}}
"""
    path = tmp_path / "multi.yml"
    path.write_text(text)
    sweep = load_sweep(path)
    assert list(sweep.sampling.knobs) == ["lambda", "lambda_2"]
    assert sweep.base_settings == {"lambda": 0.0, "lambda_2": 0.0, "lambda_3": 0.0}
    path.write_text(text.replace(", lambda_3: 0.1", ""))
    with pytest.raises(Exception, match="need one lambda each"):
        load_sweep(path)


def test_unlearning_word_list_is_the_union_of_several_domains():
    from debias_plugin.data import domain_words, load_attribute_words
    from debias_plugin.methods.unlearn import load_word_list

    table = load_attribute_words()
    words, _ = load_word_list(None, ["race", "religion"])
    assert words == domain_words(table, "race") | domain_words(table, "religion")
    assert {"black", "muslims", "synagogue"} <= words and "women" not in words


@pytest.mark.parametrize("stage", ["unlearn", "npo"])
def test_repeated_domain_flags_unlearn_every_domain(stage, tiny_model, tmp_path):
    from debias_plugin.cli import main

    corpus = tmp_path / "forget.txt"
    corpus.write_text("The muslims went home early.\nBlack cats are said to be unlucky.\nShe likes tea today.\n")
    out = tmp_path / stage
    main([stage, "--model", str(tiny_model("llama")), "--output", str(out), "--corpus", str(corpus),
          "--domain", "race", "--domain", "religion", "--steps", "1", "--batch-size", "2", "--max-length", "32"])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    text = json.dumps(manifest)
    assert '"domains": ["race", "religion"]' in text
    assert '"texts_with_targets": 2' in text and '"texts_without_targets": 1' in text
