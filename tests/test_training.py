"""The shared training core: exact resume after a real kill, 1 vs 2 processes, accumulation, safe outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from debias_plugin.errors import DebiasError
from debias_plugin.methods.finetune import Finetune, FinetuneOptions
from debias_plugin.training import MANIFEST_NAME, TrainConfig, train

DEBIAS = str(Path(sys.executable).parent / "debias")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
KILL_AFTER_STEP = str(Path(__file__).with_name("kill_after_step.py"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "texts.txt"
    lines = [f"The {w} said that the {v} was {a} today." for w in ("nurse", "doctor", "mother", "father")
             for v in ("report", "meeting", "patient") for a in ("late", "fine", "early")]
    path.write_text("\n".join(lines) + "\n")
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def cli_args(model: Path, corpus: Path, output: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--output", str(output), "--corpus", str(corpus), "--steps", "4",
            "--batch-size", "4", "--lr", "1e-3", "--max-length", "24", "--seed", "3", *extra]


def _finetune(model, corpus, output, **overrides):
    options = dict(steps=3, batch_size=4, lr=1e-3, max_length=24, dropout=False, seed=3)
    config = TrainConfig(model=str(model), output=str(output), **{**options, **overrides})
    return train(config, Finetune(FinetuneOptions(corpus=str(corpus))))


def test_resume_after_kill_gives_the_same_weights(tiny_model, corpus, tmp_path):
    """SIGKILL a CLI run after step 3 (checkpoint at 2), rerun: the weights of a run never interrupted."""
    model = tiny_model("gpt2")
    resumed = tmp_path / "resumed"
    # dropout stays on, so the RNG states must be restored too
    args = cli_args(model, corpus, resumed, "--checkpoint-every", "2")
    killed = subprocess.run([sys.executable, KILL_AFTER_STEP, "3", *args], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not resumed.exists()
    assert (tmp_path / "resumed.checkpoints" / "latest").read_text() == "step-00000002"

    from debias_plugin.cli import main

    main(args)
    straight = _finetune(model, corpus, tmp_path / "straight", steps=4, dropout=True)
    assert max_difference(weights(straight), weights(resumed)) == 0.0
    assert not (tmp_path / "resumed.checkpoints").exists()  # removed after success
    resumed_manifest = json.loads((resumed / MANIFEST_NAME).read_text())
    assert resumed_manifest["results"]["losses"] == json.loads((straight / MANIFEST_NAME).read_text())["results"]["losses"]


def test_resume_refuses_a_checkpoint_of_other_options(tiny_model, corpus, tmp_path, capsys):
    from debias_plugin.cli import main

    model, output = tiny_model("gpt2"), tmp_path / "out"
    _finetune(model, corpus, output, checkpoint_every=1, keep_checkpoints=True)
    shutil.rmtree(output)
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(model, corpus, output, "--checkpoint-every", "1", "--lr", "5e-4"))
    assert exit_info.value.code == 2 and "other options" in capsys.readouterr().err
    assert not output.exists()


def test_two_processes_match_one(tiny_model, corpus, tmp_path):
    """2 processes (gloo DDP on CPU) each take half of the same global batch of 4 -> the 1-process weights."""
    model = tiny_model("gpt2")
    two = tmp_path / "two"
    launched = subprocess.run(
        [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", DEBIAS, *cli_args(model, corpus, two, "--no-dropout", "--steps", "3")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert json.loads((two / MANIFEST_NAME).read_text())["timings"]["processes"] == 2
    one = _finetune(model, corpus, tmp_path / "one")
    base = weights(model)
    assert max(float((weights(one)[k] - base[k]).abs().max()) for k in base) > 1e-3  # it really trained
    # Same data, same maths; only float summation order differs (mean of two half-batch means vs one mean).
    difference = max_difference(weights(one), weights(two))
    print(f"max |1-process - 2-process| weight difference: {difference:.3g}")
    assert difference < 2e-5  # measured 3e-6 here; Adam steps are 1e-3


def test_gradient_accumulation_matches_one_big_batch(tiny_model, corpus, tmp_path):
    model = tiny_model("gpt2")
    whole = _finetune(model, corpus, tmp_path / "whole")
    accumulated = _finetune(model, corpus, tmp_path / "accumulated", grad_accum=2)
    assert max_difference(weights(whole), weights(accumulated)) < 1e-5


def test_manifest_and_loading(tiny_model, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from debias_plugin.outputs import sha256_file

    output = _finetune(tiny_model("gpt2"), corpus, tmp_path / "out")
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    assert manifest["stage"] == "finetune"
    assert manifest["options"]["lr"] == 1e-3 and manifest["options"]["method"]["corpus"] == str(corpus)
    assert manifest["inputs"]["corpus"] == {"path": str(corpus.resolve()), "sha256": sha256_file(corpus)}
    assert set(manifest["results"]["metrics"]) == {"start", "end"} and len(manifest["results"]["losses"]) == 3
    assert {"torch", "transformers", "accelerate"} <= set(manifest["packages"])
    AutoModelForCausalLM.from_pretrained(output)
    AutoTokenizer.from_pretrained(output)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders or checkpoints left


def test_refuses_non_empty_output_without_force(tiny_model, corpus, tmp_path, capsys):
    from debias_plugin.cli import main

    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(cli_args(tiny_model("gpt2"), corpus, output))
    assert exit_info.value.code == 2 and "--force" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "mine"
    _finetune(tiny_model("gpt2"), corpus, output, force=True)
    assert not (output / "keep.txt").exists() and (output / MANIFEST_NAME).is_file()


def test_bad_model_folders_leave_nothing_behind(tiny_model, corpus, tmp_path):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model("gpt2") / "config.json").read_text())
    with pytest.raises(DebiasError, match="no weights"):
        _finetune(empty, corpus, tmp_path / "out1")

    pickled = tmp_path / "pickled"  # a pickle-only checkpoint: pytorch_model.bin beside config and tokenizer
    pickled.mkdir()
    for name in os.listdir(tiny_model("gpt2")):
        if not name.endswith(".safetensors"):
            (pickled / name).write_bytes((tiny_model("gpt2") / name).read_bytes())
    torch.save(weights(tiny_model("gpt2")), pickled / "pytorch_model.bin")
    with pytest.raises(DebiasError, match="--allow-pickle"):
        _finetune(pickled, corpus, tmp_path / "out2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_weights", "pickled"]


def test_bf16_mixed_precision_trains_float32_weights(tiny_model, corpus, tmp_path):
    """bf16 autocast changes the arithmetic a little, not the saved dtype; fp32 again afterwards in one process."""
    fp32 = json.loads((_finetune(tiny_model("gpt2"), corpus, tmp_path / "a", steps=2) / MANIFEST_NAME).read_text())
    bf16_dir = _finetune(tiny_model("gpt2"), corpus, tmp_path / "b", steps=2, precision="bf16")
    bf16 = json.loads((bf16_dir / MANIFEST_NAME).read_text())
    assert bf16["results"]["losses"] != fp32["results"]["losses"]
    assert bf16["results"]["losses"] == pytest.approx(fp32["results"]["losses"], rel=1e-2)
    assert {tensor.dtype for tensor in weights(bf16_dir).values()} == {torch.float32}
    again = json.loads((_finetune(tiny_model("gpt2"), corpus, tmp_path / "c", steps=2) / MANIFEST_NAME).read_text())
    assert again["results"]["losses"] == fp32["results"]["losses"]


def test_gradient_checkpointing_recomputes_every_layer_and_trains_the_same_weights(tiny_model, corpus, tmp_path):
    """With checkpointing each block's attention runs twice per step (forward + recompute in backward), dropout
    stays off under --no-dropout, and the weights equal those of a run that keeps all activations."""
    from debias_plugin.models import load_model
    from debias_plugin.training import enable_checkpointing, train_mode

    model_dir = tiny_model("gpt2")
    model, _, _ = load_model(model_dir)
    calls = []
    for block in model.transformer.h:
        block.attn.register_forward_hook(lambda *args: calls.append(1))
    enable_checkpointing(model, TrainConfig(model=str(model_dir), output="unused", dropout=False,
                                            gradient_checkpointing=True))
    train_mode(model, dropout=False)
    assert all(block.training for block in model.transformer.h) and not model.transformer.drop.training
    assert not any(m.training for block in model.transformer.h for m in block.modules() if m is not block)
    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 90]])
    loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
    assert len(calls) == len(model.transformer.h)
    loss.backward()
    assert len(calls) == 2 * len(model.transformer.h)

    for dropout in (False, True):  # with dropout on, the recompute replays the same dropout masks
        plain = _finetune(model_dir, corpus, tmp_path / f"plain-{dropout}", dropout=dropout)
        checkpointed = _finetune(model_dir, corpus, tmp_path / f"ckpt-{dropout}", dropout=dropout,
                                 gradient_checkpointing=True)
        assert max_difference(weights(plain), weights(checkpointed)) < 1e-6
    record = json.loads((checkpointed / MANIFEST_NAME).read_text())
    assert record["options"]["gradient_checkpointing"] is True
    assert json.loads((checkpointed / "config.json").read_text())["use_cache"] is True  # trained without, saved as was


def test_gradient_checkpointing_refuses_layers_that_drop_out_themselves(tiny_model, corpus, tmp_path):
    """OPT's decoder layer applies dropout in its own forward: in training mode it would drop out under
    --no-dropout, so the combination is refused (with dropout on it trains)."""
    with pytest.raises(DebiasError, match="OPTDecoderLayer applies dropout"):
        _finetune(tiny_model("opt"), corpus, tmp_path / "refused", gradient_checkpointing=True)
    assert not (tmp_path / "refused").exists()
    _finetune(tiny_model("opt"), corpus, tmp_path / "trained", gradient_checkpointing=True, dropout=True, steps=1)


def test_distributions_the_loop_cannot_run_are_refused_before_loading(tiny_model, corpus, tmp_path):
    from debias_plugin.methods.pcgu import PCGUMethod, PCGUOptions
    from debias_plugin.training import Trainer

    def trainer(method, **overrides):
        config = TrainConfig(model=str(tiny_model("gpt2")), output=str(tmp_path / "out"), **overrides)
        return Trainer(config, method)

    full, lora = (Finetune(FinetuneOptions(corpus=str(corpus), lora=flag)) for flag in (False, True))
    trainer(full)._check_distribution("FSDP")  # full-weight fine-tuning shards
    trainer(full)._check_distribution("MULTI_GPU")
    for method, message in ((PCGUMethod(PCGUOptions()), "compared whole on one process"),
                            (lora, "LoRA does not run under FSDP")):
        with pytest.raises(DebiasError, match=message):
            trainer(method)._check_distribution("FSDP")
    with pytest.raises(DebiasError, match="checkpoint_every"):
        trainer(full, checkpoint_every=2)._check_distribution("FSDP")
    with pytest.raises(DebiasError, match="DEEPSPEED mode is not supported"):
        trainer(full)._check_distribution("DEEPSPEED")


def test_finite_check_is_exact_even_where_a_sum_overflows():
    """check_finite sums each tensor first (no copy); a sum that overflows is re-checked element by element."""
    from debias_plugin.training import check_finite

    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(3e38)  # finite, but the sum is inf
    check_finite(model, 1)
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    with pytest.raises(DebiasError, match="non-finite by step 1 .first: weight"):
        check_finite(model, 1)
