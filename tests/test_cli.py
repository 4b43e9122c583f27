"""The CLI stays instant, prints errors as one paragraph without a traceback, and finds its bundled folders."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _debias(*args, **kwargs):
    code = "from debias_plugin.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, **kwargs)


def _after_cli(args: list[str], then: str):
    """A fresh interpreter runs the CLI with args (its SystemExit caught), then the code `then`."""
    code = (f"import logging, sys; from debias_plugin.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n{then}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_help_lists_commands_without_heavy_imports():
    result = _after_cli(["--help"], "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'mergekit', 'peft') "
                                    "if m in sys.modules]\nprint('HEAVY', heavy)")
    assert result.returncode == 0, result.stderr
    assert "eval" in result.stdout and "default-model" in result.stdout
    assert "HEAVY []" in result.stdout


def test_user_error_is_one_paragraph_without_traceback(tmp_path):
    occupied = tmp_path / "model"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    result = _debias("default-model", "--out", str(occupied))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(occupied) in result.stderr and "not a finished model folder" in result.stderr
    assert (occupied / "notes.txt").read_text() == "keep me"


def test_progress_lines_print_once_after_a_library_logs_through_the_root_logger():
    """A library's root-level logging.warning() (mergekit's merges call them) would install logging's default
    handler on the root, and every line of ours would print twice; other libraries' warnings still show."""
    result = _after_cli(["--version"], "logging.warning('a library warning'); logging.info('a library note')\n"
                                       "logging.getLogger('debias_plugin.sweep').info('λ=0.5: a progress line')")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("a progress line") == 1, result.stderr
    assert result.stderr.count("a library warning") == 1 and "a library note" not in result.stderr


@pytest.mark.parametrize("output_path", [None, "."])  # None: our default folder; ".": the working directory
def test_eval_picks_hf_bias_saves_results_and_prints_a_summary(tiny_model, tmp_path, output_path):
    import json

    where = [] if output_path is None else ["--output_path", output_path]
    result = _debias("eval", "--model_args", f"pretrained={tiny_model('gpt2')}", "--tasks", "crows_bias_gender",
                     "--limit", "4", *where, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("hf-bias (")  # lm-eval's header: a causal model's default class
    assert "crows_bias_gender" in result.stdout and "stereotype_gap" in result.stdout
    saved = list((tmp_path / "runs" / "eval" if output_path is None else tmp_path).rglob("results_*.json"))
    assert len(saved) == 1 and f"Results saved to {saved[0].relative_to(tmp_path)}" in result.stdout
    pct = json.loads(saved[0].read_text())["results"]["crows_bias_gender"]["pct_stereotype,none"]
    summary = result.stdout.split("Summary.")[1]
    row = next(line for line in summary.splitlines() if line.strip().startswith("crows_bias_gender"))
    assert row.split()[1:3] == ["4", f"{pct:.1f}"] and f"{abs(pct - 50):.1f}" in row


def test_bundled_folders_found_from_checkout():
    from debias_plugin.paths import merge_configs_dir, tasks_dir

    assert (tasks_dir() / "crows_bias" / "crows_bias.yaml").is_file()
    assert merge_configs_dir().is_dir()


@pytest.mark.slow
def test_wheel_bundles_tasks_and_merge_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True)
    (wheel,) = tmp_path.glob("debias_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "debias_plugin/tasks/crows_bias/crows_bias.yaml" in names
    assert "debias_plugin/tasks/crows_bias/utils.py" in names
    assert any(name.startswith("debias_plugin/merge_configs/") for name in names)
