"""The sweep's plots, PNG + SVG and byte-reproducible: bias against the budget metric (the Pareto front) and the
bias per type against the knob."""

from __future__ import annotations

from pathlib import Path

from debias_plugin.sweep import metrics
from debias_plugin.sweep.plan import Sweep


def save_plot(figure, folder: Path, name: str, **options) -> None:
    """PNG and SVG, byte-reproducible (no date, fixed SVG ids), so a committed plot changes only with its data."""
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": name}):
        figure.savefig(folder / f"{name}.png", dpi=120, **options)
        figure.savefig(folder / f"{name}.svg", metadata={"Date": None}, **options)


def _knob_value(sweep: Sweep, point: dict):
    knob = sweep.knob
    if knob is None:
        return None
    if knob in point["params"]:
        return float(point["params"][knob])
    return sweep.reference_knob_value if point["role"] == "reference" else None


def plot(folder: Path, sweep: Sweep, content: dict) -> list[str]:
    """bias_vs_budget (Pareto front, budget line) and bias_by_type (per-type bias vs the knob), PNG + SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, made = sweep.config, []
    points = [p for p in content["points"] if not p["error"] and p["objective"]["value"] is not None]
    if config.budget and points:
        metric, rule = next(iter(config.budget.items()))
        figure, axis = plt.subplots(figsize=(6.4, 4.4))
        xs = [p["budget"][metric]["value"] for p in points]
        ys = [p["objective"]["value"] for p in points]
        axis.errorbar(xs, ys, xerr=_error_bars(points, metric), yerr=_error_bars(points, config.objective), fmt="o",
                      color="tab:gray", alpha=0.6, label="settings (with intervals)")
        for p, x, y in zip(points, xs, ys):
            if x is not None:
                axis.annotate(p["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = sorted((x, y) for p, x, y in zip(points, xs, ys) if p["pareto"] and x is not None)
        if front:
            axis.plot(*zip(*front), "-", color="tab:blue", marker="o", label="Pareto front (within budget)")
        limit = points[0]["budget"][metric]["limit"]
        if limit is not None:
            axis.axvline(limit, color="tab:red", linestyle="--", label=f"budget ({rule.describe()})")
        axis.axhline(config.target, color="tab:green", linestyle=":", label=f"target {config.target:g}")
        best = next((p for p in points if p["best"]), None)
        if best:
            axis.plot([best["budget"][metric]["value"]], [best["objective"]["value"]], "*", color="tab:orange",
                      markersize=16, label=f"chosen: {best['name']}")
        shown = [x for x in xs if x is not None]
        logarithmic = bool(shown) and min(shown) > 0 and max(shown) > 10 * min(shown)  # e.g. a collapsed model
        if logarithmic:
            axis.set_xscale("log")
        axis.set_xlabel(metric + (" (log scale)" if logarithmic else ""))
        axis.set_ylabel(config.objective)
        axis.legend(fontsize=7)
        figure.tight_layout()
        save_plot(figure, folder, "bias_vs_budget")
        plt.close(figure)
        made.append("bias_vs_budget")
    series = [p for p in points if _knob_value(sweep, p) is not None]
    groups = _series(sweep, series)
    if series:
        figure, axis = plt.subplots(figsize=(6.4, 4.4))
        if len(groups) == 1:  # one run or one knob: every type of the objective's group against the knob
            members = groups[0][1]
            xs = [_knob_value(sweep, p) for p in members]
            leaves = sorted({leaf for p in members for leaf in metrics.leaf_metrics(p["metrics"], config.objective)})
            for leaf in leaves:
                ys = [metrics.leaf_metrics(p["metrics"], config.objective).get(leaf) for p in members]
                axis.plot(xs, [float("nan") if y is None else y for y in ys], marker=".", linewidth=1, label=leaf)
            axis.plot(xs, [p["objective"]["value"] for p in members], "k-", marker="o", linewidth=2.5, label="all")
        else:  # several grid settings: the objective of each against the knob
            for label, members in groups:
                axis.plot([_knob_value(sweep, p) for p in members], [p["objective"]["value"] for p in members],
                          marker="o", label=label)
        axis.axhline(config.target, color="tab:green", linestyle=":")
        axis.set_xlabel(sweep.knob)
        axis.set_ylabel(config.objective)
        axis.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        save_plot(figure, folder, "bias_by_type")
        plt.close(figure)
        made.append("bias_by_type")
    if content.get("sampling") and config.budget and points:
        front_plot(folder, sweep, points)
        made.append("front")
    return made


def front_plot(folder: Path, sweep: Sweep, points: list[dict]) -> None:
    """A sampled search: distance to the target against the first budget metric's change, the front joined, the
    points that break the budget crossed."""
    import matplotlib.pyplot as plt

    metric, rule = next(iter(sweep.config.budget.items()))
    relative = all(p["budget"][metric]["relative_change"] is not None for p in points)

    def x(point: dict) -> float:
        check = point["budget"][metric]
        return 100 * check["relative_change"] if relative else check["value"]

    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    for feasible, style in ((True, dict(marker="o", color="tab:gray")), (False, dict(marker="x", color="tab:red"))):
        chosen = [p for p in points if p["feasible"] == feasible and p["budget"][metric]["value"] is not None]
        if chosen:
            axis.scatter([x(p) for p in chosen], [p["objective"]["distance"] for p in chosen], alpha=0.7,
                         label="within budget" if feasible else "breaks the budget", **style)
    front = sorted((x(p), p["objective"]["distance"]) for p in points if p["pareto"])
    if front:
        axis.plot(*zip(*front), "-o", color="tab:blue", label="front")
    best = next((p for p in points if p["best"]), None)
    if best:
        axis.plot([x(best)], [best["objective"]["distance"]], "*", color="tab:orange", markersize=16,
                  label=f"chosen: {best['name']}")
    limit = points[0]["budget"][metric]["limit"]
    if relative and rule.kind == "max_relative_increase":
        axis.axvline(100 * rule.max_relative_increase, color="tab:red", linestyle="--", label=f"budget ({rule.describe()})")
    elif not relative and limit is not None:
        axis.axvline(limit, color="tab:red", linestyle="--", label=f"budget ({rule.describe()})")
    axis.set_xlabel(f"{metric} change vs base (%)" if relative else metric)
    axis.set_ylabel(f"|{sweep.config.objective} - {sweep.config.target:g}|")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_plot(figure, folder, "front")
    plt.close(figure)


def _series(sweep: Sweep, points: list[dict]) -> list[tuple[str, list[dict]]]:
    """Points grouped by everything but the knob (one group per training run of a checkpoint grid), by knob."""
    groups: dict[str, list[dict]] = {}
    for point in points:
        rest = {k: v for k, v in point["params"].items() if k != sweep.knob}
        label = ", ".join(f"{k}={v}" for k, v in rest.items()) or "sweep"
        groups.setdefault(label, []).append(point)
    if len(groups) > 1 and "sweep" in groups:  # the base model starts every run
        reference = groups.pop("sweep")
        groups = {label: reference + members for label, members in groups.items()}
    return [(label, sorted(members, key=lambda p: _knob_value(sweep, p))) for label, members in groups.items()]


def _error_bars(points: list[dict], metric: str) -> list[list[float]]:
    """Each point's distance from its value down and up to its interval's ends (0 where unknown), for errorbar."""
    def gap(entry: dict | None, side: str) -> float:
        if not entry or entry.get(side) is None or entry.get("value") is None:
            return 0.0
        return abs(entry["value"] - entry[side])

    return [[gap(p["metrics"].get(metric), side) for p in points] for side in ("low", "high")]
