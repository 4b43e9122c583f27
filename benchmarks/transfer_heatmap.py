"""Issue 38, item 5: does removing one bias type move the others? A type x type heat map.

For each single-type bias vector (a LoRA fine-tune of the base on one RedditBias group, or on DGHS hate speech
about women, with the options of studies/two_models.yml's dghs_lora), negate it at one lambda (0.25: the scale
issue 15's negation sweeps chose, docs/RESULTS.md) and evaluate crows_bias (all nine types, per-pair samples).
Each cell is the change of one CrowS type's pct_stereotype from the base; its mark is the exact paired McNemar
test (debias_plugin.gate.stats), Holm-adjusted within the row (one vector, nine types).

Every step is cached in OUT (fine-tunes, negated models, per-pair outcomes), so a killed run resumes:

    nice python benchmarks/transfer_heatmap.py --out runs/transfer [--model default] [--lambda 0.25]
        # -> docs/results/issue38_transfer_<model>.{png,json}
    python benchmarks/transfer_heatmap.py --out runs/transfer --report-only   # tabulate the finished cells only
    python benchmarks/transfer_heatmap.py --out /tmp/t --model TINY --steps 2 --limit 4 --results /tmp/t  # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAMBDA = 0.25
TASK = "crows_bias"
REDDIT = "reddit_bias/{0}_reddit_comments_{0}_{1}_biased_test_reduced.csv"
# name -> (corpus under the data folder, text column, row filter, the CrowS type it targets)
VECTORS = {
    "reddit_race_black": (REDDIT.format("race", "black"), "comment", {}, "race-color"),
    "reddit_religion_jews": (REDDIT.format("religion1", "jews"), "comment", {}, "religion"),
    "reddit_religion_muslims": (REDDIT.format("religion2", "muslims"), "comment", {}, "religion"),
    "reddit_orientation_lgbtq": (REDDIT.format("orientation", "lgbtq"), "comment", {}, "sexual-orientation"),
    "reddit_gender_female": (REDDIT.format("gender", "female"), "comment", {}, "gender"),
    "dghs_women": ("dghs/dghs_women.csv", "text", {"label": "hate"}, "gender"),
}
# studies/two_models.yml, prepare.dghs_lora (LoRA r=8, alpha=16 by default)
CHECKPOINT_EVERY = 10
FINETUNE = {"steps": 100, "lr": 1.0e-3, "batch_size": 16, "max_length": 64, "seed": 0}


def _timed(function):
    """(result, {wall_s, cpu_s}) of function(); cpu_s counts this process's CPU time, all threads."""
    wall, cpu = time.monotonic(), time.process_time()
    result = function()
    return result, {"wall_s": round(time.monotonic() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}


def finetune(base: Path, name: str, out: Path, steps: int) -> tuple[Path, dict]:
    """The LoRA adapter of one bias vector (cached: a finished adapter folder is reused)."""
    folder = out / "adapters" / name
    done = folder / "timing.json"
    if done.is_file():
        return folder, json.loads(done.read_text())
    from debias_plugin.methods.finetune import Finetune, FinetuneOptions
    from debias_plugin.paths import data_file
    from debias_plugin.training import TrainConfig, train

    corpus, column, where, _ = VECTORS[name]
    options = FinetuneOptions(corpus=str(data_file(None, corpus, corpus)), column=column, where=where, lora=True)
    config = TrainConfig(model=str(base), output=str(folder), force=True, checkpoint_every=CHECKPOINT_EVERY,
                         **{**FINETUNE, "steps": steps})  # a killed fine-tune resumes from its last checkpoint
    _, timing = _timed(lambda: train(config, Finetune(options)))  # a resumed run times only its last part
    done.write_text(json.dumps(timing))
    return folder, timing


def negated(base: Path, adapter: Path, name: str, lam: float, out: Path) -> tuple[Path, dict]:
    """base - lam * (base+adapter - base) (cached)."""
    folder = out / "negated" / f"{name}_lambda_{lam:g}"
    timing_file = out / "negated" / f"{name}_lambda_{lam:g}.timing.json"
    if (folder / "debias_manifest.json").is_file():
        return folder, json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    from debias_plugin.merge import negate

    _, timing = _timed(lambda: negate(base, adapter=adapter, lambdas=[lam], out=folder, force=True, progress=False))
    timing_file.write_text(json.dumps(timing))
    return folder, timing


def outcomes(model: Path, name: str, out: Path, limit: int | None) -> dict:
    """Per-type pair keys and outcomes (1 = the stereotype wins) of crows_bias on one model (cached)."""
    path = out / "outcomes" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from debias_plugin.data.crows import CROWS_BIAS_TYPES, crows_type_task
    from debias_plugin.evaluation import evaluate
    from debias_plugin.gate.results import metric_samples, results_from_dict

    results, timing = _timed(lambda: evaluate(model, [TASK], limit=limit, device="cpu"))
    results = results_from_dict(dict(results), str(model))
    record = {"timing": timing, "types": {}}
    for bias_type in CROWS_BIAS_TYPES:
        samples, reason = metric_samples(results, crows_type_task(bias_type), "pct_stereotype")
        if samples is None:
            raise SystemExit(f"{model}: {bias_type}: {reason}")
        record["types"][bias_type] = {"keys": [list(map(str, key)) for key in samples.keys],
                                      "outcome": [int(x) for x in samples.columns["outcome"]]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def cell(candidate: dict, baseline: dict) -> dict:
    """One type under one vector: both pct_stereotype values, the change, the gap change, exact paired p-values."""
    import numpy as np

    from debias_plugin.gate import stats

    position = {tuple(key): i for i, key in enumerate(baseline["keys"])}
    order = [position[tuple(key)] for key in candidate["keys"]]
    mine, theirs = np.array(candidate["outcome"], bool), np.array(baseline["outcome"], bool)[order]
    table = stats.pair_table(mine, theirs)
    p_change = min(stats.mcnemar_worse(table, "higher").p_value, stats.mcnemar_worse(table, "lower").p_value)
    c, b = 100 * float(mine.mean()), 100 * float(theirs.mean())
    return {"pairs": int(mine.size), "base": round(b, 2), "negated": round(c, 2), "change": round(c - b, 2),
            "gap_change": round(abs(c - 50) - abs(b - 50), 2), "p_change": p_change,
            "p_farther_from_50": stats.farther_from_half(table).p_value, "discordant": [table.candidate_only,
                                                                                          table.baseline_only]}


def table(base: dict, rows: dict[str, dict]) -> dict[str, dict]:
    """Every vector's nine cells, with Holm-adjusted p (within the row) of the change."""
    from debias_plugin.gate import stats

    out = {}
    for name, record in rows.items():
        cells = {t: cell(record["types"][t], base["types"][t]) for t in base["types"]}
        for (t, entry), adjusted in zip(cells.items(), stats.holm([c["p_change"] for c in cells.values()])):
            entry["p_change_holm"] = float(adjusted)
        out[name] = cells
    return out


def plot(cells: dict[str, dict], pending: list[str], types: list[str], base: dict[str, float], title: str,
         folder: Path, stem: str) -> None:
    """Rows: vectors (pending ones blank), columns: CrowS types; a box marks each vector's own type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from debias_plugin.sweep.plots import save_plot

    names = [*cells, *pending]
    values = np.array([[cells[n][t]["change"] if n in cells else np.nan for t in types] for n in names])
    limit = max(1.0, float(np.nanmax(np.abs(values))))
    figure, axes = plt.subplots(figsize=(9.6, 1.9 + 0.5 * len(names)))
    image = axes.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for i, name in enumerate(names):
        for j, bias_type in enumerate(types):
            if name not in cells:
                axes.text(j, i, "pending", ha="center", va="center", fontsize=7, color="0.5")
                continue
            entry = cells[name][bias_type]
            mark = "**" if entry["p_change_holm"] < 0.01 else "*" if entry["p_change_holm"] < 0.05 else ""
            dark = abs(entry["change"]) > 0.6 * limit
            axes.text(j, i, f"{entry['change']:+.1f}{mark}", ha="center", va="center", fontsize=8,
                      color="white" if dark else "black")
            if VECTORS.get(name, (None,) * 4)[3] == bias_type:
                axes.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
    axes.set_xticks(range(len(types)), [f"{t.replace('-', '-' + chr(10))}\nbase {base[t]:.1f}" for t in types],
                    fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="change of\npct_stereotype (points)", fraction=0.04)
    save_plot(figure, folder, stem, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Work folder: adapters, negated models, outcomes (resumable).")
    parser.add_argument("--model", default="default", help="Base model folder, or 'default' (debias default-model).")
    parser.add_argument("--label", default=None, help="Model name in the output file names (default: folder name).")
    parser.add_argument("--lambda", dest="lam", type=float, default=LAMBDA)
    parser.add_argument("--steps", type=int, default=FINETUNE["steps"], help="Fine-tune steps (smoke: 2).")
    parser.add_argument("--limit", type=int, default=None, help="Pairs per CrowS type (smoke only; never reported).")
    parser.add_argument("--vectors", default=",".join(VECTORS), help="Comma-separated subset of the vectors.")
    parser.add_argument("--results", default=str(REPO / "docs/results"), help="Where the PNG and JSON go.")
    parser.add_argument("--report-only", action="store_true",
                        help="Tabulate what OUT holds already (the rest listed as pending); train and evaluate nothing "
                             "but the base.")
    args = parser.parse_args(argv)
    from debias_plugin.data.crows import CROWS_BIAS_TYPES

    if args.model == "default":
        from debias_plugin.default_model import materialize_default_model  # what `debias default-model` prints

        base = materialize_default_model()
    else:
        base = Path(args.model).expanduser().resolve()
    label = args.label or base.name.lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_record = outcomes(base, "base", out, args.limit)
    rows, timings, pending = {}, {}, []
    for name in args.vectors.split(","):
        if args.report_only and not (out / "outcomes" / f"{name}_lambda_{args.lam:g}.json").is_file():
            continue  # not evaluated yet: pending
        try:
            adapter, train_time = finetune(base, name, out, args.steps)
            model, merge_time = negated(base, adapter, name, args.lam, out)
            rows[name] = outcomes(model, f"{name}_lambda_{args.lam:g}", out, args.limit)
            timings[name] = {"finetune": train_time, "negate": merge_time, "evaluate": rows[name]["timing"]}
        except KeyboardInterrupt:
            pending.append(name)
            break
    pending += [n for n in args.vectors.split(",") if n not in rows and n not in pending]
    cells = table(base_record, rows)
    report = {
        "question": "issue 38 item 5: the change of every CrowS type's pct_stereotype when one single-type bias "
                    "vector is negated (theta = base - lambda * (biased - base))",
        "model": str(base.name), "lambda": args.lam,
        "lambda_why": "0.25: the negation scale of issue 15 (docs/RESULTS.md)",
        "finetune": {**FINETUNE, "steps": args.steps, "lora": True, "lora_r": 8, "lora_alpha": 16},
        "vectors": {n: {"corpus": v[0], "column": v[1], "where": v[2], "targets": v[3]} for n, v in VECTORS.items()
                    if n in args.vectors.split(",")},
        "limit": args.limit, "test": "exact McNemar (two one-sided sign tests on discordant pairs, Bonferroni), "
                                     "Holm within a row; * p_holm < 0.05, ** < 0.01",
        "base": {t: round(100 * sum(v["outcome"]) / len(v["outcome"]), 2) for t, v in base_record["types"].items()},
        "base_timing": base_record["timing"], "cells": cells, "timings": timings, "pending": pending,
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = f"issue38_transfer_{label}"
    (results / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    if cells:
        title = (f"{base.name}: change of each CrowS type's pct_stereotype after negating one bias vector "
                 f"(lambda = {args.lam:g})\nbox: the vector's own type; exact McNemar, Holm within a row: "
                 "* p < .05, ** p < .01")
        plot(cells, pending, list(CROWS_BIAS_TYPES), report["base"], title, results, stem)
    return report


if __name__ == "__main__":
    main()
