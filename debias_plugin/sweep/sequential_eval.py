"""A sweep point's sequential paired screen: its documents in growing chunks, stopped once it surely breaks a budget
rule or is surely farther from the target than the incumbent (debias_plugin.gate.sequential's statistics).

Every task's units are taken in ONE seeded order (`order_seed`), the same for the base, the incumbent and every
point, so each chunk is a paired sample without replacement of the full set. The chunks end at SCHEDULE's fractions
of each task; a point still undecided after the last, or decided within budget earlier, gets the ordinary full
evaluation (the numbers every report shows). Units: WikiText-style perplexity tasks (loglikelihood_rolling) are
scored per rolling window (hf-bias's own windows, which sum to lm-eval's per-article log-likelihoods); other tasks
per document through lm-eval's `samples` selection. Per-unit results live in evaluation.document_values' cache
(by model content): the base's are scored once per model, and a killed screen resumes at its last saved chunk.

Decisions (each at alpha / k by Bonferroni over the k tracked ones):
  perplexity budget (word/byte, per window)   RatioSequence of ll_base - ll_point over the windows' unit weights
  a proportion metric's budget (CrowS pct)     BoundedSequence of the paired per-document differences from the base
  the objective (a centered proportion)        BoundedSequence of paired differences from the incumbent: dominated?
A group whose metric is its members' size-weighted mean (crows_bias) is screened as its members' pooled documents.
Other metrics (bootstrap ones, other groups) are not screened: they are decided on the full evaluation.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from debias_plugin.gate.stats import Interval
from debias_plugin.sweep.plan import Sweep

logger = logging.getLogger(__name__)

SCHEDULE = (0.05, 0.1, 0.2, 0.4)  # shares of each task's units scored by each look; then the full evaluation
WINDOWS, DOCUMENTS = "windows", "documents"
PERPLEXITIES = ("word_perplexity", "byte_perplexity")  # weighted perplexities screened per window


def unit_order(count: int, seed: int) -> list[int]:
    """The one seeded order of a task's units (uniform), shared by every model of the sweep."""
    import numpy as np

    return np.random.default_rng(seed).permutation(count).tolist()


def chunk_ends(population: int) -> list[int]:
    """Units scored by each look: ceil(share x population), increasing, at least one more per look."""
    ends = []
    for share in SCHEDULE:
        end = min(population, max(math.ceil(share * population), (ends[-1] + 1) if ends else 1))
        if not ends or end > ends[-1]:
            ends.append(end)
    return ends


# ------------------------------------------------------------------------------------------------ per-unit scores

class UnitScorer:
    """One model's per-unit results of a task, from the document cache or scored by one lazily loaded model."""

    def __init__(self, model_dir: Path, sweep: Sweep):
        self.model_dir, self.config = Path(model_dir), sweep.config
        self._loaded, self._windows = None, {}
        self.cpu_seconds: dict[str, float] = {}

    def loaded(self):
        if self._loaded is None:
            from debias_plugin.lm_eval.run import load_model

            self._loaded = load_model(self.model_dir, model_class=None, model_args=dict(self.config.model_args),
                                      batch_size=self.config.batch_size, device=self.config.device)
        return self._loaded

    def windows(self, task: str) -> tuple[list, list[dict[str, float]]]:
        """The task's rolling windows (all documents up to limit) and each window's share of the units per metric:
        its tokens times (the metric's units over all documents) / (tokens over all windows)."""
        if task not in self._windows:
            from debias_plugin.lm_eval.run import task_documents

            lm = self.loaded().lm
            task_object, documents = task_documents(self.loaded(), task, self.config.limit)
            windows, owners = [], []
            for index, document in enumerate(documents):
                for window in lm.rolling_windows(task_object.doc_to_target(document)):
                    windows.append(window)
                    owners.append(index)
            units = [task_object.process_results(document, [0.0]) for document in documents]
            tokens = sum(len(window[2]) for window in windows)
            totals = {name: sum(unit[name][1] for unit in units) for name in PERPLEXITIES if name in units[0]}
            weights = [{name: len(window[2]) * total / tokens for name, total in totals.items()} for window in windows]
            self._windows[task] = (windows, weights)
        return self._windows[task]

    def population(self, task: str, unit: str) -> int:
        if unit == WINDOWS:
            return len(self.windows(task)[0])
        from debias_plugin.lm_eval.run import task_documents

        return len(task_documents(self.loaded(), task, self.config.limit)[1])

    def values(self, task: str, unit: str, indices: list[int]) -> dict[int, object]:
        from debias_plugin.evaluation import document_values

        started = time.process_time()
        found = document_values(self.model_dir, task, unit, indices, lambda missing: self._score(task, unit, missing),
                                model_args=dict(self.config.model_args), limit=self.config.limit)
        self.cpu_seconds[task] = self.cpu_seconds.get(task, 0.0) + time.process_time() - started
        return found

    def _score(self, task: str, unit: str, indices: list[int]) -> dict[int, object]:
        if unit == WINDOWS:
            windows = self.windows(task)[0]
            return dict(zip(indices, self.loaded().lm.score_windows([windows[i] for i in indices])))
        from debias_plugin.lm_eval.run import evaluate_loaded

        rows = evaluate_loaded(self.loaded(), [task], samples={task: sorted(indices)})["samples"][task]
        return {int(row["doc_id"]): {name: row[name] for name in row["metrics"]
                                     if isinstance(row.get(name), (int, float))} for row in rows}


class _Pool:
    """The documents of one or more single tasks as one population (a group's size-weighted mean is their pooled
    mean): unit i is document i - offset of the member whose range holds it, members in the group's order."""

    def __init__(self, members: tuple[str, ...], scorer: UnitScorer):
        self.members, self.offsets, self.size = members, {}, 0
        for member in members:
            self.offsets[member] = self.size
            self.size += scorer.population(member, DOCUMENTS)

    def _locate(self, index: int) -> tuple[str, int]:
        member = next(m for m in reversed(self.members) if self.offsets[m] <= index)
        return member, index - self.offsets[member]

    def values(self, scorer: UnitScorer, indices: list[int]) -> dict[int, dict]:
        wanted: dict[str, list[int]] = {}
        for index in indices:
            member, local = self._locate(index)
            wanted.setdefault(member, []).append(local)
        found = {}
        for member, local in wanted.items():
            found.update({self.offsets[member] + i: value
                          for i, value in scorer.values(member, DOCUMENTS, local).items()})
        return found

    def results(self, results_dir: Path) -> dict[int, dict] | None:
        found = {}
        for member in self.members:
            rows = results_values(results_dir, member)
            if rows is None:
                return None
            found.update({self.offsets[member] + i: value for i, value in rows.items()})
        return found


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def results_values(results_dir: Path, task: str) -> dict[int, dict] | None:
    """Per-document metric values of a fully evaluated point, from its results folder (None if it lacks the task)."""
    from debias_plugin.evaluation import read_results_folder

    rows = read_results_folder(results_dir).get("samples", {}).get(task)
    if rows is None:
        return None
    return {int(row["doc_id"]): {name: row[name] for name in row.get("metrics", [])
                                 if isinstance(row.get(name), (int, float))} for row in rows}


# ------------------------------------------------------------------------------------------------ decisions

@dataclass
class Tracker:
    """One anytime-valid decision of a point's screen: a budget rule against the base, or the objective."""

    name: str  # task/metric (a budget rule) or "objective"
    task: str
    metric: str
    unit: str
    members: tuple[str, ...] = ()  # documents: the single tasks pooled (the task itself, or a group's members)
    side: str = "below"
    limit: float = 0.0  # on the tracked scale: relative change (perplexity) or value (proportion)
    offset: float = 0.0  # the reference's full-set value a paired difference is added to
    scale: float = 1.0
    center: float | None = None  # the objective's target: a distance change vs the incumbent
    alpha: float = 0.05  # its share of the sweep's alpha
    sequence: object = None  # its confidence sequence, made once the population is known (start)
    estimate: float = math.nan
    interval: Interval | None = None
    verdict: str = "undecided"

    def start(self, population: int) -> None:
        """A confidence sequence over `population` units sampled without replacement (exact once all are seen)."""
        from debias_plugin.gate.sequential import BoundedSequence, RatioSequence

        self.sequence = (RatioSequence(self.alpha, population) if self.unit == WINDOWS else
                         BoundedSequence(self.alpha, population, bounds=(-self.scale, self.scale)))

    def update(self, point: list, reference: list, weights: list | None) -> None:
        from debias_plugin.gate import sequential

        if self.unit == WINDOWS:
            log_ratio = self.sequence.update([r - p for p, r in zip(point, reference)], weights)
            self.interval = sequential.relative_change(log_ratio)
            self.estimate = math.expm1(self.sequence.estimate)
            self.verdict = sequential.decide(self.interval, self.limit, self.side)
            return
        difference = self.sequence.update([p - r for p, r in zip(point, reference)])
        if self.center is not None:  # the objective: distance from the target, candidate minus incumbent
            incumbent = Interval(self.offset, self.offset, 1.0, "full set")
            self.interval = sequential.distance_change(difference, incumbent, self.center)
            self.estimate = abs(self.offset + self.sequence.estimate - self.center) - abs(self.offset - self.center)
            self.verdict = sequential.objective_verdict(difference, incumbent, self.center)
            return
        self.interval = Interval(self.offset + difference.low, self.offset + difference.high, difference.confidence,
                                 difference.method)
        self.estimate = self.offset + self.sequence.estimate
        self.verdict = sequential.decide(self.interval, self.limit, self.side)

    def display(self) -> tuple[float, Interval]:
        """(estimate, interval) as progress_line prints them (x 100 %): relative changes, or pairs / scale."""
        if self.unit == WINDOWS:
            return self.estimate, self.interval
        shown = Interval(self.interval.low / self.scale, self.interval.high / self.scale, self.interval.confidence,
                         self.interval.method)
        return self.estimate / self.scale, shown


def _unit(metric: str) -> str | None:
    """How a metric is screened: per window (a weighted perplexity), per document (a proportion), or not at all."""
    from debias_plugin.scoring.specs import find_spec

    if metric in PERPLEXITIES:
        return WINDOWS
    spec = find_spec(metric)
    if spec is not None and spec.estimator == "proportion":
        return DOCUMENTS
    return None


def trackers(sweep: Sweep, reference: dict, incumbent: dict | None, leaf_tasks: set[str]) -> list[Tracker]:
    """The decisions a point's screen can make: budget rules on screened metrics, and the objective against the
    incumbent's full-set value (`incumbent`: its summary; None before any feasible point)."""
    from debias_plugin.gate.sequential import bonferroni
    from debias_plugin.scoring.specs import find_spec
    from debias_plugin.sweep.metrics import value_of

    from debias_plugin.lm_eval.run import pooled_members

    config, found = sweep.config, []
    for metric, rule in config.budget.items():
        task, name = metric.split("/", 1)
        unit, base = _unit(name), value_of(reference, metric)
        members = tuple(pooled_members(task, name) or ()) if unit == DOCUMENTS else ()
        if unit is None or base is None or rule.limit(base) is None or (unit == WINDOWS and task not in leaf_tasks) \
                or (unit == DOCUMENTS and not members):
            continue
        side = "above" if rule.kind == "min" else "below"
        if unit == WINDOWS:
            limit = rule.max_relative_increase if rule.kind == "max_relative_increase" else rule.limit(base) / base - 1
            found.append(Tracker(metric, task, name, unit, side=side, limit=limit))
        else:
            found.append(Tracker(metric, task, name, unit, members, side, rule.limit(base), base, find_spec(name).scale))
    task, name = config.objective.split("/", 1)
    spec = find_spec(name)
    current = value_of(incumbent or {}, config.objective)
    members = tuple(pooled_members(task, name) or ()) if spec is not None and spec.estimator == "proportion" else ()
    # The bisection reads every feasible value, and NSGA-II's front may hold a point farther on the objective alone:
    # neither stops a point on the objective.
    pareto = sweep.sampling is not None and sweep.sampling.sampler == "nsga2"
    if incumbent is not None and current is not None and members and not config.search and not pareto:
        found.append(Tracker("objective", task, name, DOCUMENTS, members, offset=current,
                             scale=spec.scale, center=config.target))
    for tracker in found:
        tracker.alpha = bonferroni(config.alpha, len(found))
    return found


# ------------------------------------------------------------------------------------------------ the screen

@dataclass
class Screen:
    """What a point's screen decided: "violated" / "dominated" (stopped) or "passed" (full evaluation follows)."""

    verdict: str
    look: int | None = None
    metric: str | None = None
    interval: list[float] | None = None
    interval_of: str | None = None  # what the interval bounds
    estimate: float | None = None
    documents_scored: dict[str, int] = field(default_factory=dict)
    population: dict[str, int] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    looks: list[dict] = field(default_factory=list)

    @property
    def stopped(self) -> bool:
        from debias_plugin.gate.sequential import STOP

        return self.verdict in STOP

    def record(self) -> dict:
        return {"verdict": self.verdict, "look": self.look, "metric": self.metric, "interval": self.interval,
                "interval_of": self.interval_of, "estimate": self.estimate, "documents_scored": self.documents_scored, "population": self.population,
                "cpu_seconds": {task: round(seconds, 3) for task, seconds in self.cpu_seconds.items()},
                "looks": self.looks}


def screen_point(label: str, point: UnitScorer, base: UnitScorer, incumbent_results: Path | None,
                 decisions: list[Tracker], base_results: Path, seed: int, trial=None) -> Screen:
    """Score the point chunk by chunk, one look per chunk (an intermediate value of `trial`, whose pruner stops it);
    returns the decision. `label` names the point in the progress lines."""
    from debias_plugin.gate.sequential import STOP, progress_line, record_look

    tasks = list(dict.fromkeys(tracker.task for tracker in decisions))
    units = {tracker.task: tracker.unit for tracker in decisions}
    pools = {tracker.task: _Pool(tracker.members, point) for tracker in decisions if tracker.unit == DOCUMENTS}
    population = {task: pools[task].size if task in pools else point.population(task, units[task]) for task in tasks}
    for task in tasks:
        if task not in pools and base.population(task, units[task]) != population[task]:
            from debias_plugin.errors import DebiasError

            raise DebiasError(f"{task}: this point's model splits the task into {population[task]} {units[task]}, "
                              f"the base into {base.population(task, units[task])} (another tokenizer?); a paired "
                              "screen needs the same units: set `evaluation: full` in the sweep file.")
    orders = {task: unit_order(population[task], seed) for task in tasks}
    ends = {task: chunk_ends(population[task]) for task in tasks}
    full_values = {}  # per-document values of fully evaluated models (base and incumbent): their results folders
    for task, pool in pools.items():
        full_values[("base", task)] = pool.results(base_results)
        if incumbent_results is not None:
            full_values[("incumbent", task)] = pool.results(incumbent_results)
    decisions = [t for t in decisions if t.unit == WINDOWS  # a fully evaluated model without the task's samples
                 or full_values.get(("incumbent" if t.center is not None else "base", t.task)) is not None]
    tasks = [task for task in tasks if any(t.task == task for t in decisions)]
    for tracker in decisions:
        tracker.start(population[tracker.task])
    done = {task: 0 for task in tasks}
    screen = Screen("passed", population={task: population[task] for task in tasks})
    if not decisions:
        return screen
    for step in range(max(len(chunks) for chunks in ends.values())):
        for task in tasks:
            end = ends[task][min(step, len(ends[task]) - 1)]
            chunk = orders[task][done[task]:end]
            if not chunk:
                continue
            done[task] = end
            mine = pools[task].values(point, chunk) if task in pools else point.values(task, units[task], chunk)
            for tracker in (t for t in decisions if t.task == task):
                if units[task] == WINDOWS:
                    reference = base.values(task, WINDOWS, chunk)
                    weights = [base.windows(task)[1][i][tracker.metric] for i in chunk]
                    tracker.update([mine[i] for i in chunk], [reference[i] for i in chunk], weights)
                else:
                    source = full_values[("incumbent" if tracker.center is not None else "base", task)]
                    tracker.update([mine[i][tracker.metric] for i in chunk],
                                   [source[i][tracker.metric] for i in chunk], None)
        fraction = {task: done[task] / population[task] for task in tasks}
        verdicts = {tracker.name: tracker.verdict for tracker in decisions}
        intervals = {tracker.name: tracker.interval for tracker in decisions}
        look = {"step": step, "documents_scored": dict(done), "verdicts": verdicts,
                "intervals": {name: [_finite(i.low), _finite(i.high)] for name, i in intervals.items()}}
        screen.looks.append(look)
        for tracker in decisions:
            estimate, shown = tracker.display()
            noun = "windows" if tracker.unit == WINDOWS else "documents"
            what = ("distance to target vs incumbent" if tracker.center is not None else
                    "perplexity" if tracker.unit == WINDOWS else tracker.name)
            logger.info(progress_line(label, what, estimate, shown, fraction[tracker.task], noun, tracker.verdict))
        first = decisions[0]
        if trial is not None:
            record_look(trial, step, first.estimate, verdicts, fraction=min(fraction.values()), intervals=intervals)
        stopping = next((t for t in decisions if t.verdict in STOP), None)
        if stopping is not None and (trial is None or trial.should_prune()):
            screen.verdict, screen.metric = stopping.verdict, stopping.name
            screen.interval, screen.estimate = [stopping.interval.low, stopping.interval.high], stopping.estimate
            screen.interval_of = ("relative change from the base" if stopping.unit == WINDOWS else
                                  "distance from the target minus the incumbent's" if stopping.center is not None
                                  else "value")
            screen.look = step
            break
        constraints = [t for t in decisions if t.center is None]
        objective = [t for t in decisions if t.center is not None]
        if all(t.verdict == "holds" for t in constraints) and all(t.interval.high < 0 for t in objective):
            screen.look = step  # surely within budget and surely closer than the incumbent: full evaluation now
            break
    screen.look = step if screen.look is None else screen.look
    screen.documents_scored = dict(done)
    screen.cpu_seconds = dict(point.cpu_seconds)
    return screen


# ------------------------------------------------------------------------------------------------ the sweep's side

SCREEN_SUFFIX = ".screen"
_BASE_SCORERS: dict[tuple, UnitScorer] = {}


def screen_study(storage, sweep: Sweep, *, create: bool = True):
    """The Optuna study of the screens: one trial per screened point, its looks as intermediate values, a stopped
    point PRUNED by SequentialPruner (what optuna-dashboard shows); None when a report finds none."""
    import optuna

    from debias_plugin.gate.sequential import SequentialPruner

    name = sweep.study_name + SCREEN_SUFFIX
    if create:
        return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, pruner=SequentialPruner())
    try:
        return optuna.load_study(study_name=name, storage=storage, pruner=SequentialPruner())
    except KeyError:
        return None


def screens(study) -> dict[str, object]:
    """key -> the finished screen trial of that point (PRUNED: stopped; COMPLETE: passed on to the full evaluation)."""
    import optuna

    found = {}
    if study is None:
        return found
    states = (optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE)
    for trial in sorted(study.get_trials(deepcopy=False, states=states), key=lambda t: t.number):
        found.setdefault(trial.user_attrs.get("key"), trial)
    return found


def stopped_points(study) -> dict[str, object]:
    """key -> search.Stopped (the last look's step and value) of every point whose screen stopped it: what a
    sampled search's replay tells the sampler as a pruned trial (storage.sync_sampled)."""
    import optuna

    from debias_plugin.sweep.search import Stopped

    stopped = {}
    for key, trial in screens(study).items():
        if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
            step = max(trial.intermediate_values)
            value = trial.intermediate_values[step]
            stopped[key] = Stopped(step, value if math.isfinite(value) else math.inf)
    return stopped


def screens_this_point(sweep: Sweep, point, model: Path) -> bool:
    """Sequential screening applies to every point but the base (grid, checkpoint, budget-search and sampled ones) of
    causal LMs unless the file says evaluation: full. The bisection reads an over-budget point as infeasible, so its
    search points are screened on the budget only; a sampled point that stops is told to the sampler as a pruned
    trial (storage.sync_sampled)."""
    from debias_plugin.evaluation import CAUSAL_MODEL_CLASS, resolve_model_class

    return (sweep.config.evaluation == "sequential" and point.role in ("grid", "checkpoint", "search", "sampled")
            and (model / "config.json").is_file() and resolve_model_class(model) == CAUSAL_MODEL_CLASS)


def incumbent(sweep: Sweep, recorded: dict, out: Path) -> tuple[dict | None, Path | None]:
    """The best feasible point recorded so far (the choice's own rule): its summary and results folder."""
    from debias_plugin.sweep import metrics

    reference = recorded["base"].user_attrs.get("summary", {})
    candidates = []
    for key, trial in recorded.items():
        summary = trial.user_attrs.get("summary")
        if trial.user_attrs.get("error") or not summary or trial.user_attrs.get("suite") != "screen":
            continue
        value = metrics.value_of(summary, sweep.config.objective)
        checks = metrics.feasibility(summary, reference, sweep)
        candidates.append({"key": key, "distance": None if value is None else abs(value - sweep.config.target),
                           "feasible": all(c["holds"] for c in checks.values()),
                           "directions": sweep.directions[1:],
                           "budget_values": [checks[m]["value"] for m in sweep.config.budget]})
    chosen = metrics.choose(candidates)
    if chosen is None:
        return None, None
    trial = recorded[chosen]
    return trial.user_attrs["summary"], out / "trials" / trial.user_attrs["name"] / "results"


def screen(sweep: Sweep, study, point, model: Path, base: Path, recorded: dict, out: Path) -> bool:
    """Screen one point (or read its finished screen back); True when it stopped, so no full evaluation follows."""
    import optuna

    from debias_plugin.evaluation import describe_tasks
    from debias_plugin.lm_eval.run import leaf_tasks

    done = screens(study).get(point.key)
    if done is not None:
        return done.state == optuna.trial.TrialState.PRUNED
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if stale.user_attrs.get("key") == point.key:  # its worker died mid-screen; this one holds the job now
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
    reference = recorded["base"].user_attrs.get("summary", {})
    best, best_results = incumbent(sweep, recorded, out)
    leaves = leaf_tasks(list(describe_tasks(sweep.screen_tasks)))
    decisions = trackers(sweep, reference, best, leaves)
    if not decisions:
        return False
    with warnings.catch_warnings():  # the storage's heartbeat is for the job claims' study.optimize, not for this
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        trial = study.ask()
    for name, value in {"key": point.key, "name": point.name, "role": point.role, "params": point.params}.items():
        trial.set_user_attr(name, value)
    label = ", ".join(f"{'λ' if k == 'lambda' else k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in point.params.items()) or point.name
    key = (str(base), sweep.sha256)
    if key not in _BASE_SCORERS:  # the base's model is loaded once per process, not once per point
        _BASE_SCORERS.clear()
        _BASE_SCORERS[key] = UnitScorer(base, sweep)
    base_scorer = _BASE_SCORERS[key]
    result = screen_point(label, UnitScorer(model, sweep), base_scorer, best_results, decisions,
                          out / "trials" / "base" / "results", sweep.config.order_seed, trial)
    trial.set_user_attr("screen", result.record())
    if result.stopped:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return True
    value = decisions[0].estimate
    study.tell(trial, value if math.isfinite(value) else 0.0)  # a NaN value would mark the trial failed
    return False
