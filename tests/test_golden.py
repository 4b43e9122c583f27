"""Golden equality: every stage's weights and every task's metrics on tiny models equal those recorded before the
method-contract redesign (tests/golden/pre_redesign.json, written by the pre-redesign code through the same CLI).

Regenerate only on purpose: DEBIAS_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "pre_redesign.json"
WRITE = os.environ.get("DEBIAS_WRITE_GOLDEN") == "1"
TRAIN = ["--steps", "3", "--batch-size", "4", "--max-length", "24", "--no-dropout", "--seed", "1"]


def weights_digest(folder: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of file layout)."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden_data")
    subjects = ["women", "men", "She", "he", "The girl", "My father"]
    predicates = ["should stay at home", "are bad at driving", "cannot do math", "talk too much"]
    (root / "forget.txt").write_text("\n".join(f"I think {s} {p} every day." for s in subjects for p in predicates) + "\n")
    (root / "words.txt").write_text("women\nmen\nshe\nhe\ngirl\nfather\n")
    (root / "retain.txt").write_text("\n".join(f"The report on page {n} was read twice." for n in range(12)) + "\n")
    return root


@pytest.fixture(scope="module")
def golden() -> dict:
    return {} if WRITE else json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def recorded():
    found: dict = {}
    yield found
    if WRITE:
        existing = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({**existing, **found}, indent=1, sort_keys=True) + "\n")


@pytest.fixture(autouse=True)
def one_thread():
    """Reductions split over threads differ in the last bit: pin one thread for bit-identity across machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check(name: str, value, golden: dict, recorded: dict):
    recorded[name] = value
    if not WRITE:
        assert name in golden, f"no golden value for {name}"
        assert value == golden[name], f"{name} changed: {value!r} != golden {golden[name]!r}"


def _stage(tiny_model, files, tmp_path, case: str) -> Path:
    from debias_plugin.cli import main

    gpt2, bert = str(tiny_model("gpt2")), str(tiny_model("bert"))
    forget = ["--corpus", str(files / "forget.txt"), "--words", str(files / "words.txt")]
    cases = {
        "unlearn_gpt2": ["unlearn", "--model", gpt2, *TRAIN, "--lr", "1e-3", *forget],
        "unlearn_bert_kl": ["unlearn", "--model", bert, *TRAIN, "--lr", "1e-3", *forget,
                            "--retain", str(files / "retain.txt"), "--regulariser", "kl", "--retain-weight", "0.5"],
        "unlearn_gpt2_gd_accum": ["unlearn", "--model", gpt2, *TRAIN, "--lr", "1e-3", *forget, "--grad-accum", "2",
                                  "--retain", str(files / "retain.txt"), "--regulariser", "gd",
                                  "--scheduler", "linear", "--warmup-steps", "1", "--max-grad-norm", "1.0"],
        "pcgu_gpt2": ["pcgu", "--model", gpt2, "--steps", "2", "--batch-size", "4", "--max-length", "24",
                      "--no-dropout", "--pairs", "crows", "--group", "gender", "--k", "0.05", "--lr", "1e-2"],
        "pcgu_bert_both_flex": ["pcgu", "--model", bert, "--steps", "2", "--batch-size", "4", "--max-length", "24",
                                "--no-dropout", "--pairs", "crows", "--group", "gender", "--k", "300", "--lr", "1e-2",
                                "--direction", "both", "--rank-by", "flexibility", "--similarity-batches", "2"],
        "finetune_gpt2": ["finetune", "--model", gpt2, *TRAIN, "--lr", "2e-3", "--corpus", str(files / "forget.txt")],
        "finetune_bert": ["finetune", "--model", bert, *TRAIN, "--lr", "2e-3", "--corpus", str(files / "forget.txt")],
        "finetune_gpt2_lora": ["finetune", "--model", gpt2, *TRAIN, "--lr", "2e-3", "--corpus",
                               str(files / "forget.txt"), "--lora", "--lora-target-modules", "c_attn,c_fc"],
    }
    out = tmp_path / case
    main([*cases[case], "--output", str(out)])
    return out


TRAINING_CASES = ["unlearn_gpt2", "unlearn_bert_kl", "unlearn_gpt2_gd_accum", "pcgu_gpt2", "pcgu_bert_both_flex",
                  "finetune_gpt2", "finetune_bert", "finetune_gpt2_lora"]


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_training_stage_weights_unchanged(tiny_model, files, tmp_path, case, golden, recorded):
    _check(case, weights_digest(_stage(tiny_model, files, tmp_path, case)), golden, recorded)


@pytest.mark.parametrize("source", ["full", "lora"])
def test_negate_weights_unchanged(tiny_model, files, tmp_path, source, golden, recorded):
    from debias_plugin.cli import main

    stage = _stage(tiny_model, files, tmp_path, "finetune_gpt2" if source == "full" else "finetune_gpt2_lora")
    flag = "--biased" if source == "full" else "--adapter"
    out = tmp_path / "negated"
    main(["negate", "--base", str(tiny_model("gpt2")), flag, str(stage), "--lambda", "0.5", "--out", str(out),
          "--quiet"])
    _check(f"negate_{source}", weights_digest(out), golden, recorded)


EVAL_CASES = {
    "gpt2": ("hf", "crows_bias,crows_bias_overall,stereoset_bias,stereoset_bias_inter,wikitext2_ppl_quick"),
    "bert": ("hf-mlm", "crows_bias,crows_bias_aul,stereoset_bias,wikitext2_ppl_quick"),
}


@pytest.mark.parametrize("kind", sorted(EVAL_CASES))
def test_task_metrics_unchanged(tiny_model, tmp_path, kind, golden, recorded):
    from debias_plugin.cli import main

    model_class, tasks = EVAL_CASES[kind]
    out = tmp_path / "results"
    main(["eval", "--model", model_class, "--model_args", f"pretrained={tiny_model(kind)}", "--tasks", tasks,
          "--limit", "6", "--batch_size", "8", "--output_path", str(out)])
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    metrics = {f"{task}/{key}": None if math.isnan(value) else round(value, 6)  # NaN: a group with no pair
               for task, values in results.items() for key, value in values.items()
               if isinstance(value, float) and "stderr" not in key}
    from debias_plugin.scoring.gap import gap_source

    added = {key for key in metrics if gap_source(key.split("/")[1])}  # new since: |x - 50| beside each source
    for key in added:
        task, name = key.split("/")
        source = metrics[f"{task}/{gap_source(name)},none"]
        assert metrics[key] == (None if source is None else round(abs(source - 50), 6)), key
    _check(f"eval_{kind}", {key: value for key, value in metrics.items() if key not in added}, golden, recorded)
