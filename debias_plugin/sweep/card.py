"""The chosen model's Hugging Face model card (best/README.md) from the sweep's own records (sweep.json's content and
the model's manifest): model-index results equal to the report's numbers, and a short bias section."""

from __future__ import annotations

import math
from pathlib import Path

from debias_plugin.outputs import MANIFEST_NAME, read_manifest, write_text_atomically

CARD_NAME = "README.md"

# a task's data set as a reader knows it (task names are ours: crows_bias_gender, stereoset_bias, ...)
_DATASETS = {"crows": "CrowS-Pairs", "stereoset": "StereoSet", "wikitext": "WikiText-2", "bbq": "BBQ",
             "winogender": "WinoGender", "redditbias": "RedditBias", "seat": "SEAT"}


def dataset_name(task: str) -> str:
    return next((name for prefix, name in _DATASETS.items() if task.startswith(prefix)), task)


def eval_results(point: dict) -> list:
    """One EvalResult per finite metric the report shows for the point, and one per budget metric's change."""
    from huggingface_hub import EvalResult

    found = []
    for key, entry in sorted(point["metrics"].items()):
        value = entry.get("value")
        if value is None or not math.isfinite(value):
            continue
        task, metric = key.split("/", 1)
        args = {"low": entry["low"], "high": entry["high"], "method": entry.get("method")} \
            if entry.get("low") is not None else None
        found.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=dataset_name(task),
                                metric_type=metric, metric_value=value, metric_args=args))
    for key, check in sorted(point["budget"].items()):
        if check.get("relative_change") is not None:
            task, metric = key.split("/", 1)
            found.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=dataset_name(task),
                                    metric_type=f"{metric}_relative_change", metric_value=check["relative_change"],
                                    metric_name=f"{metric} change vs the base model"))
    return found


def _number(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def _interval(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    text = _number(entry["value"])
    return text + (f" [{_number(entry['low'])}, {_number(entry['high'])}]" if entry.get("low") is not None else "")


def _rows(point: dict, prefix: str, metric_names: tuple[str, ...], *, per_domain: bool = False) -> list[str]:
    """The card's table rows of one data set: the named metrics (and, per_domain, their `_<domain>` variants)."""
    rows = []
    for key, entry in sorted(point["metrics"].items()):
        task, metric = key.split("/", 1)
        named = metric in metric_names or (per_domain and "_gap" not in metric
                                            and any(metric.startswith(n + "_") for n in metric_names))
        if task.startswith(prefix) and named:
            rows.append(f"| {task} | {metric} | {_interval(entry)} |")
    return rows


def model_card_text(content: dict, chosen: dict, manifest: dict) -> str:
    """The card's text: YAML metadata (base model, tags, model-index) and the bias section."""
    from huggingface_hub import ModelCard, ModelCardData

    sweep = content["sweep"]
    method = sweep["method"]
    setting = ", ".join(f"{key} = {value:g}" if isinstance(value, float) else f"{key} = {value}"
                        for key, value in chosen["params"].items()) or "the base model itself"
    data = ModelCardData(base_model=content["base"] if not Path(content["base"]).is_absolute() else None,
                         tags=["debiasing", f"debias-{method}"], model_name=f"{content['study']} {chosen['name']}",
                         eval_results=eval_results(chosen), library_name="transformers")
    options = manifest.get("options") or {}
    budget = "; ".join(f"`{m}` {c['rule']}: {_number(c['value'])} (limit {_number(c['limit'])}"
                       + (f", {100 * c['relative_change']:+.2f}% vs the base model" if c.get("relative_change") is not None
                          else "") + ")" for m, c in chosen["budget"].items()) or "none"
    objective = content["sweep"]["objective"]
    lines = [
        f"# {chosen['name']}: {method} on {content['base']}", "",
        f"Chosen by `debias sweep` (study `{content['study']}`, sweep file sha256 `{content['sweep_sha256'][:12]}`) "
        f"as the setting closest to |`{objective}` − {sweep['target']:g}| = 0 within the budget, among "
        f"{len(content['points'])} evaluated points.", "",
        "## What was removed, and how", "",
        f"- Stage: `{method}` (debias_plugin), setting: {setting}.",
        f"- Fixed options: " + (", ".join(f"`{k}` = `{v}`" for k, v in sorted(sweep["fixed"].items())) or "none") + ".",
        f"- Base model: `{content['base']}`; weights sha256 `{chosen.get('model_sha256') or '–'}`.",
    ]
    if options:
        lines.append("- The stage's recorded options (debias_manifest.json): "
                     + ", ".join(f"`{k}` = `{v}`" for k, v in sorted(options.items()) if v is not None and k != "force") + ".")
    lines += ["", "## Bias and quality", "",
              f"Budget: {budget}. Intervals: {100 * (1 - sweep['alpha']):g}% (Clopper-Pearson for pair outcomes, "
              "percentile bootstrap otherwise).", "", "| task | metric | value [interval] |", "|---|---|---:|"]
    lines += _rows(chosen, "crows", ("pct_stereotype",))
    lines += _rows(chosen, "stereoset", ("ss", "lms", "icat"), per_domain=True)
    lines += _rows(chosen, "wikitext", ("word_perplexity",))
    lines += ["", "Every number here is also in the card's `model-index` and in the sweep's `sweep.json` / "
              "`report.md`; the model-index lists every metric the sweep recorded for this point.", ""]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines)).content


def write_model_card(out: Path, content: dict) -> Path | None:
    """best/README.md for a chosen stage output (never written into the base model's own folder)."""
    chosen = next((p for p in content["points"] if p["best"]), None)
    if chosen is None or chosen["role"] == "reference" or not chosen.get("model"):
        return None
    folder = out / chosen["model"]
    manifest = read_manifest(folder) if (folder / MANIFEST_NAME).is_file() else {}
    path = folder / CARD_NAME
    write_text_atomically(path, model_card_text(content, chosen, manifest))
    return path
