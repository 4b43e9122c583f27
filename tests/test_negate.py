"""Bias-vector negation: exactness against base - lambda * (biased - base), the bundled YAMLs, and bad input."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from debias_plugin.errors import DataError, DebiasError
from debias_plugin.merge import (
    ADAPTER_PLACEHOLDER, BASE_PLACEHOLDER, BIASED_PLACEHOLDER, CONFIG_NAME, MANIFEST_NAME, load_template, negate,
    validate_negation_config,
)
from debias_plugin.paths import merge_configs_dir
from tiny_models import CAUSAL_KINDS

KINDS = ["llama", "gpt2", "opt", "bert", "roberta", "albert"]
LORA_TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"], "opt": ["q_proj", "fc1"],
                "bert": ["query", "value", "dense"], "roberta": ["query", "value"], "albert": ["query", "ffn"]}


def auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForCausalLM if kind in CAUSAL_KINDS else AutoModelForMaskedLM


def load(kind: str, folder: Path):
    return auto_class(kind).from_pretrained(folder, dtype=torch.float32).eval()


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def perturbed_copy(kind: str, base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A 'biased' model: the base plus a deterministic perturbation of every weight, saved as safetensors."""
    if not out.exists():
        model = load(kind, base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():  # tied weights appear once, so they stay tied
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(out, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(base / name, out / name)
    return out


def lora_adapter(kind: str, base: Path, out: Path) -> Path:
    """A peft LoRA adapter with nonzero lora_B (peft starts B at zero, which would be a zero bias vector)."""
    from peft import LoraConfig, get_peft_model

    if not out.exists():
        model = get_peft_model(load(kind, base), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[kind],
                                                            fan_in_fan_out=kind == "gpt2"))
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("negate")


def assert_negation(kind: str, out: Path, base_state: dict, biased_state: dict, lam: float) -> None:
    """Reload the output with from_pretrained: every tensor equals base - lam * (biased - base); ties hold."""
    result = load(kind, out)
    got = result.state_dict()
    assert set(got) == set(base_state)
    for name, base_tensor in base_state.items():
        expected = base_tensor - lam * (biased_state[name] - base_tensor)
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6, msg=f"{kind} {name}")
    if result.config.tie_word_embeddings and result.get_output_embeddings() is not None:
        assert torch.equal(result.get_output_embeddings().weight, result.get_input_embeddings().weight)
    assert (out / CONFIG_NAME).is_file() and (out / MANIFEST_NAME).is_file()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["stage"] == "negate" and manifest["options"]["lambda"] == lam
    assert manifest["results"]["tensors"] > 0 and manifest["results"]["formula"].startswith("theta = base")
    rendered = yaml.safe_load((out / CONFIG_NAME).read_text())
    assert rendered["parameters"]["normalize"] is False
    assert rendered["models"][0]["parameters"]["weight"] == pytest.approx(-lam)


@pytest.mark.parametrize("kind", KINDS)
def test_negation_from_full_model_is_exact(kind, tiny_model, work):
    base = tiny_model(kind)
    biased = perturbed_copy(kind, base, work / f"{kind}_biased", seed=1)
    out = negate(base, biased=biased, lambdas=[0.7], out=work / f"{kind}_negated", progress=False)
    assert out == [(work / f"{kind}_negated").resolve()]
    assert_negation(kind, out[0], state(load(kind, base)), state(load(kind, biased)), 0.7)
    if kind == "gpt2":  # the tied output embedding is the negated input embedding, not a stale copy
        result = load(kind, out[0])
        assert result.lm_head.weight.data_ptr() == result.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_row_chunked_merge_is_bit_identical_to_whole_tensors(kind, tiny_model, work, monkeypatch):
    """The memory-saving row blocks (on for big tensors) change no bit, tied embeddings included."""
    from debias_plugin.merge import engine

    base = tiny_model(kind)
    biased = perturbed_copy(kind, base, work / f"{kind}_biased", seed=1)
    outputs = {}
    for label, chunk in (("whole", 1 << 40), ("chunked", 100)):
        monkeypatch.setattr(engine, "CHUNK_ELEMENTS", chunk)
        outputs[label] = state(load(kind, negate(base, biased=biased, lambdas=[0.7],
                                                 out=work / f"{kind}_{label}", progress=False)[0]))
    assert set(outputs["whole"]) == set(outputs["chunked"])
    for name, tensor in outputs["whole"].items():
        assert torch.equal(tensor, outputs["chunked"][name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_negation_from_lora_adapter_is_exact_for_each_lambda(kind, tiny_model, work):
    from peft import PeftModel

    base = tiny_model(kind)
    adapter = lora_adapter(kind, base, work / f"{kind}_adapter")
    merged = state(PeftModel.from_pretrained(load(kind, base), adapter).merge_and_unload())
    base_state = state(load(kind, base))
    assert any(not torch.equal(merged[n], base_state[n]) for n in base_state)  # a real bias vector
    outs = negate(base, adapter=adapter, lambdas=["0.5", 2], out=work / f"{kind}_lora_negated", progress=False)
    assert [p.name for p in outs] == ["lambda_0.5", "lambda_2"]
    for out, lam in zip(outs, (0.5, 2.0)):
        assert_negation(kind, out, base_state, merged, lam)
        assert json.loads((out / MANIFEST_NAME).read_text())["inputs"]["adapter"]["path"] == str(adapter.resolve())


def test_cli_writes_and_refuses_to_overwrite_without_force(tiny_model, work):
    from debias_plugin.cli import main

    base = tiny_model("llama")
    biased = perturbed_copy("llama", base, work / "llama_biased", seed=1)
    out = work / "cli_out"
    main(["negate", "--base", str(base), "--biased", str(biased), "--lambda", "1.5", "--out", str(out), "--quiet"])
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["negate", "--base", str(base), "--biased", str(biased), "--lambda", "0.5", "--out", str(out)])
    assert exit_info.value.code == 2
    assert (out / "model.safetensors").read_bytes() == first
    main(["negate", "--base", str(base), "--biased", str(biased), "--lambda", "0.5", "--out", str(out), "--force",
          "--quiet"])
    assert json.loads((out / MANIFEST_NAME).read_text())["options"]["lambda"] == 0.5
    assert not [p for p in work.iterdir() if p.name.startswith(".cli_out")]  # no temp folders left behind


# ------------------------------------------------------------------------------------------- bad input

def test_a_repeated_lambda_is_quoted_as_given_even_from_a_generator(work):
    from debias_plugin.errors import DebiasError
    from debias_plugin.merge import negate

    with pytest.raises(DebiasError, match=re.escape("(got ['0.5', '0.5'])")):
        negate(work / "base", lambdas=(value for value in ("0.5", "0.5")), out=work / "out", biased=work / "b")


@pytest.mark.parametrize("value, message", [("-0.5", "positive"), ("0", "positive"), ("abc", "number"),
                                            ("nan", "positive")])
def test_bad_lambda_exits_before_writing(value, message, tiny_model, work, capsys):
    from debias_plugin.cli import main

    base = tiny_model("llama")
    out = work / "bad_lambda"
    with pytest.raises(SystemExit) as exit_info:
        main(["negate", "--base", str(base), "--biased", str(work / "llama_biased"), f"--lambda={value}",
              "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_mismatched_architectures_are_refused(tiny_model, work):
    out = work / "mismatch"
    with pytest.raises(DebiasError, match="Mismatched architectures"):
        negate(tiny_model("llama"), biased=tiny_model("gpt2"), lambdas=[1], out=out, progress=False)
    with pytest.raises(DebiasError, match="Mismatched architectures"):
        negate(tiny_model("llama"), adapter=lora_adapter("gpt2", tiny_model("gpt2"), work / "gpt2_adapter"),
               lambdas=[1], out=out, progress=False)
    assert not out.exists()


def test_mismatched_shapes_are_refused(tiny_model, tokenizer_texts, work):
    from tiny_models import build_tiny_model

    narrow = build_tiny_model("llama", work / "llama_narrow", tokenizer_texts, hidden=32)
    out = work / "shapes"
    with pytest.raises(DebiasError, match="shapes differ"):
        negate(tiny_model("llama"), biased=narrow, lambdas=[1], out=out, progress=False)
    assert not out.exists()


def test_missing_shard_is_refused(tiny_model, work):
    base = tiny_model("llama")
    sharded = work / "llama_sharded"
    load("llama", base).save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    out = work / "missing_shard"
    with pytest.raises(DebiasError, match=f"missing.*{shards[-1].name}"):
        negate(base, biased=sharded, lambdas=[1], out=out, progress=False)
    assert not out.exists()


def test_pickle_only_model_is_refused(tiny_model, work):
    base = tiny_model("llama")
    pickled = work / "llama_pickle"
    pickled.mkdir()
    shutil.copy(base / "config.json", pickled)
    torch.save(load("llama", base).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(DebiasError, match="pickle"):
        negate(base, biased=pickled, lambdas=[1], out=work / "pickle_out", progress=False)
    assert not (work / "pickle_out").exists()


@pytest.mark.parametrize("edit, message", [
    ({"parameters": {"normalize": True}}, "#213"),           # cancels the negation: result = biased model
    ({"weight": 1.0}, "ADDED"),                             # adds the bias vector
    ({"parameters": {"normalize": False, "lambda": -1.0}}, "ADDED"),  # two minus signs make a plus
    ({"merge_method": "linear"}, "not checked"),
])
def test_config_that_would_not_negate_is_refused(edit, message, tiny_model, work):
    template = yaml.safe_load((merge_configs_dir() / "negate.yml").read_text())
    if "weight" in edit:
        template["models"][0]["parameters"]["weight"] = edit["weight"]
    if "parameters" in edit:
        template["parameters"] = edit["parameters"]
    if "merge_method" in edit:
        template["merge_method"] = edit["merge_method"]
    path = work / "bad_template.yml"
    path.write_text(yaml.safe_dump(template))
    out = work / "bad_template_out"
    biased = perturbed_copy("llama", tiny_model("llama"), work / "llama_biased", seed=1)
    with pytest.raises(DebiasError, match=message):
        negate(tiny_model("llama"), biased=biased, lambdas=[1], out=out, template=path, progress=False)
    assert not out.exists()


def test_exactly_one_source_is_required(tiny_model, work):
    with pytest.raises(DebiasError, match="exactly one"):
        negate(tiny_model("llama"), lambdas=[1], out=work / "none", progress=False)


@pytest.mark.parametrize("old, new, key, why", [
    ("  normalize: false", "  normalise: false", "parameters.normalise", "not a parameter of task_arithmetic"),
    ("      weight: -1.0", "      weight: -1.0\n      wieght: 2.0", "models[0].parameters.wieght", "per-model"),
    ("      weight: -1.0", "      weight: -1.0\n      normalize: true", "models[0].parameters.normalize",
     "top-level parameters"),
    ("dtype: float32", "dtype: float32\nout_dtpye: bfloat16", "out_dtpye", "unknown key"),
    ("  - model: /path/to/biased_model", "  - model: /path/to/biased_model\n    paramters: {}", "models[0].paramters",
     "unknown key"),
    ("merge_method: task_arithmetic", "merge_method: task_arithmetc", "merge_method", "unknown method"),
])
def test_unknown_template_keys_are_refused_with_their_line(old, new, key, why, tiny_model, work, tmp_path):
    """A typo would otherwise be ignored by mergekit (the config then computes something else, silently)."""
    text = (merge_configs_dir() / "negate.yml").read_text()
    assert text.count(old) == 1
    text = text.replace(old, new)
    typo = new.splitlines()[-1].split(":")[0].strip()
    line = next(n for n, row in enumerate(text.splitlines(), start=1) if row.strip().startswith(typo + ":"))
    path = tmp_path / "typo.yml"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        negate(tiny_model("llama"), biased=perturbed_copy("llama", tiny_model("llama"), work / "llama_biased", 1),
               lambdas=[1], out=tmp_path / "out", template=path, progress=False)
    message = str(error.value)
    assert str(path) in message and f"{key} (line {line})" in message and why in message, message
    assert not (tmp_path / "out").exists()


def test_bundled_configs_pass_the_strict_key_check():
    for path in sorted(merge_configs_dir().glob("*.yml")):
        load_template(path)


def broken_copy(source: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def test_broken_inputs_are_data_errors_naming_the_file(tiny_model, work):
    base = tiny_model("llama")
    biased = perturbed_copy("llama", base, work / "llama_biased", seed=1)
    truncated = broken_copy(biased, work / "llama_truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    bad_config = broken_copy(biased, work / "llama_bad_config")
    (bad_config / "config.json").write_text('{"model_type": "llama",\n  oops}')
    adapter = broken_copy(lora_adapter("llama", base, work / "llama_adapter"), work / "llama_bad_adapter")
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA",\n')
    unknown_peft = broken_copy(adapter, work / "llama_unknown_peft")
    (unknown_peft / "adapter_config.json").write_text('{"peft_type": "NOT_A_PEFT_TYPE"}')
    cases = [({"biased": truncated}, weights, "complete safetensors"),
             ({"biased": bad_config}, bad_config / "config.json", "line 2"),
             ({"adapter": adapter}, adapter / "adapter_config.json", "line 2"),
             ({"adapter": unknown_peft}, unknown_peft / "adapter_config.json", "peft_type")]
    for source, named, where in cases:
        with pytest.raises(DataError) as error:
            negate(base, **source, lambdas=[1], out=work / "broken_out", progress=False)
        assert str(named.resolve()) in str(error.value) and where in str(error.value), str(error.value)
    assert not (work / "broken_out").exists()


def test_output_inside_an_input_is_refused_even_with_force(tiny_model, work):
    base = tiny_model("llama")
    biased = perturbed_copy("llama", base, work / "llama_biased", seed=1)
    for out in (biased / "negated", base):
        with pytest.raises(DebiasError, match="overlaps the input"):
            negate(base, biased=biased, lambdas=[1], out=out, force=True, progress=False)
    assert not (biased / "negated").exists()


def independent_tree_hash(folder: Path) -> str:
    """sha256 over (relative name, sha256 of the bytes) of every file in name order, our manifest excluded."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{hashlib.sha256(file.read_bytes()).hexdigest()}\0"
                      .encode())
    return digest.hexdigest()


def test_manifest_schema_and_stale_staging(tiny_model, work):
    """The shared manifest schema with hashed inputs; staging left by a dead process is removed first."""
    from debias_plugin.outputs import MANIFEST_SCHEMA

    base = tiny_model("llama")
    biased = perturbed_copy("llama", base, work / "llama_biased", seed=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = work / f".manifest_out.tmp-{int(dead.stdout)}-deadbeef"
    stale.mkdir()
    (out,) = negate(base, biased=biased, lambdas=["0.25"], out=work / "manifest_out", progress=False)
    assert not stale.exists()
    record = json.loads((out / MANIFEST_NAME).read_text())
    assert record["schema"] == MANIFEST_SCHEMA and record["stage"] == "negate"
    assert record["options"]["lambda"] == 0.25 and record["options"]["lambdas"] == [0.25]
    template = merge_configs_dir() / "negate.yml"
    assert record["inputs"] == {
        "base": {"path": str(base.resolve()), "sha256": independent_tree_hash(base)},
        "biased": {"path": str(biased.resolve()), "sha256": independent_tree_hash(biased)},
        "template": {"path": str(template.resolve()), "sha256": hashlib.sha256(template.read_bytes()).hexdigest()}}
    assert record["results"]["merge_method"] == "task_arithmetic_blocked"
    assert record["results"]["parameters"] == sum(t.numel() for t in load("llama", base).state_dict().values()
                                                  if t.data_ptr() != load("llama", base).lm_head.weight.data_ptr())
    assert {"merge_s", "verify_s", "hash_inputs_s"} <= set(record["timings"])
    assert {"mergekit", "torch", "safetensors"} <= set(record["packages"])


# ------------------------------------------------------------------------- the registered blocked method

def test_blocked_method_is_registered_and_bit_identical_to_task_arithmetic():
    """Called through mergekit's own registry and merge API, on shapes whose rows do not divide the block."""
    from mergekit import merge_methods
    from mergekit.merge_methods import TensorGroup

    import debias_plugin.merge.engine  # noqa: F401  (registers the method)

    plain, blocked = merge_methods.get("task_arithmetic"), merge_methods.get("task_arithmetic_blocked")
    assert blocked.spec.pretty_name == plain.spec.pretty_name
    generator = torch.Generator().manual_seed(3)
    for shape, dtype in (((1000, 37), torch.float32), ((333, 7, 5), torch.bfloat16), ((4097,), torch.float16)):
        tensors = [torch.randn(shape, generator=generator).to(dtype) for _ in range(3)]
        group = TensorGroup.from_tensors(tensors, ids=["base", "a", "b"], base_index=0)
        parameters = {"weight": {"a": -0.7, "b": 0.3}, "lambda": 0.9}
        expected = plain([group], parameters=parameters)[0]
        for block in (1, 100, 1 << 40):
            assert torch.equal(blocked([group], parameters={**parameters, "block_elements": block})[0], expected)


def test_negate_merges_in_blocks_and_patches_nothing(tiny_model, work, monkeypatch):
    """The run goes through our registered method; mergekit's own classes are untouched; the YAML stays plain."""
    from mergekit.merge_methods import GeneralizedTaskArithmeticMerge

    from debias_plugin.merge import engine

    whole_tensor = GeneralizedTaskArithmeticMerge.merge_group
    blocked_calls = []
    original = engine.BlockedTaskArithmetic.merge_group

    def counting(self, group, /, **parameters):
        blocked_calls.append(parameters["block_elements"])
        return original(self, group, **parameters)

    monkeypatch.setattr(engine.BlockedTaskArithmetic, "merge_group", counting)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 123)
    base = tiny_model("llama")
    (out,) = negate(base, biased=perturbed_copy("llama", base, work / "llama_biased", seed=1), lambdas=[1],
                    out=work / "blocked_out", progress=False)
    assert blocked_calls and set(blocked_calls) == {123}
    assert GeneralizedTaskArithmeticMerge.merge_group is whole_tensor
    rendered = yaml.safe_load((out / CONFIG_NAME).read_text())
    assert rendered["merge_method"] == "task_arithmetic" and "block_elements" not in rendered["parameters"]


# ------------------------------------------------------------------------------- the bundled YAML files

def fill(name: str, paths: dict[str, Path], target: Path) -> Path:
    """A merge_configs/ file with its placeholder paths replaced, as a user would edit it."""
    text = (merge_configs_dir() / name).read_text()
    for placeholder, path in sorted(paths.items(), key=lambda item: -len(item[0])):
        text = text.replace(placeholder, str(path))
    target.write_text(text)
    return target


def run_yaml(config_path: Path, out: Path, **options) -> None:
    """Exactly what `mergekit-yaml CONFIG OUT` does, in-process."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = config_path.read_text()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              MergeOptions(quiet=True, **options), config_source=text)


def test_bundled_configs_validate():
    bias = {"negate.yml": [BIASED_PLACEHOLDER], "negate_lora.yml": [f"{BASE_PLACEHOLDER}+{ADAPTER_PLACEHOLDER}"],
            "negate_and_retain.yml": [BIASED_PLACEHOLDER],
            "negate_and_retain_lora.yml": [f"{BASE_PLACEHOLDER}+{ADAPTER_PLACEHOLDER}"],
            "negate_multi.yml": [f"/path/to/{t}_biased_model" for t in ("gender", "race", "religion")],
            "negate_multi_lambda.yml": [f"/path/to/{t}_biased_model" for t in ("race", "religion", "gender")],
            "negate_ties.yml": [BIASED_PLACEHOLDER], "negate_ties_lora.yml": [f"{BASE_PLACEHOLDER}+{ADAPTER_PLACEHOLDER}"]}
    assert sorted(p.name for p in merge_configs_dir().glob("*.yml")) == sorted(bias)
    for name, bias_models in bias.items():
        config = yaml.safe_load((merge_configs_dir() / name).read_text())
        validate_negation_config(config, bias_models, source=name)


def test_negate_yml_runs_with_mergekit_yaml(tiny_model, work):
    base = tiny_model("llama")
    biased = perturbed_copy("llama", base, work / "llama_biased", seed=1)
    config = fill("negate.yml", {BASE_PLACEHOLDER: base, BIASED_PLACEHOLDER: biased}, work / "negate_filled.yml")
    out = work / "yaml_negate"
    script = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(script), str(config), str(out)], check=True, capture_output=True)
    assert_negation_plain(out, base, {biased: -1.0})


def assert_negation_plain(out: Path, base: Path, coefficients: dict[Path, float]) -> None:
    """out == base + sum_i c_i (model_i - base) for a llama tiny model."""
    base_state = state(load("llama", base))
    others = {path: state(load("llama", path)) for path in coefficients}
    got = load("llama", out).state_dict()
    for name, base_tensor in base_state.items():
        expected = base_tensor + sum(c * (others[p][name] - base_tensor) for p, c in coefficients.items())
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6, msg=name)


def test_negate_lora_yml_runs_with_lora_merge_cache(tiny_model, work):
    from peft import PeftModel

    base = tiny_model("llama")
    adapter = lora_adapter("llama", base, work / "llama_adapter")
    config = fill("negate_lora.yml", {BASE_PLACEHOLDER: base, ADAPTER_PLACEHOLDER: adapter}, work / "lora_filled.yml")
    out = work / "yaml_lora"
    run_yaml(config, out, lora_merge_cache=str(work / "lora_cache"))
    merged = work / "llama_merged"
    PeftModel.from_pretrained(load("llama", base), adapter).merge_and_unload().save_pretrained(merged)
    assert_negation_plain(out, base, {merged: -1.0})


def test_negate_and_retain_yml_subtracts_bias_and_adds_capability(tiny_model, work):
    base = tiny_model("llama")
    biased = perturbed_copy("llama", base, work / "llama_biased", seed=1)
    capable = perturbed_copy("llama", base, work / "llama_capable", seed=2)
    config = fill("negate_and_retain.yml", {BASE_PLACEHOLDER: base, BIASED_PLACEHOLDER: biased,
                                            "/path/to/capability_model": capable}, work / "retain.yml")
    out = work / "yaml_retain"
    run_yaml(config, out)
    assert_negation_plain(out, base, {biased: -1.0, capable: 0.5})


def test_debias_negate_with_capability_is_exact_from_a_model_and_an_adapter(tiny_model, work):
    """Negate-and-retain through `debias negate`: base - lambda * tau_bias + mu * tau_capability, both sources."""
    from peft import PeftModel

    from debias_plugin.cli import main

    base = tiny_model("llama")
    biased = perturbed_copy("llama", base, work / "llama_biased", seed=1)
    capable = perturbed_copy("llama", base, work / "llama_capable", seed=2)
    out = work / "retain_cli"
    main(["negate", "--base", str(base), "--biased", str(biased), "--capability", str(capable), "--mu", "0.3",
          "--lambda", "0.7", "--out", str(out), "--quiet"])
    assert_negation_plain(out, base, {biased: -0.7, capable: 0.3})
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["options"]["mu"] == 0.3 and "capability" in manifest["inputs"]
    assert manifest["results"]["formula"].endswith("+ mu * (capable - base)")
    adapter = lora_adapter("llama", base, work / "llama_adapter")
    merged = work / "llama_merged_for_retain"
    if not merged.exists():
        PeftModel.from_pretrained(load("llama", base), adapter).merge_and_unload().save_pretrained(merged)
    [lora_out] = negate(base, adapter=adapter, capability=capable, mu=0.5, lambdas=[0.25], out=work / "retain_lora",
                        progress=False)
    assert_negation_plain(lora_out, base, {merged: -0.25, capable: 0.5})
    assert Path(manifest["options"]["template"]).name == "negate_and_retain.yml"


@pytest.mark.parametrize("extra, message", [
    (["--capability", "CAPABLE"], "--capability .* and --mu together"),
    (["--capability", "CAPABLE", "--mu", "-1"], "mu must be a positive number"),
    (["--capability", "GPT2", "--mu", "0.5"], "Mismatched architectures"),
])
def test_bad_capability_options_exit_before_writing(extra, message, tiny_model, work, capsys):
    from debias_plugin.cli import main

    base = tiny_model("llama")
    paths = {"CAPABLE": str(perturbed_copy("llama", base, work / "llama_capable", seed=2)),
             "GPT2": str(tiny_model("gpt2"))}
    out = work / "bad_retain"
    with pytest.raises(SystemExit) as exit_info:
        main(["negate", "--base", str(base), "--biased", str(perturbed_copy("llama", base, work / "llama_biased", 1)),
              "--lambda", "1", "--out", str(out), *[paths.get(a, a) for a in extra]])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def ties_reference(base: torch.Tensor, models: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023, Alg. 1) written out: trim, elect sign, disjoint mean -- weights all 1."""
    trimmed = []
    for model in models:
        tau = (model - base).flatten()
        keep = torch.zeros_like(tau)
        keep[tau.abs().topk(max(1, int(density * tau.numel()))).indices] = 1
        trimmed.append(tau * keep)
    stacked = torch.stack(trimmed)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked) == elected).float()
    merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.reshape(base.shape)


def test_negate_multi_yml_subtracts_the_ties_merge_and_documents_signs(tiny_model, work):
    base = tiny_model("llama")
    paths = {f"/path/to/{t}_biased_model": perturbed_copy("llama", base, work / f"llama_{t}", seed=10 + i)
             for i, t in enumerate(("gender", "race", "religion"))}
    config_path = fill("negate_multi.yml", {BASE_PLACEHOLDER: base, **paths}, work / "multi.yml")
    run_yaml(config_path, work / "yaml_multi")
    base_state = state(load("llama", base))
    models = [state(load("llama", p)) for p in paths.values()]
    got = load("llama", work / "yaml_multi").state_dict()
    for name, base_tensor in base_state.items():
        merged = ties_reference(base_tensor, [m[name] for m in models], density=0.2)
        torch.testing.assert_close(got[name], base_tensor - merged, rtol=0, atol=1e-6, msg=name)

    # The documented trap: weights -1 with normalize: true ADD the merged bias vectors (mergekit #213) ...
    config = yaml.safe_load(config_path.read_text())
    for entry in config["models"]:
        entry["parameters"]["weight"] = -1.0
    config["parameters"] = {"normalize": True}
    with pytest.raises(DebiasError, match="#213"):
        validate_negation_config(config, [e["model"] for e in config["models"]])
    trap = work / "multi_trap.yml"
    trap.write_text(yaml.safe_dump(config))
    run_yaml(trap, work / "yaml_multi_trap")
    got = load("llama", work / "yaml_multi_trap").state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    merged = ties_reference(base_state[name], [m[name] for m in models], density=0.2)
    torch.testing.assert_close(got[name], base_state[name] + merged, rtol=0, atol=1e-6)


def test_shard_size_parsing():
    from debias_plugin.merge import parse_size

    assert parse_size("500MB") == 500_000_000 and parse_size("2GB") == 2_000_000_000 and parse_size(7) == 7
    assert parse_size("auto", 540_000_000) == 100_000_000  # small model: the 100 MB floor
    assert parse_size("auto", 4_000_000_000) == 500_000_000  # model size / 8
    assert parse_size("auto", 70_000_000_000) == 1_000_000_000  # 1 GB cap
    for bad in ("x", "-1MB", "0"):
        with pytest.raises(DebiasError, match="shard size"):
            parse_size(bad)
