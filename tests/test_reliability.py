"""Hostile input against the training stages: each failure is exit 2, one paragraph naming the file or option,
no traceback, nothing left behind, inputs byte-identical. (Option ranges, output/input overlap, NaN losses and
stale staging for every stage are in test_methods.py; merge templates in test_negate.py; eval in test_masked_lm.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEBIAS = str(Path(sys.executable).with_name("debias"))
KILL_AFTER_STEP = str(Path(__file__).with_name("kill_after_step.py"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reliability") / "corpus.txt"
    path.write_text("\n".join(f"The {w} always leads the {t}." for w in ("woman", "man") for t in ("team", "firm")))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def finetune(model: Path, output: Path, corpus: Path, *extra: str, env: dict | None = None,
             kill_after_step: int | None = None):
    """debias finetune in a subprocess; kill_after_step=k: SIGKILL after step k (tests/kill_after_step.py)."""
    args = ["finetune", "--model", str(model), "--output", str(output), "--corpus", str(corpus), "--steps", "2",
            "--batch-size", "2", "--max-length", "16", *extra]
    command = [DEBIAS] if kill_after_step is None else [sys.executable, KILL_AFTER_STEP, str(kill_after_step)]
    return subprocess.run([*command, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def assert_one_paragraph(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in message, message


def broken_copy(tiny_model, tmp_path: Path, name: str, edit) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_model("gpt2"), folder)
    edit(folder)
    return folder


CORRUPTIONS = {
    "truncated_safetensors": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[
        :50_000]), "weights_file"),
    "invalid_config_json": (lambda f: (f / "config.json").write_text('{"model_type": "gpt2", '), "config.json"),
    "remote_code_config": (lambda f: (f / "config.json").write_text(json.dumps(
        {**json.loads((f / "config.json").read_text()), "model_type": "my-own",
         "auto_map": {"AutoConfig": "configuration_mine.MyConfig"}})), "trust-remote-code"),
    "no_tokenizer": (lambda f: [p.unlink() for p in f.glob("*token*")], "tokenizer"),
    "degenerate_tokenizer": (lambda f: (f / "tokenizer.json").write_text(json.dumps(
        {**json.loads((f / "tokenizer.json").read_text()),
         "model": {"type": "WordLevel", "vocab": {"<unk>": 0}, "unk_token": "<unk>"}})), "tokenizer"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_broken_model_folders_are_one_paragraph(case, tiny_model, corpus, tmp_path):
    edit, needle = CORRUPTIONS[case]
    model = broken_copy(tiny_model, tmp_path, "model", edit)
    before = snapshot(model)
    result = finetune(model, tmp_path / "out", corpus)
    assert_one_paragraph(result, needle if needle != "weights_file" else str(model / "model.safetensors"))
    assert snapshot(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("command", [["eval", "--model_args", "pretrained={model}", "--tasks", "crows_bias_gender",
                                      "--limit", "2"], ["seat", "--model", "{model}", "--tests", "weat1"]])
def test_a_truncated_weights_file_is_named_by_every_command(command, tiny_model, tmp_path):
    model = broken_copy(tiny_model, tmp_path, "model", CORRUPTIONS["truncated_safetensors"][0])
    result = subprocess.run([DEBIAS, *(part.format(model=model) for part in command)], capture_output=True, text=True)
    assert_one_paragraph(result, f"{model / 'model.safetensors'}, header: expected complete safetensors")


def test_unwritable_output_location_fails_before_training(tiny_model, corpus, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root without DAC checks)")
        result = finetune(tiny_model("gpt2"), locked / "out", corpus)
        assert_one_paragraph(result, "not a writable folder")
    finally:
        locked.chmod(0o700)


@contextlib.contextmanager
def tmpfs(mount: Path, options: str):
    """A small tmpfs at `mount` (root only): the OS errors no permission check can bypass."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_read_only_output_location(tiny_model, corpus, tmp_path):
    """Even root cannot write a read-only mount: the OS error becomes one paragraph, nothing is published."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        assert_one_paragraph(finetune(tiny_model("gpt2"), mount / "out", corpus), str(mount))
        assert not any(mount.iterdir())


def test_full_disk_leaves_nothing_half_written(tiny_model, corpus, tmp_path):
    with tmpfs(tmp_path / "small", "size=256k") as mount:
        result = finetune(tiny_model("gpt2"), mount / "out", corpus)
        assert_one_paragraph(result, "No space left on device", "disk is full")
        assert not any(mount.iterdir()), list(mount.iterdir())  # no output, no staging folder


def test_corrupt_checkpoint_is_one_paragraph(tiny_model, corpus, tmp_path):
    out = tmp_path / "out"
    killed = finetune(tiny_model("gpt2"), out, corpus, "--checkpoint-every", "1",
                      kill_after_step=1)
    assert killed.returncode != 0
    (latest,) = (tmp_path / "out.checkpoints").glob("step-*")
    (latest / "trainer.pt").write_bytes((latest / "trainer.pt").read_bytes()[:100])
    result = finetune(tiny_model("gpt2"), out, corpus, "--checkpoint-every", "1")
    assert_one_paragraph(result, "is corrupt", "delete")
    assert not out.exists()


def test_unknown_scheduler_and_missing_corpus_fail_before_loading(tmp_path, corpus):
    missing_model = tmp_path / "nowhere"
    assert_one_paragraph(finetune(missing_model, tmp_path / "out", corpus, "--scheduler", "cosine-ish"),
                         "--scheduler")
    assert_one_paragraph(finetune(missing_model, tmp_path / "out", tmp_path / "no_corpus.txt"), "no_corpus.txt")


@pytest.mark.parametrize("command, output", [
    (["eval", "--model_args", "pretrained={model}", "--tasks", "crows_bias_gender", "--limit", "2",
      "--output_path", "{output}"], "{model}/results"),
    (["eval", "--model_args", "pretrained={model}", "--tasks", "crows_bias_gender", "--limit", "2",
      "--output_path", "{output}"], "{data}/crows_pairs/out"),
    (["seat", "--model", "{model}", "--tests", "weat1", "--output", "{output}"], "{data}/seat/report.json"),
    (["seat", "--model", "{model}", "--tests", "weat1", "--output", "{output}"], "{model}/seat.json"),
])
def test_an_output_inside_an_implicit_input_is_refused(command, output, tiny_model, data_dir, tmp_path):
    """The model folder and the data folder a command reads (named or not) are inputs; --force changes nothing."""
    model = broken_copy(tiny_model, tmp_path, "model", lambda folder: None)
    before = snapshot(model)
    target = output.format(model=model, data=data_dir)
    args = [part.format(model=model, output=target) for part in command]
    result = subprocess.run([DEBIAS, *args, *(["--force"] if command[0] == "seat" else [])], capture_output=True,
                            text=True)
    assert_one_paragraph(result, "overlaps the input")
    assert snapshot(model) == before and not Path(target).exists()
