"""PCGU on the real SmolLM2-135M with WinoGender pairs: CrowS (gender/race/religion) and WikiText-2 before/after.

For each k (fraction of all weight partitions) it runs `debias pcgu`, then lm-eval's `crows_bias_<type>`
tasks (causal scoring, all pairs) and `wikitext2_ppl` on the first --ppl-limit articles (the same
articles for every model, windows of --ppl-max-length tokens). The base model's CrowS numbers are
reused from --base-crows when that file exists (the lead's run with the same command).

    nice -n 10 python benchmarks/real_pcgu_smollm2.py --k 0.01 0.1 --json docs/results/issue5_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CROWS_TASKS = ("crows_bias_gender", "crows_bias_race_color", "crows_bias_religion")


def run(command: list[str], log: Path) -> float:
    """Run one step under nice, logging to a file; fail loudly with the log's tail."""
    started = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(["nice", "-n", "10", *command], stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{log.read_text()[-3000:]}")
    return time.time() - started


def lm_eval(model: Path, tasks: str, out: Path, log: Path, extra: list[str], model_args: str = "") -> dict:
    """lm-eval's results dict for one model (the newest results file under `out`)."""
    existing = sorted(out.rglob("results_*.json"))
    if not existing:
        run([str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model}{model_args}",
             "--tasks", tasks, "--include_path", "tasks", "--device", "cpu", "--batch_size", "16",
             "--output_path", str(out), *extra], log)
        existing = sorted(out.rglob("results_*.json"))
    return json.loads(existing[-1].read_text())["results"]


def scores(model: Path, work: Path, name: str, args, crows: dict | None = None) -> dict:
    if crows is None:
        crows = lm_eval(model, ",".join(CROWS_TASKS), work / f"eval_crows_{name}", work / f"eval_crows_{name}.log", [])
    ppl = lm_eval(model, "wikitext2_ppl", work / f"eval_ppl_{name}", work / f"eval_ppl_{name}.log",
                  ["--limit", str(args.ppl_limit)], f",max_length={args.ppl_max_length}")["wikitext2_ppl"]
    row = {task.replace("crows_bias_", ""): crows[task]["pct_stereotype,none"] for task in CROWS_TASKS}
    row["word_perplexity"] = ppl["word_perplexity,none"]
    row["bits_per_byte"] = ppl["bits_per_byte,none"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/smollm2")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pcgu_smollm2"))
    parser.add_argument("--k", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--steps", type=int, default=15, help="15 x 16 pairs = one pass over WinoGender's 240")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--ppl-limit", type=int, default=6, help="WikiText-2 test articles scored")
    parser.add_argument("--ppl-max-length", type=int, default=2048)
    parser.add_argument("--base-crows", type=Path, default=Path("/work/notes/base_smollm2_crows.json"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("DEBIAS_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    args.work.mkdir(parents=True, exist_ok=True)

    base_crows = json.loads(args.base_crows.read_text())["results"] if args.base_crows.is_file() else None
    rows = [{"model": "SmolLM2-135M (base)", **scores(Path(args.model), args.work, "base", args, base_crows)}]
    print(rows[-1], flush=True)
    for k in args.k:
        name = f"k{k:g}_lr{args.lr:g}_s{args.steps}"
        output = args.work / name
        command = [str(BIN / "debias"), "pcgu", "--model", args.model, "--output", str(output), "--pairs",
                   "winogender", "--k", f"{k:g}", "--steps", str(args.steps), "--lr", f"{args.lr:g}", "--seed", "0"]
        seconds = None
        if not (output / "debias_manifest.json").is_file():
            seconds = run(command, args.work / f"{name}.log")
        manifest = json.loads((output / "debias_manifest.json").read_text())
        metrics = manifest["metrics"]
        rows.append({
            "model": f"PCGU k={k:g} ({manifest['report']['k']} of {manifest['report']['partitions_total']} "
                     f"partitions), lr {args.lr:g}, {args.steps} steps",
            **scores(output, args.work, name, args),
            "train_pairs_adv_preferred_pct": [metrics["start"]["pairs_preferring_advantaged_pct"],
                                              metrics["end"]["pairs_preferring_advantaged_pct"]],
            "train_seconds": seconds or manifest["wall_seconds"], "command": " ".join(command[1:]),
        })
        print(rows[-1], flush=True)

    header = "| model | CrowS gender | CrowS race-color | CrowS religion | WikiText-2 word ppl | bits/byte | " \
             "WinoGender pairs preferring advantaged (before -> after) |"
    lines = [header, "|" + "---|" * 7]
    for row in rows:
        train = row.get("train_pairs_adv_preferred_pct")
        lines.append(f"| {row['model']} | {row['gender']:.2f} | {row['race_color']:.2f} | {row['religion']:.2f} | "
                     f"{row['word_perplexity']:.3f} | {row['bits_per_byte']:.4f} | "
                     f"{f'{train[0]:.1f} -> {train[1]:.1f}' if train else ''} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "table": lines, "options": vars(args)}, indent=2,
                                        default=str) + "\n")


if __name__ == "__main__":
    main()
