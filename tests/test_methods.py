"""The method contract, for every registered stage: generated CLI, validation before loading, output rules,
snapshots, and no publishing of non-finite models. A new stage = one module, one REGISTRY line, one row here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from debias_plugin.methods import REGISTRY, method_class
from debias_plugin.methods.base import TrainingMethod
from debias_plugin.outputs import MANIFEST_NAME, MANIFEST_SCHEMA
from debias_plugin.training import TrainConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("method_data")
    texts = [f"I think {s} {p} every day." for s in ("women", "men", "she", "he") for p in ("cook", "drive", "vote")]
    (root / "forget.txt").write_text("\n".join(texts) + "\n")
    (root / "words.txt").write_text("women\nmen\nshe\nhe\n")
    return root


# One row per registered stage: the arguments that make it train on tiny data.
STAGE_ARGS = {
    "finetune": lambda files: ["--corpus", str(files / "forget.txt")],
    "npo": lambda files: ["--corpus", str(files / "forget.txt"), "--words", str(files / "words.txt")],
    "pcgu": lambda files: ["--pairs", "crows", "--group", "gender", "--k", "0.05"],
    "unlearn": lambda files: ["--corpus", str(files / "forget.txt"), "--words", str(files / "words.txt")],
}
COMMON = ["--steps", "2", "--batch-size", "4", "--max-length", "24", "--no-dropout"]


def test_every_registered_stage_has_a_test_row():
    assert sorted(STAGE_ARGS) == sorted(REGISTRY)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    from debias_plugin.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("stage", sorted(REGISTRY))
def test_stage_class_and_generated_help(stage):
    from click.testing import CliRunner

    from debias_plugin.cli import cli
    from debias_plugin.commands.stage import flag_name

    method = method_class(stage)
    assert issubclass(method, TrainingMethod) and method.name == stage
    result = CliRunner().invoke(cli, [stage, "--help"])
    assert result.exit_code == 0
    for name, field in {**TrainConfig.model_fields, **method.Options.model_fields}.items():
        if name not in method.unused_training_options:
            assert flag_name(name, field) in result.output, f"{stage} --help lacks the flag for {name}"


@pytest.mark.parametrize("stage", sorted(REGISTRY))
def test_stage_trains_publishes_one_manifest_schema_and_snapshots(stage, tiny_model, files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    code, err = _run([stage, "--model", str(tiny_model("gpt2")), "--output", str(out), *COMMON,
                      "--snapshot-steps", "1", *STAGE_ARGS[stage](files)], capsys)
    assert code == 0, err
    record = json.loads((out / MANIFEST_NAME).read_text())
    assert record["schema"] == MANIFEST_SCHEMA and record["stage"] == stage
    assert {"options", "inputs", "results", "timings", "packages", "created_utc"} <= set(record)
    assert record["inputs"]["model"]["sha256"] and len(record["results"]["losses"]) == 2
    snapshot = tmp_path / "out.snapshots" / "step-1"
    assert json.loads((snapshot / MANIFEST_NAME).read_text())["results"]["step"] == 1
    AutoModelForCausalLM.from_pretrained(snapshot)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.snapshots"]  # no staging left
    metrics = record["results"]["metrics"]  # the before/after the stage printed are the ones it logged
    assert f"{stage}: before -> after" in err and metrics["start"]
    for key, before in metrics["start"].items():
        assert f"{key:34s} {before:12.4f} -> {metrics['end'][key]:12.4f}" in err


BAD_OPTIONS = [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--steps", "0"], "--steps"),
    (["--max-length", "0"], "--max-length"), (["--seed", "-3"], "--seed"),
    (["--snapshot-steps", "9"], "snapshot_steps"), (["--eval-every", "-1"], "--eval-every"),
]


@pytest.mark.parametrize("stage", sorted(REGISTRY))
@pytest.mark.parametrize("extra, named", BAD_OPTIONS)
def test_nonsense_options_fail_before_any_model_loads(stage, extra, named, files, tmp_path, capsys):
    model = tmp_path / "not_a_model"  # never opened: options are checked first
    code, err = _run([stage, "--model", str(model), "--output", str(tmp_path / "out"), *COMMON,
                      *STAGE_ARGS[stage](files), *extra], capsys)
    assert code == 2 and named in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", sorted(REGISTRY))
def test_output_overlapping_an_input_is_refused_even_with_force(stage, tiny_model, files, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model("gpt2"), model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for output in (model, model / "inside"):
        code, err = _run([stage, "--model", str(model), "--output", str(output), "--force", *COMMON,
                          *STAGE_ARGS[stage](files)], capsys)
        assert code == 2 and "overlaps the input" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


@pytest.mark.parametrize("stage", sorted(REGISTRY))
def test_a_loss_that_becomes_nan_publishes_nothing(stage, tiny_model, files, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run([stage, "--model", str(tiny_model("gpt2")), "--output", str(out), *COMMON, "--steps", "4",
                      "--lr", "1e30", *STAGE_ARGS[stage](files)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "non-finite" in err or "loss became" in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_stale_staging_of_a_dead_process_is_removed(tiny_model, files, tmp_path, capsys):
    stale = tmp_path / ".out.tmp-999999999-deadbeef"  # no such pid
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half-written")
    code, err = _run(["finetune", "--model", str(tiny_model("gpt2")), "--output", str(tmp_path / "out"), *COMMON,
                      *STAGE_ARGS["finetune"](files)], capsys)
    assert code == 0 and not stale.exists() and "interrupted run" in err


def test_npo_starts_as_gradient_ascent_and_matches_its_definition(tiny_model, files):
    """At theta = ref, NPO's loss is (2/beta) log 2 and its gradient is that of the summed target log-prob."""
    from accelerate import Accelerator

    from debias_plugin.methods.npo import NPO, NPOOptions
    from debias_plugin.models import load_model
    from debias_plugin.training import Run

    model, tokenizer, kind = load_model(tiny_model("gpt2"))
    run = Run(config=TrainConfig(model="m", output="o", max_length=24), model=model, tokenizer=tokenizer, kind=kind,
              accelerator=Accelerator(cpu=True))
    method = NPO(NPOOptions(corpus=str(files / "forget.txt"), words=str(files / "words.txt"), beta=0.5))
    method.read_inputs()
    examples = method.setup(run)
    batch = method.collate(examples[:3], [0, 1, 2])
    loss = method.forget_loss(model, batch)
    assert loss.item() == pytest.approx(2 / 0.5 * torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    npo_grad = torch.autograd.grad(loss, model.transformer.wte.weight)[0]
    logprobs = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1], -1)
    picked = logprobs.gather(-1, batch["input_ids"][:, 1:, None])[..., 0] * batch["targets"][:, 1:]
    ascent_grad = torch.autograd.grad(picked.sum(-1).mean(), model.transformer.wte.weight)[0]
    torch.testing.assert_close(npo_grad, ascent_grad, atol=1e-6, rtol=1e-4)


def test_npo_under_lora_compares_against_the_adapter_free_model(tiny_model, files):
    """At the start (adapter B = 0) the LoRA model is its own reference: NPO's loss is (2/beta) log 2."""
    from accelerate import Accelerator

    from debias_plugin.methods.npo import NPO, NPOOptions
    from debias_plugin.models import load_model
    from debias_plugin.training import Run

    model, tokenizer, kind = load_model(tiny_model("llama"))
    run = Run(config=TrainConfig(model="m", output="o", max_length=24), model=model, tokenizer=tokenizer, kind=kind,
              accelerator=Accelerator(cpu=True))
    method = NPO(NPOOptions(corpus=str(files / "forget.txt"), words=str(files / "words.txt"), beta=0.5, lora=True))
    method.read_inputs()
    examples = method.setup(run)
    assert method.reference is None and run.model is method.peft_model
    loss = method.forget_loss(run.model, method.collate(examples[:3], [0, 1, 2]))
    assert loss.item() == pytest.approx(2 / 0.5 * torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    loss.backward()
    trained = {name for name, p in run.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in name for name in trained)
