"""The README's trade-off picture from a recorded negation run (docs/results/issue6_real_negate.json).

CrowS-Pairs distance from 50 (|pct_stereotype - 50|, all 1508 pairs) against WikiText-2 word perplexity, one
point per model: base, the bias fine-tune, each negation strength lambda, and the random-direction control.

    python benchmarks/plot_negate_tradeoff.py [--json docs/results/issue6_real_negate.json]
                                              [--out docs/results/tradeoff_negate_smollm2.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(REPO / "docs/results/issue6_real_negate.json"))
    parser.add_argument("--out", default=str(REPO / "docs/results/tradeoff_negate_smollm2.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(Path(args.json).read_text())["rows"]
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    negations = sorted((name for name in rows if name.startswith("negated") and "random" not in name),
                       key=lambda name: float(name.split("=")[-1]))
    path = ["base", *negations]
    axes.plot([rows[n]["wikitext2_word_perplexity"] for n in path],
              [abs(rows[n]["crows_pct_stereotype"]["all"] - 50) for n in path], "-", color="0.7", zorder=1)
    for name, row in rows.items():
        x, y = row["wikitext2_word_perplexity"], abs(row["crows_pct_stereotype"]["all"] - 50)
        marker = "s" if name == "base" else "^" if name.startswith("biased") else "x" if "random" in name else "o"
        axes.scatter([x], [y], marker=marker, s=40, zorder=2)
        label = name.replace("negated lambda = ", "λ = ").replace(" (base+LoRA)", "")
        label = "random direction, λ = 1" if "random" in name else label
        below = name.endswith("= 0.25")  # next to lambda = 0.5: its label goes underneath
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(-4, -13) if below else (6, 4), fontsize=8)
    axes.set_xscale("log")
    axes.margins(x=0.08, y=0.12)
    axes.set_xlabel("WikiText-2 word perplexity (first 3 articles; lower is better)")
    axes.set_ylabel("CrowS |pct_stereotype − 50| (lower is better)")
    axes.set_title("SmolLM2-135M: negating a DGHS bias vector, θ = base − λ·τ", fontsize=10)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
