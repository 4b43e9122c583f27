"""Golden equality: every stage's weights and every task's metrics on tiny models equal those recorded before the
method-contract redesign (tests/golden/pre_redesign.json, written by the pre-redesign code, 66d151f, through the
same CLI).

Bits depend on the CPU's float32 kernels (AVX-512 and AVX2 sum in other orders), so the file keeps one set of
digests and metrics per CPU kind the pre-redesign code was run on. Equal to one of them: bit-identical, done.
Otherwise (another kind, or a new microarchitecture under a recorded kind's name) each tensor's update (trained
minus initial weights) and each metric must agree within float32 rounding, and a warning says that the bits were
not matched; a real change of weights (lr x 1.01) fails there too.

Record a new CPU kind from the pre-redesign code only: run 66d151f's own tests/test_golden.py there (with this
file's EVAL_CASES) under DEBIAS_WRITE_GOLDEN=1 and copy its values in under machine_kind(); then this file under
DEBIAS_WRITE_GOLDEN=1 must add nothing but equal values (docs/RESULTS.md, "Golden digests per CPU kind (issue 10)").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import warnings
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "pre_redesign.json"
WRITE = os.environ.get("DEBIAS_WRITE_GOLDEN") == "1"
TRAIN = ["--steps", "3", "--batch-size", "4", "--max-length", "24", "--no-dropout", "--seed", "1"]
UPDATE_RTOL = 1e-3  # 2 threads instead of 1 moved no real update by 1e-3; lr x 1.01 moved them by ~1e-2
NOISE_FRACTION = 1e-4  # updates this small beside the largest are driven by rounding noise, in any direction
METRIC_RTOL, METRIC_ATOL = 1e-5, 2e-6  # metrics are stored rounded to 6 decimals


def machine_kind() -> str:
    """The CPU vendor and widest vector unit: what decides the float32 kernels' order of summation."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    vendor = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("vendor_id")),
                  platform.processor() or platform.machine())
    vector = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else platform.machine()
    return f"{vendor}-{vector}"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def weights_digest(folder: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of file layout)."""
    tensors = _tensors(folder)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def update_norms(folder: Path, base: Path) -> dict[str, float]:
    """Each tensor's L2 distance from the same-named base tensor (from zero where the base has none, e.g. LoRA)."""
    start = _tensors(base)
    norms = {}
    for name, tensor in _tensors(folder).items():
        initial = start.get(name)
        delta = tensor.double() - (initial.double() if initial is not None and initial.shape == tensor.shape else 0)
        norms[name] = float(delta.norm())
    return norms


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
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


@pytest.fixture(scope="module")
def recorded(golden):
    found: dict = {}
    yield found
    if WRITE:
        merged = json.loads(json.dumps(golden))
        for section, cases in found.items():
            for case, value in cases.items():
                if section == "update_norms":
                    merged.setdefault(section, {}).setdefault(case, value)  # the first kind recorded is the reference
                else:
                    merged.setdefault(section, {}).setdefault(case, {})[machine_kind()] = value
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")


@pytest.fixture(autouse=True)
def one_thread():
    """Reductions split over threads differ in the last bit: pin one thread so one machine kind gives one answer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _equals_a_recorded_kind(case: str, value, known: dict) -> bool:
    """Bit-identical to a recorded CPU kind's value; if not, warn (naming this kind) before the tolerance check."""
    if value in known.values():
        return True
    own = "differs from its own record" if machine_kind() in known else "has no record"
    warnings.warn(f"{case}: {machine_kind()} {own}; checked within float32 rounding only")
    return False


def _check_weights(case: str, folder: Path, base: Path, golden: dict, recorded: dict):
    digest = weights_digest(folder)
    recorded.setdefault("digests", {})[case] = digest
    recorded.setdefault("update_norms", {})[case] = norms = update_norms(folder, base)
    if WRITE or _equals_a_recorded_kind(case, digest, golden["digests"][case]):
        return
    reference = golden["update_norms"][case]
    assert norms.keys() == reference.keys(), f"{case}: other tensors than recorded"
    noise = NOISE_FRACTION * max(reference.values())  # e.g. attention key biases: softmax cancels their gradient
    drifted = {name: (norms[name], value) for name, value in reference.items()
               if not math.isclose(norms[name], value, rel_tol=UPDATE_RTOL, abs_tol=noise)}
    assert not drifted, f"{case} changed: update norms (now, golden) {drifted}"


def _check_metrics(case: str, metrics: dict, golden: dict, recorded: dict):
    recorded.setdefault("metrics", {})[case] = metrics
    if WRITE:
        return
    known = golden["metrics"][case]
    if _equals_a_recorded_kind(case, metrics, known):
        return
    reference = known.get(machine_kind(), next(iter(known.values())))
    assert metrics.keys() == reference.keys(), f"{case}: other metrics than recorded"
    differ = {key: (metrics[key], value) for key, value in reference.items()
              if (metrics[key] is None) != (value is None)
              or value is not None and not math.isclose(metrics[key], value, rel_tol=METRIC_RTOL, abs_tol=METRIC_ATOL)}
    assert not differ, f"{case} changed: (now, golden) {differ}"


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
    base = tiny_model("bert" if "bert" in case else "gpt2")
    _check_weights(case, _stage(tiny_model, files, tmp_path, case), base, golden, recorded)


@pytest.mark.parametrize("source", ["full", "lora"])
def test_negate_weights_unchanged(tiny_model, files, tmp_path, source, golden, recorded):
    from debias_plugin.cli import main

    stage = _stage(tiny_model, files, tmp_path, "finetune_gpt2" if source == "full" else "finetune_gpt2_lora")
    flag = "--biased" if source == "full" else "--adapter"
    out = tmp_path / "negated"
    main(["negate", "--base", str(tiny_model("gpt2")), flag, str(stage), "--lambda", "0.5", "--out", str(out),
          "--quiet"])
    _check_weights(f"negate_{source}", out, tiny_model("gpt2"), golden, recorded)


EVAL_CASES = {  # kind -> `debias eval` runs as (model class, tasks, --limit)
    "gpt2": [("hf", "crows_bias,crows_bias_overall,stereoset_bias,stereoset_bias_inter,wikitext2_ppl_quick", "6")],
    "bert": [("hf-mlm", "crows_bias,crows_bias_aul,stereoset_bias", "6"),
             ("hf-mlm", "wikitext2_ppl_quick", "1")],  # a pseudo-perplexity costs one forward pass per token
}


@pytest.mark.parametrize("kind", sorted(EVAL_CASES))
def test_task_metrics_unchanged(tiny_model, tmp_path, kind, golden, recorded):
    from debias_plugin.cli import main

    results = {}
    for run, (model_class, tasks, limit) in enumerate(EVAL_CASES[kind]):
        out = tmp_path / f"results_{run}"
        main(["eval", "--model", model_class, "--model_args", f"pretrained={tiny_model(kind)}", "--tasks", tasks,
              "--limit", limit, "--batch_size", "8", "--output_path", str(out)])
        (results_file,) = out.rglob("results_*.json")
        results.update(json.loads(results_file.read_text())["results"])
    metrics = {f"{task}/{key}": None if math.isnan(value) else round(value, 6)  # NaN: a group with no pair
               for task, values in results.items() for key, value in values.items()
               if isinstance(value, float) and "stderr" not in key}
    from debias_plugin.scoring.gap import gap_source

    added = {key for key in metrics if gap_source(key.split("/")[1])}  # new since: |x - 50| beside each source
    for key in added:
        task, name = key.split("/")
        source = metrics[f"{task}/{gap_source(name)},none"]
        assert metrics[key] == (None if source is None else round(abs(source - 50), 6)), key
    _check_metrics(f"eval_{kind}", {key: value for key, value in metrics.items() if key not in added}, golden, recorded)
