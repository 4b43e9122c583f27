"""Real-model check of `debias unlearn` (Lu et al.) on SmolLM2-135M over DGHS women (not a test).

Runs, one after another (niced, results cached in --work so a rerun skips finished stages):
1. `debias unlearn` with the paper's defaults (batch 8, 50 steps, lr 1e-5), gender word list, DGHS dev split as
   the forget set and test split as held-out, perplexity logged every --eval-every steps;
2. lm-eval `crows_bias` (per type) and `wikitext2_ppl` on the base and the unlearned model;
3. a PNG of the forget / held-out perplexity curves and a markdown table on stdout.
Base-model CrowS numbers are reused from the lead's /work/notes/base_smollm2* results when present.

    nice -n 10 python benchmarks/real_unlearn_smollm2.py --work /tmp/issue4_bench
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEBIAS_DATA_DIR", REPO.parent / "shared" / "data"))
BASE_CROWS_NOTES = [Path("/work/notes/base_smollm2_crows.json"), Path("/work/notes/base_smollm2_crows_bench.json")]
CROWS_TYPES = ["race_color", "socioeconomic", "gender", "disability", "nationality", "sexual_orientation",
               "physical_appearance", "religion", "age"]


def base_model() -> str:
    if Path("/tmp/smollm2/model.safetensors").is_file():
        return "/tmp/smollm2"
    from debias_plugin.default_model import materialize_default_model

    return str(materialize_default_model())


def run_timed(command: list[str]) -> float:
    print("$", " ".join(command), flush=True)
    started = time.time()
    subprocess.run(["nice", "-n", "10", *command], check=True)
    return time.time() - started


def lm_eval(model_args: str, tasks: str, out: Path, extra: list[str] = ()) -> tuple[dict, float]:
    """Results dict of one lm-eval run (cached in `out`) and its wall time."""
    cached = out / "results.json"
    if cached.is_file():
        saved = json.loads(cached.read_text())
        return saved["results"], saved["wall_seconds"]
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", tasks,
               "--include_path", str(REPO / "tasks"), "--device", "cpu", "--batch_size", "16",
               "--output_path", str(out / "raw"), *extra]
    wall = run_timed(command)
    raw = sorted(glob.glob(str(out / "raw" / "**" / "results_*.json"), recursive=True))[-1]
    results = json.loads(Path(raw).read_text())["results"]
    cached.write_text(json.dumps({"results": results, "wall_seconds": wall, "command": " ".join(command)}, indent=1))
    return results, wall


def crows_per_type(results: dict) -> dict[str, float]:
    """type -> pct_stereotype from lm-eval results (or the lead's note: same names, key 'pct_stereotype')."""
    def value(row: dict) -> float:
        return row.get("pct_stereotype,none", row.get("pct_stereotype"))

    table = {t: value(results[f"crows_bias_{t}"]) for t in CROWS_TYPES if f"crows_bias_{t}" in results}
    if "crows_bias" in results:
        table["all"] = value(results["crows_bias"])
    return table


def base_crows(model: str, work: Path, tasks: str = "crows_bias") -> dict[str, float]:
    lead_runs = sorted(glob.glob("/work/notes/base_smollm2/**/results_*.json", recursive=True))
    for path in [*BASE_CROWS_NOTES, *map(Path, lead_runs[-1:])]:
        if path.is_file():
            note = json.loads(path.read_text())
            note = note.get("results", note)
            print(f"base CrowS from {path}")
            return crows_per_type(note)
    suffix = "" if tasks == "crows_bias" else "_" + tasks.replace(",", "+")
    return crows_per_type(lm_eval(f"pretrained={model}", tasks, work / f"crows_base{suffix}")[0])


def plot_curves(history: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    figure, axis = plt.subplots(figsize=(5, 3.2), dpi=110)
    axis.plot(steps, [h["forget_perplexity"] for h in history], "o-", label="forget set (DGHS dev)")
    if "heldout_perplexity" in history[0]:
        axis.plot(steps, [h["heldout_perplexity"] for h in history], "s-", label="held-out (DGHS test)")
    axis.set_xlabel("unlearning step")
    axis.set_ylabel("perplexity")
    axis.set_yscale("log")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/issue4_bench")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-texts", type=int, default=64, help="Texts per perplexity evaluation (0 = all).")
    parser.add_argument("--steps", type=int, default=50, help="Paper default 50; fewer only when CPU time is short.")
    parser.add_argument("--crows-tasks", default="crows_bias",
                        help="lm-eval tasks for CrowS (e.g. crows_bias_gender,crows_bias_race_color,crows_bias_religion).")
    parser.add_argument("--wikitext-limit", type=int, default=4,
                        help="WikiText-2 articles (lm-eval --limit; 0 = all, -1 = skip).")
    parser.add_argument("--wikitext-max-length", type=int, default=1024, help="Rolling-window length (model_args).")
    parser.add_argument("--png", default=str(REPO / "docs" / "results" / "issue4_unlearn_curves.png"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = base_model()
    dghs = DATA / "dghs" / "dghs_women.csv"
    unlearned = work / "unlearned"
    unlearn_wall = None
    if not (unlearned / "debias_manifest.json").is_file():
        unlearn_wall = run_timed([
            str(Path(sys.executable).parent / "debias"), "unlearn",
            "--model", model, "--output", str(unlearned), "--force",
            "--corpus", str(dghs), "--where", "split=dev", "--heldout", str(dghs), "--heldout-where", "split=test",
            "--domain", "gender", "--batch-size", "8", "--steps", str(args.steps), "--lr", "1e-5",
            "--eval-every", str(args.eval_every), "--eval-texts", str(args.eval_texts),
        ])
    manifest = json.loads((unlearned / "debias_manifest.json").read_text())
    unlearn_wall = unlearn_wall or manifest["wall_seconds"]
    plot_curves(manifest["history"], Path(args.png),
                f"SmolLM2-135M, gender unlearning on DGHS women ({manifest['report']['texts_with_targets']} texts)")

    before = base_crows(model, work, args.crows_tasks)
    crows_dir = "crows_unlearned" + ("" if args.crows_tasks == "crows_bias" else "_" + args.crows_tasks.replace(",", "+"))
    after_results, crows_wall = lm_eval(f"pretrained={unlearned}", args.crows_tasks, work / crows_dir)
    after = crows_per_type(after_results)
    wiki_wall = 0.0
    if args.wikitext_limit >= 0:
        limit = ["--limit", str(args.wikitext_limit)] if args.wikitext_limit else []
        window = f",dtype=float32,max_length={args.wikitext_max_length}"
        wiki_before, _ = lm_eval(f"pretrained={model}{window}", "wikitext2_ppl", work / "wikitext_base", limit)
        wiki_after, wiki_wall = lm_eval(f"pretrained={unlearned}{window}", "wikitext2_ppl", work / "wikitext_unlearned",
                                        limit)

    print(f"\nunlearn wall time: {unlearn_wall:.0f} s; crows_bias (one model): {crows_wall:.0f} s; "
          f"wikitext2_ppl ({args.wikitext_limit or 'all'} articles, one model): {wiki_wall:.0f} s")
    print(f"report: {json.dumps(manifest['report'])}")
    print("\n| CrowS type | base | unlearned | change |\n| --- | ---: | ---: | ---: |")
    for name in [*CROWS_TYPES, "all"]:
        if name in before and name in after:
            print(f"| {name} | {before[name]:.2f} | {after[name]:.2f} | {after[name] - before[name]:+.2f} |")
    print("\n| metric | base | unlearned |\n| --- | ---: | ---: |")
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none") if wiki_wall else ():
        print(f"| wikitext2 {key.split(',')[0]} | {wiki_before['wikitext2_ppl'][key]:.3f} | "
              f"{wiki_after['wikitext2_ppl'][key]:.3f} |")
    for key, value in manifest["metrics"]["start"].items():
        print(f"| {key} | {value:.3f} | {manifest['metrics']['end'][key]:.3f} |")
    print("\nhistory:", json.dumps(manifest["history"]))


if __name__ == "__main__":
    main()
