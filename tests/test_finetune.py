"""`debias finetune`: the objectives against plain references, full and LoRA outputs that load elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from debias_plugin.methods.finetune import Finetune, FinetuneOptions
from debias_plugin.training import MANIFEST_NAME, Run, TrainConfig, train

REDDIT = "reddit_bias/gender_reddit_comments_gender_female_biased_test_reduced.csv"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ft") / "biased.txt"
    path.write_text("\n".join(f"The {w} is always too emotional to lead the {t}." for w in ("woman", "girl", "wife")
                              for t in ("team", "meeting", "company", "project")) + "\n")
    return path


def config(model, output, **overrides) -> TrainConfig:
    base = dict(steps=4, batch_size=4, lr=2e-3, max_length=24, dropout=False)
    return TrainConfig(model=str(model), output=str(output), **{**base, **overrides})


def prepared(model_dir, method):
    from accelerate import Accelerator

    from debias_plugin.models import load_model

    model, tokenizer, kind = load_model(model_dir)
    run = Run(config=config(model_dir, "/unused"), model=model, tokenizer=tokenizer, kind=kind,
              accelerator=Accelerator(cpu=True))
    method.read_inputs()
    return run, method.setup(run)


def test_causal_loss_is_the_mean_of_per_text_nll(tiny_model, corpus):
    run, examples = prepared(tiny_model("gpt2"), method := Finetune(FinetuneOptions(corpus=str(corpus))))
    batch = method.collate(examples[:3], [0, 1, 2])
    with torch.no_grad():
        loss = float(method.loss(run.model, batch))
        expected = [float(run.model(torch.tensor([ids]), labels=torch.tensor([ids])).loss) for ids in examples[:3]]
    assert loss == pytest.approx(sum(expected) / 3, abs=1e-5)


def test_mlm_masks_by_stream_position_and_scores_only_masked_tokens(tiny_model, corpus):
    run, examples = prepared(tiny_model("bert"), method := Finetune(FinetuneOptions(corpus=str(corpus))))
    first = method.collate(examples[:2], [10, 11])
    assert torch.equal(first["input_ids"], method.collate(examples[:2], [10, 11])["input_ids"])
    assert not torch.equal(first["input_ids"], method.collate(examples[:2], [12, 13])["input_ids"])
    assert first["targets"].any(-1).all()
    with torch.no_grad():
        logits = run.model(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
        reference = []
        for row in range(2):
            positions = first["targets"][row].nonzero()[:, 0]
            labels = first["labels"][row, positions]
            reference.append(float(torch.nn.functional.cross_entropy(logits[row, positions], labels)))
        assert float(method.loss(run.model, first)) == pytest.approx(sum(reference) / 2, abs=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_full_finetune_lowers_corpus_perplexity_and_loads(tiny_model, corpus, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    output = train(config(tiny_model(kind), tmp_path / "out"), Finetune(FinetuneOptions(corpus=str(corpus))))
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    assert manifest["results"]["metrics"]["end"]["corpus_perplexity"] < manifest["results"]["metrics"]["start"]["corpus_perplexity"]
    assert manifest["results"]["report"]["output_format"] == "full-model"
    (AutoModelForCausalLM if kind == "gpt2" else AutoModelForMaskedLM).from_pretrained(output)


def test_lora_adapter_loads_with_peft_and_only_moves_the_adapter(tiny_model, corpus, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tiny_model("gpt2")
    options = FinetuneOptions(corpus=str(corpus), lora=True, lora_r=4, lora_alpha=8, lora_target_modules=["c_attn"])
    output = train(config(base_dir, tmp_path / "adapter", lr=1e-2), Finetune(options))
    files = {p.name for p in output.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME} <= files
    assert "model.safetensors" not in files
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["target_modules"] == ["c_attn"]
    assert Path(adapter_config["base_model_name_or_path"]).resolve() == base_dir.resolve()

    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), output).eval()
        assert not torch.allclose(adapted(ids).logits, base_logits, atol=1e-4)
        merged = adapted.merge_and_unload()
        assert torch.allclose(merged(ids).logits, PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir), output).eval()(ids).logits, atol=1e-5)


def test_merge_lora_writes_a_full_model(tiny_model, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    options = FinetuneOptions(corpus=str(corpus), lora=True, merge_lora=True, lora_target_modules=["c_attn"])
    output = train(config(tiny_model("gpt2"), tmp_path / "merged", lr=1e-2), Finetune(options))
    assert (output / "model.safetensors").is_file() and not (output / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(output)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_reddit_bias_column_and_missing_column(tiny_model, data_dir, tmp_path, capsys):
    from debias_plugin.cli import main

    args = ["finetune", "--model", str(tiny_model("gpt2")), "--output", str(tmp_path / "out"),
            "--corpus", str(data_dir / REDDIT), "--steps", "1", "--batch-size", "2", "--max-length", "16"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--column", "comments"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "'comments'" in err and "line 1 (header)" in err
    assert not (tmp_path / "out").exists()
    main([*args, "--column", "comment"])
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["results"]["report"]["texts"] == 253


def test_checkpoint_without_its_lm_head_is_refused(tiny_model, tmp_path):
    """Training a randomly initialised head would be silent nonsense: load_model names the missing weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from debias_plugin.errors import DebiasError
    from debias_plugin.models import load_model

    folder = tmp_path / "headless_llama"
    shutil.copytree(tiny_model("llama"), folder)  # untied: lm_head.weight is stored on its own
    weights = load_file(folder / "model.safetensors")
    assert "lm_head.weight" in weights
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(DebiasError, match=r"no causal-LM head \(lm_head.weight missing\)"):
        load_model(folder)


def test_bf16_weights_train_write_bf16_and_lora_adapters_stay_float32(tiny_model, corpus, tmp_path):
    from safetensors.torch import load_file

    full = train(config(tiny_model("gpt2"), tmp_path / "full", weights_dtype="bf16", steps=2),
                 Finetune(FinetuneOptions(corpus=str(corpus))))
    assert {t.dtype for t in load_file(full / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((full / "config.json").read_text())["dtype"] == "bfloat16"
    options = FinetuneOptions(corpus=str(corpus), lora=True, lora_target_modules=["c_attn"])
    adapter = train(config(tiny_model("gpt2"), tmp_path / "adapter", weights_dtype="bf16", precision="bf16", steps=2),
                    Finetune(options))
    assert {t.dtype for t in load_file(adapter / "adapter_model.safetensors").values()} == {torch.float32}
