"""Peak memory of `debias negate` (mergekit, one tensor at a time) vs loading both models in torch and subtracting.

Each contender runs once in its own subprocess under /usr/bin/time -v ("Maximum resident set size"), on
SmolLM2-135M (float32, ~540 MB) and a "biased" copy made by a cheap deterministic perturbation. For
reference, plain `mergekit-yaml` runs the same rendered config with its defaults (mmap reads, 5B shards),
and one subprocess only imports the libraries, to show how much of each peak is the interpreter itself.

    nice -n 10 python benchmarks/bench_negate_memory.py [--base /tmp/smollm2]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAMBDA = 0.5
TORCH_BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM
base_dir, biased_dir, out_dir, lam = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
biased = AutoModelForCausalLM.from_pretrained(biased_dir, dtype=torch.float32)
with torch.no_grad():  # in place: the cheapest way to do it with both models loaded
    for p_base, p_biased in zip(base.parameters(), biased.parameters()):
        p_base.sub_(lam * (p_biased - p_base))
base.save_pretrained(out_dir, safe_serialization=True)
"""
IMPORTS_ONLY = "import torch, transformers, mergekit.merge, debias_plugin.merge.engine, debias_plugin.cli"


def make_biased_copy(base: Path, out: Path) -> None:
    """base + 1e-3 * sin(i * k): deterministic, no RNG, written tensor by tensor's dict as safetensors."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for path in base.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copy(path, out / path.name)
    for shard in sorted(base.glob("*.safetensors")):
        tensors = {}
        with safe_open(shard, framework="pt") as handle:
            metadata = handle.metadata()
            for k, name in enumerate(handle.keys()):
                tensor = handle.get_tensor(name)
                wave = torch.sin(torch.arange(tensor.numel(), dtype=torch.float32) * (k + 1)).reshape(tensor.shape)
                tensors[name] = (tensor.float() + 1e-3 * wave).to(tensor.dtype)
        save_file(tensors, out / shard.name, metadata=metadata)


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one command, from GNU time's report."""
    start = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return kb / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="/tmp/smollm2")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    base = Path(args.base)
    if not (base / "config.json").is_file():
        from debias_plugin.default_model import materialize_default_model

        base = Path(materialize_default_model(base))
    model_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
    debias = str(Path(sys.executable).parent / "debias")
    with tempfile.TemporaryDirectory(dir=base.parent) as tmp:
        tmp = Path(tmp)
        make_biased_copy(base, tmp / "biased")
        ours_cmd = [debias, "negate", "--base", str(base), "--biased", str(tmp / "biased"),
                    "--lambda", str(LAMBDA), "--out", str(tmp / "ours"), "--quiet"]
        ours, ours_s = peak_rss_mb(ours_cmd)
        torch_cmd = [sys.executable, "-c", TORCH_BASELINE, str(base), str(tmp / "biased"), str(tmp / "torch"),
                     str(LAMBDA)]
        baseline, baseline_s = peak_rss_mb(torch_cmd)
        plain_cmd = [str(Path(sys.executable).parent / "mergekit-yaml"), str(tmp / "ours" / "mergekit_config.yml"),
                     str(tmp / "plain"), "--quiet"]  # the same rendered config, mergekit's defaults (mmap, 5B shards)
        plain, plain_s = peak_rss_mb(plain_cmd)
        imports, _ = peak_rss_mb([sys.executable, "-c", IMPORTS_ONLY])
        shards = len(list((tmp / "ours").glob("*.safetensors")))
    figures = {
        "model": str(base), "model_size_mb": round(model_mb, 1), "lambda": LAMBDA,
        "debias_negate_peak_rss_mb": round(ours, 1), "debias_negate_wall_s": round(ours_s, 1),
        "torch_both_models_peak_rss_mb": round(baseline, 1), "torch_wall_s": round(baseline_s, 1),
        "mergekit_yaml_defaults_peak_rss_mb": round(plain, 1), "mergekit_yaml_wall_s": round(plain_s, 1),
        "imports_only_peak_rss_mb": round(imports, 1), "debias_negate_output_shards": shards,
        "ratio_debias_negate_to_model": round(ours / model_mb, 2),
        "ratio_torch_to_model": round(baseline / model_mb, 2),
        "ratio_debias_negate_above_imports_to_model": round((ours - imports) / model_mb, 2),
        "ratio_torch_above_imports_to_model": round((baseline - imports) / model_mb, 2),
        "command": " ".join(ours_cmd[:1] + ["negate", "--base", str(base), "--biased", "BIASED", "--lambda",
                                            str(LAMBDA), "--out", "OUT", "--quiet"]),
    }
    print(f"model (one copy, safetensors): {model_mb:8.1f} MiB")
    print(f"debias negate peak RSS:        {ours:8.1f} MiB = {ours / model_mb:.2f} x model  ({ours_s:.0f} s)")
    print(f"torch, both models loaded:     {baseline:8.1f} MiB = {baseline / model_mb:.2f} x model  ({baseline_s:.0f} s)")
    print(f"mergekit-yaml, its defaults:   {plain:8.1f} MiB = {plain / model_mb:.2f} x model  ({plain_s:.0f} s)")
    print(f"imports only (interpreter):    {imports:8.1f} MiB")
    print(f"above the import baseline:     debias negate {(ours - imports) / model_mb:.2f} x model, "
          f"torch {(baseline - imports) / model_mb:.2f} x model")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
