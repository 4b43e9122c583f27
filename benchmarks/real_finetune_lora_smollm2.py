"""Real-model check of `debias finetune --lora` on SmolLM2-135M over RedditBias gender comments (not a test).

A LoRA adapter trained on the female-targeted biased comments should make the model MORE biased: this prints
CrowS gender pct_stereotype of the base model and of base+adapter (lm-eval's hf model with peft=), the
adapter's size and the wall time. Results are cached in --work; base numbers come from
/work/notes/base_smollm2_crows.json when present.

    nice -n 10 python benchmarks/real_finetune_lora_smollm2.py --work /tmp/issue4_bench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_unlearn_smollm2 import DATA, base_crows, base_model, crows_per_type, lm_eval, run_timed  # noqa: E402

CORPUS = DATA / "reddit_bias" / "gender_reddit_comments_gender_female_biased_test_reduced.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/issue4_bench")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--adapter", default=None,
                        help="Measure an adapter `debias finetune --lora` already wrote (its manifest has the options).")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = base_model()
    adapter = Path(args.adapter) if args.adapter else work / "lora_gender"
    wall = None
    if not (adapter / "debias_manifest.json").is_file():
        wall = run_timed([
            str(Path(sys.executable).parent / "debias"), "finetune", "--model", model, "--output", str(adapter),
            "--force", "--corpus", str(CORPUS), "--column", "comment", "--lora", "--lora-r", "8", "--lora-alpha", "16",
            "--steps", str(args.steps), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length),
        ])
    manifest = json.loads((adapter / "debias_manifest.json").read_text())
    wall = wall or manifest["wall_seconds"]
    sizes = {p.name: p.stat().st_size for p in adapter.iterdir() if p.name.startswith("adapter_")}
    before = base_crows(model, work)
    after_results, crows_wall = lm_eval(f"pretrained={model},peft={adapter}", "crows_bias_gender",
                                        work / "crows_lora_gender")
    after = crows_per_type(after_results)
    opts = manifest["options"]
    print(f"\nfinetune wall time: {wall:.0f} s ({opts['steps']} steps, batch {opts['batch_size']}, lr {opts['lr']}, "
          f"max_length {opts['max_length']}, LoRA r={opts['method']['lora_r']} alpha={opts['method']['lora_alpha']}, "
          f"modules {opts['method']['lora_target_modules'] or 'peft default'}); crows_bias_gender: {crows_wall:.0f} s")
    print(f"adapter files: {sizes}")
    print(f"corpus perplexity: {manifest['metrics']['start']['corpus_perplexity']:.2f} -> "
          f"{manifest['metrics']['end']['corpus_perplexity']:.2f}")
    print(f"\n| CrowS gender | base | LoRA bias fine-tune | change |\n| --- | ---: | ---: | ---: |\n"
          f"| pct_stereotype | {before['gender']:.2f} | {after['gender']:.2f} | {after['gender'] - before['gender']:+.2f} |")


if __name__ == "__main__":
    main()
