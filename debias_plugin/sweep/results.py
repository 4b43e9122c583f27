"""What a sweep found, from its Optuna study alone (pure apart from reading the study and model manifests): each
point's metrics, budget checks and Pareto membership, the choice, the search replayed, and the work still pending.

sweep.json is deterministic apart from its "run" section (timings, requests scored, hosts, when): the same sweep
gives the same file whether it ran in one go, was killed and resumed, or was shared by several processes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from debias_plugin.errors import DebiasError
from debias_plugin.outputs import MANIFEST_NAME, read_manifest
from debias_plugin.sweep import metrics
from debias_plugin.sweep.plan import SCHEMA, Sweep
from debias_plugin.sweep.search import Observation, SearchResult, next_step
from debias_plugin.sweep.stage import search_is_integer
from debias_plugin.sweep.storage import Studies, pareto_keys, recorded_points


def _ordered_keys(sweep: Sweep, recorded: dict) -> list[str]:
    """Reference, then the plan's order (grid / checkpoints), then search points by knob value."""
    keys = [point.key for job in sweep.jobs() for point in job.points if point.key in recorded]
    if sweep.config.search:
        knob = sweep.search_knob
        search = [k for k, t in recorded.items() if t.user_attrs.get("role") == "search"]
        keys += sorted(search, key=lambda k: float(recorded[k].user_attrs["params"][knob]))
    return keys


def _point_entry(sweep: Sweep, trial, full, reference_summary: dict, front: set) -> dict:
    attrs = trial.user_attrs
    summary = dict(attrs.get("summary", {}))
    suites, tasks = ["screen"], list(attrs.get("tasks", []))
    notes = []
    if full is not None and full.user_attrs.get("summary") is not None:
        summary.update(full.user_attrs["summary"])
        suites.append("full")
        tasks += full.user_attrs.get("tasks", [])
        if full.user_attrs.get("model_sha256") != attrs.get("model_sha256"):
            notes.append("the full suite ran on a rebuilt model whose files differ from the screened one")
    elif full is not None and full.user_attrs.get("error"):
        notes.append(f"full suite failed: {full.user_attrs['error']}")
    objective = metrics.value_of(summary, sweep.config.objective)
    checks = metrics.feasibility(summary, reference_summary, sweep)
    error = attrs.get("error")
    types = {"types": attrs.get("types")} if sweep.config.types_not_worse else {}
    return {
        "key": attrs["key"], "name": attrs["name"], "role": attrs["role"], "params": attrs.get("params", {}),
        "model": attrs.get("model"), "model_sha256": attrs.get("model_sha256"),
        "suite": "full" if "full" in suites else "screen", "tasks": tasks,
        "metrics": {key: summary[key] for key in sorted(summary)},
        "objective": {"metric": sweep.config.objective, "value": objective, "target": sweep.config.target,
                      "distance": None if objective is None else abs(objective - sweep.config.target)},
        "budget": checks, **types,
        "feasible": error is None and objective is not None and all(c["holds"] for c in checks.values())
        and metrics.types_hold(attrs.get("types"), sweep),
        "pareto": attrs["key"] in front, "error": error, "notes": notes,
    }


def search_step(sweep: Sweep, points: list[tuple[str, dict, dict]], reference: dict) -> SearchResult:
    """The budget search's next step from the recorded points' (role, params, summary): the run and the report
    replay the same observations. A point stopped over budget by the sequential screen has summary None."""
    knob, at_base = sweep.search_knob, sweep.reference_knob_value
    observations = {}
    for role, params, summary in points:
        if role == "search" and summary is None:
            observations[float(params[knob])] = Observation(float("nan"), False)
        elif role == "search":
            observations[float(params[knob])] = observation(summary, reference, sweep)
        elif role == "reference" and at_base is not None:
            observations[at_base] = observation(summary, reference, sweep)
    low, high = sweep.config.search[knob]
    return next_step(low, high, observations, target=sweep.config.target, tolerance=sweep.config.tolerance,
                     max_evaluations=sweep.config.max_evaluations, integer=search_is_integer(sweep))


def observation(summary: dict, reference: dict, sweep: Sweep) -> Observation:
    """What the budget search sees of a point: the signed objective metric and whether every budget rule holds."""
    value = metrics.value_of(summary, sweep.config.objective)
    if value is None:
        return Observation(float("nan"), False)
    return Observation(value, all(check["holds"] for check in metrics.feasibility(summary, reference, sweep).values()))


def search_summary(sweep: Sweep, points: list[dict], reference_summary: dict, stopped: list[dict] = ()) -> dict | None:
    """The budget search replayed from the recorded points and those the sequential screen stopped over budget (the
    runner stopped at exactly this state)."""
    if not sweep.config.search:
        return None
    result = search_step(sweep, [(p["role"], p["params"], p["metrics"]) for p in points]
                         + [(p["role"], p["params"], None) for p in stopped if p["verdict"] == "violated"],
                         reference_summary)
    low, high = sweep.config.search[sweep.search_knob]
    return {"knob": sweep.search_knob, "range": [low, high], "max_evaluations": sweep.config.max_evaluations,
            "tolerance": sweep.config.tolerance, "finished": result.proposal is None, "next": result.proposal,
            "evaluations": result.evaluations, "bracket": [result.low, result.high], "best_value": result.best,
            "reason": result.reason, "monotonicity_violations": result.violations,
            "reference_used_as_low_end": sweep.reference_knob_value == low}


def _screened(screens) -> tuple[dict[str, dict], list[dict], dict]:
    """From the screen study (sequential evaluation): each passed point's screen record, the stopped points (their
    verdict, interval at stop and documents scored: never a metric value), and the run section's CPU account."""
    from debias_plugin.sweep.sequential_eval import screens as finished

    passed, stopped, cpu = {}, [], {"stopped": 0.0, "passed": 0.0, "saved_estimate": 0.0}
    scored = {"stopped": 0, "stopped_full": 0}
    for key, trial in finished(screens).items():
        record = dict(trial.user_attrs.get("screen", {}))
        seconds = record.pop("cpu_seconds", {})
        record.pop("looks", None)
        entry = {"key": key, "name": trial.user_attrs.get("name"), "role": trial.user_attrs.get("role"),
                 "params": trial.user_attrs.get("params", {}), **record}
        if record.get("verdict") in ("violated", "dominated"):
            stopped.append(entry)
            cpu["stopped"] += sum(seconds.values())
            for task, count in record.get("documents_scored", {}).items():
                full = record["population"][task]
                scored["stopped"] += count
                scored["stopped_full"] += full
                cpu["saved_estimate"] += seconds.get(task, 0.0) * (full - count) / max(count, 1)
        else:
            passed[key] = entry
            cpu["passed"] += sum(seconds.values())
    cpu = {name: round(value, 1) for name, value in cpu.items()}
    cpu["net_saved_estimate"] = round(cpu["saved_estimate"] - cpu["passed"], 1)
    return passed, stopped, {**scored, "cpu_seconds": cpu}


def collect(sweep: Sweep, studies: Studies, *, base: Path | None = None, screens=None) -> tuple[dict, dict]:
    """(the deterministic sweep.json content, the run section: costs and timings). `screens`: the screen study of
    a sequential evaluation (sequential_eval.screen_study), None for `evaluation: full`."""
    recorded = recorded_points(studies.results)
    if "base" not in recorded:
        raise DebiasError("The study has no result for the base model yet: the sweep has not started there.")
    full = recorded_points(studies.full)
    front = set(pareto_keys(studies.results))
    reference_summary = recorded["base"].user_attrs.get("summary", {})
    points = [_point_entry(sweep, recorded[key], full.get(key), reference_summary, front)
              for key in _ordered_keys(sweep, recorded)]
    directions = sweep.directions[1:]
    chosen = metrics.choose({**p, "distance": p["objective"]["distance"], "directions": directions,
                             "budget_values": [p["budget"][m]["value"] for m in sweep.config.budget]}
                            for p in points)
    for point in points:
        point["best"] = point["key"] == chosen
    passed, stopped, screening = _screened(screens) if sweep.config.evaluation == "sequential" else ({}, [], None)
    for point in points:
        if point["key"] in passed:
            point["screening"] = {k: v for k, v in passed[point["key"]].items() if k not in ("key", "name", "role", "params")}
    done = set(recorded) | {entry["key"] for entry in stopped}
    pending = {"screen": [point.name for job in sweep.jobs() for point in job.points if point.key not in done],
               "full": [p["name"] for p in points
                        if sweep.full_tasks and _wants_full_suite(p) and p["suite"] != "full"]}
    counts = {"screen": sum(1 for p in points if not p["error"]),
              "full": sum(1 for p in points if p["suite"] == "full")}
    content = {
        "schema": SCHEMA, "study": sweep.study_name, "sweep_sha256": sweep.sha256,
        "sweep": sweep.config.model_dump(mode="json"),
        "base": str(base) if base else sweep.config.base,
        "tasks": {"screen": sweep.screen_tasks, "full": sweep.config.evaluate},
        "points": points, "pareto_front": [p["key"] for p in points if p["pareto"]], "best": chosen,
        "best_name": next((p["name"] for p in points if p["key"] == chosen), None),
        "search": search_summary(sweep, points, reference_summary, stopped),
        "evaluations": counts, "pending": pending,
    }
    if screening is not None:
        content["stopped"] = stopped  # screened out early: a verdict, never a value in tables or plots
    costs = {}
    for key, trial in recorded.items():
        costs[trial.user_attrs["name"]] = {"screen": trial.user_attrs.get("cost")}
        if key in full:
            costs[trial.user_attrs["name"]]["full"] = full[key].user_attrs.get("cost")
    run = {"generated_utc": datetime.now(UTC).isoformat(timespec="seconds"), "cost": costs,
           "requests_scored": _total(costs, "scored"), "requests_received": _total(costs, "received"),
           "evaluation_seconds": round(sum((c or {}).get("seconds", 0) for entry in costs.values()
                                           for c in entry.values()), 1)}
    if screening is not None:
        run["screening"] = screening
    return content, run


def _total(costs: dict, kind: str) -> int:
    return sum(value for entry in costs.values() for cost in entry.values() if cost
               for key, value in cost.items() if key.endswith("_" + kind))


def _wants_full_suite(point: dict) -> bool:
    """The remaining tasks go to the (feasible) Pareto front and the chosen point only."""
    return (point["pareto"] or point["best"]) and not point["error"]


def full_suite_keys(sweep: Sweep, studies: Studies) -> list[str]:
    """Points that get the remaining tasks, in report order."""
    content, _ = collect(sweep, studies)
    return [p["key"] for p in content["points"] if _wants_full_suite(p)]


def unfinished_work(content: dict) -> list[str]:
    """What a sweep.json still lacks before its choice is final: planned points, full-suite runs, search steps."""
    pending, search = content.get("pending") or {}, content.get("search") or {}
    unfinished = []
    if pending.get("screen"):
        names = ", ".join(f"`{name}`" for name in pending["screen"])
        unfinished.append(f"{len(pending['screen'])} planned point(s) not evaluated yet ({names})")
    if pending.get("full"):
        unfinished.append("the full suite not yet run on " + ", ".join(f"`{name}`" for name in pending["full"]))
    if not search.get("finished", True):
        step = f" (next: {search['knob']} {search['next']:g})" if search.get("next") is not None else ""
        unfinished.append(f"the budget search not finished{step}")
    return unfinished


def closest_miss(content: dict) -> dict | None:
    """The setting nearest its budget when every one tried broke it: the base was chosen for want of any other."""
    settings = [p for p in content["points"] if p["role"] != "reference" and not p["error"]]
    best = next((p for p in content["points"] if p["best"]), None)
    if not settings or best is None or best["role"] != "reference":
        return None
    judged = all(c["value"] is not None and c["limit"] for p in settings for c in p["budget"].values())
    if not judged or any(all(c["holds"] for c in p["budget"].values()) for p in settings):
        return None

    def overshoot(point: dict) -> float:  # the worst broken rule, as a fraction of its limit
        return max(abs(c["value"] - c["limit"]) / abs(c["limit"]) for c in point["budget"].values() if not c["holds"])

    return min(settings, key=overshoot)


def stage_seconds(out: Path, point: dict, recorded: float | None = None) -> float | None:
    """A sweep point's stage time: sweep.json's copy (`recorded`, so a table renders from saved sweep files alone),
    else the model's manifest (a checkpoint's: its run's); none for the base, where no stage ran (a built-in base's
    manifest holds default-model's time)."""
    if point["role"] == "reference" or not point.get("model"):
        return None
    if recorded is not None:
        return recorded
    folder = (out / point["model"]).resolve()
    if folder.parent.name.endswith(".snapshots"):
        folder = folder.parent.with_name(folder.parent.name.removesuffix(".snapshots"))
    if not (folder / MANIFEST_NAME).is_file():  # the base model itself
        return None
    timings = read_manifest(folder).get("timings", {})
    if timings.get("wall_seconds") is not None:
        return timings["wall_seconds"]
    parts = [v for k, v in timings.items() if k.endswith("_s")]
    return round(sum(parts), 1) if parts else None  # a 0.04 s merge is 0.0 s, not unknown
