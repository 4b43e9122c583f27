"""`run_sweep`: make each setting's model with the stage itself, evaluate it with lm-eval, record it in Optuna.

Layout of the output folder (DIR):
  sweep.yml                   the sweep file as given (a rerun with another file is refused)
  study.db                    the Optuna storage, unless --storage names another
  trials/<point>/model/       negate or training output (a normal stage folder with its debias_manifest.json)
  runs/<job>/model/           a checkpoint sweep's one training run; its points are model.snapshots/step-N/
  trials/<point>/results/     lm-eval results of the screening tasks (evaluation.evaluate's results folder)
  trials/<point>/results_full/  the remaining tasks, for points on the Pareto front
  sweep.json, sweep.csv, report.md, plots/, best -> the chosen point's model folder

Phases: the base model (the reference every relative budget compares with), then every grid point / checkpoint
(or the budget search's evaluations, or a sampled search's trials, batch by batch) on the screening tasks, then the other tasks on the Pareto front only.
Every step checks what is already there (a published folder, a recorded trial), so a rerun resumes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from debias_plugin.default_model import is_builtin, resolve_model
from debias_plugin.errors import DebiasError
from debias_plugin.outputs import MANIFEST_NAME, claim_run_folder, refuse_overlap, write_text_atomically
from debias_plugin.paths import data_root
from debias_plugin.sweep import metrics, sequential_eval
from debias_plugin.sweep.evaluate import evaluate_model, weights_sha256
from debias_plugin.sweep.plan import Job, Point, Sweep, check_tasks, load_sweep
from debias_plugin.sweep.render import link_best, render
from debias_plugin.sweep.results import full_suite_keys, search_step
from debias_plugin.sweep.search import SearchResult
from debias_plugin.sweep.stage import evaluated_as, input_paths, stage_class, stage_settings, trains
from debias_plugin.sweep.storage import (JobBoard, Studies, add_point, distributions, open_storage, quiet_optuna,
                                         recorded_points, storage_url, sync_sampled, write_state)

logger = logging.getLogger(__name__)

POLL_ENV = "DEBIAS_SWEEP_POLL_SECONDS"
SWEEP_FILE = "sweep.yml"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str | None) -> Shard | None:
        if not text:
            return None
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise DebiasError(f"--shard expects i/n, e.g. 0/2 (found {text!r}).") from None
        if count < 1 or not 0 <= index < count:
            raise DebiasError(f"--shard {text}: need 0 <= i < n.")
        return cls(index, count)

    def owns(self, position: int) -> bool:
        return position % self.count == self.index


def prepare_folder(sweep: Sweep, out: Path, *, force: bool, inputs: list[Path]) -> None:
    """DIR is new, or holds this same sweep (resume); another sweep's folder is replaced only with --force."""
    refuse_overlap(out, _outside_own_copy(out, inputs), "--out")
    if out.is_file():
        raise DebiasError(f"--out {out} is a file; choose a folder.")
    claim_run_folder(out, resumes=_same_sweep(out / SWEEP_FILE, sweep), force=force,
                     refusal=f"--out {out} is not empty and does not hold this sweep (no {SWEEP_FILE}, or one with "
                     "other settings); pass --force to replace it, or choose another folder. A folder holding the "
                     "same sweep is resumed.")
    if not (out / SWEEP_FILE).is_file():
        write_text_atomically(out / SWEEP_FILE, sweep.text)


def _same_sweep(path: Path, sweep: Sweep) -> bool:
    if not path.is_file():
        return False
    try:
        return load_sweep(path).sha256 == sweep.sha256
    except DebiasError:
        return False


def resolve_base(sweep: Sweep) -> Path:
    """The base model folder: `default` / `builtin:NAME` materialised once, else the given folder."""
    if is_builtin(sweep.config.base):
        return Path(resolve_model(sweep.config.base))
    base = Path(sweep.config.base).expanduser().resolve()
    if not base.is_dir():
        raise sweep.error(("base",), f"the model folder {base} does not exist")
    return base


def _inputs(sweep: Sweep) -> list[Path]:
    """Everything the sweep reads: its file, the base model, the stage's input files, the data folder."""
    base = [] if is_builtin(sweep.config.base) else [Path(sweep.config.base).expanduser()]
    return [sweep.path, *base, *input_paths(sweep), *([data_root()] if data_root() else [])]


def _outside_own_copy(out: Path, inputs: list[Path]) -> list[Path]:
    """A sweep run from the copy it keeps in its own folder (out/sweep.yml) resumes there: that copy is no input."""
    return [path for path in inputs if Path(path).expanduser().resolve() != (out / SWEEP_FILE).resolve()]


# ------------------------------------------------------------------------------------------------ the run

@dataclass
class SweepRun:
    sweep: Sweep
    out: Path
    storage: str | None = None
    shard: Shard | None = None
    force: bool = False
    poll_seconds: float = field(default_factory=lambda: float(os.environ.get(POLL_ENV, "5")))

    def __post_init__(self):
        self.out = Path(self.out).expanduser().resolve()
        self.attempted: set[str] = set()  # job keys this process claimed (a failed one is retried once per run)
        self._reference_summary: dict | None = None

    # -- entry ------------------------------------------------------------------------------------------
    def run(self) -> Path:
        sweep = self.sweep
        check_tasks(sweep)  # lm-eval knows every task and metric: before any model loads
        url = storage_url(self.storage, self.out)
        # an unusable --storage fails before the output folder is made; the default SQLite file lives inside it
        storage = open_storage(url) if self.storage is not None else None
        prepare_folder(sweep, self.out, force=self.force, inputs=_inputs(sweep))
        self.base = resolve_base(sweep)
        storage = storage or open_storage(url)
        self.studies = Studies.open(storage, sweep.study_name, sweep.directions)
        self.screens = sequential_eval.screen_study(storage, sweep) if sweep.config.evaluation == "sequential" else None
        write_state(self.out, sweep, url, external=self.storage is not None)
        self.board = JobBoard(self.studies.jobs)
        self.known = distributions(sweep)

        self._work([sweep.jobs()[0]], "screen")
        reference = recorded_points(self.studies.results).get("base")
        if reference is None or reference.user_attrs.get("error"):
            raise DebiasError(f"The base model could not be evaluated: "
                              f"{reference.user_attrs.get('error') if reference else 'no result recorded'}")
        if sweep.config.search:
            self._search()
        elif sweep.sampling:
            self._sample()
        else:
            self._work(sweep.jobs()[1:], "screen")
        self._full_suite()
        summary = render(self.out, sweep, self.studies, base=self.base, screens=self.screens)
        if summary.get("best") is not None:  # the chosen model exists here (rebuilt if another host made it)
            self._models(self._job_of(self._point(summary["best"])))
            link_best(self.out, summary)
        failed = [p for p in summary["points"] if p.get("error") and p["role"] != "reference"]
        if failed and len(failed) == len(summary["points"]) - 1:
            raise DebiasError(f"Every setting failed; the first: {failed[0]['error']} (see {self.out / 'report.md'}).")
        return self.out

    # -- scheduling -------------------------------------------------------------------------------------
    def _work(self, jobs: list[Job], phase: str, *, sharded: bool = True) -> None:
        """Claim and run the jobs (this shard's share), then wait until every one is done by someone."""
        pending = list(enumerate(jobs))
        waited_since = None
        while pending:
            progressed = False
            for position, job in list(pending):
                key = f"{phase}:{job.key}"
                state = self.board.status(key)
                mine = not sharded or self.shard is None or self.shard.owns(position)
                if state == "done" or (state == "failed" and (key in self.attempted or not mine)):
                    pending.remove((position, job))
                    continue
                if not mine or state == "busy":
                    continue
                self.attempted.add(key)
                if not self.board.run(key, partial(self._run_job, job, phase)):
                    continue
                pending.remove((position, job))
                progressed = True
            if pending and not progressed:
                if waited_since is None:
                    waited_since = time.monotonic()
                    logger.info("Waiting for %d job(s) other processes are running: %s", len(pending),
                                ", ".join(job.name for _, job in pending[:5]))
                time.sleep(self.poll_seconds)

    def _run_job(self, job: Job, phase: str) -> str | None:
        """Make and evaluate the job's points; a DebiasError is recorded on them and returned, not raised."""
        try:
            if phase == "screen":
                self._screen(job)
            else:
                self._full(job)
        except DebiasError as err:
            logger.warning("%s (%s): %s", job.name, phase, err)
            study = self.studies.results if phase == "screen" else self.studies.full
            for point in job.points:
                add_point(study, point, None, {"error": str(err), "suite": phase}, self.known)
            return str(err)
        return None

    # -- one job ----------------------------------------------------------------------------------------
    def _screen(self, job: Job) -> None:
        models = self._models(job)
        for point in job.points:
            if self.screens is not None and sequential_eval.screens_this_point(self.sweep, point, models[point.key]) \
                    and sequential_eval.screen(self.sweep, self.screens, point, models[point.key], self.base,
                                               recorded_points(self.studies.results), self.out):
                continue  # stopped early: recorded as a pruned screen trial, never evaluated on the full sets
            self._record(self.studies.results, point, models[point.key], self.sweep.screen_tasks, "results", "screen")

    def _full(self, job: Job) -> None:
        point = job.points[0]
        models = self._models(self._job_of(point))
        self._record(self.studies.full, point, models[point.key], self.sweep.full_tasks, "results_full", "full")

    def _record(self, study, point: Point, model: Path, tasks: list[str], folder: str, suite: str) -> None:
        config, results_dir = self.sweep.config, self.out / "trials" / point.name / folder
        scored, model_class, model_args = evaluated_as(self.sweep, point.params, model, self.base)
        results, cost = evaluate_model(scored, tasks, self.sweep, results_dir, model_class=model_class,
                                       model_args=model_args)
        types = self._types(point, results, results_dir) if suite == "screen" else \
            recorded_points(self.studies.results)[point.key].user_attrs.get("types")  # summarize takes the samples
        summary = metrics.summarize(results, alpha=config.alpha, resamples=config.resamples, seed=config.seed,
                                    source=str(results_dir))
        screened = self._screened(point.key) if suite == "full" else summary
        reference = screened if point.role == "reference" else self._reference()
        attrs = {"summary": summary, "suite": suite, "tasks": tasks, "model": self._relative(model),
                 "model_sha256": weights_sha256(model), "cost": cost}
        if types is not None and suite == "screen":
            attrs["types"] = types
        add_point(study, point, metrics.point_values(screened, self.sweep), attrs, self.known,
                  metrics.constraints(screened, reference, self.sweep, types))

    def _types(self, point: Point, results: dict, results_dir: Path) -> dict | None:
        """types_not_worse of a point's screen results against the base's (None where the sweep does not ask)."""
        if not self.sweep.config.types_not_worse:
            return None
        from debias_plugin.evaluation import read_results_folder

        base = results if point.role == "reference" else read_results_folder(self.out / "trials" / "base" / "results")
        return metrics.types_check(results, base, self.sweep, source=str(results_dir))

    def _reference(self) -> dict:
        if self._reference_summary is None:
            self._reference_summary = self._screened("base")
        return self._reference_summary

    def _screened(self, key: str) -> dict:
        """A point's recorded screening summary (metrics with intervals)."""
        return recorded_points(self.studies.results)[key].user_attrs.get("summary", {})

    def _relative(self, path: Path) -> str:
        path = Path(path).resolve()
        return str(path.relative_to(self.out)) if self.out in path.parents else str(path)

    # -- models -----------------------------------------------------------------------------------------
    def _point(self, key: str) -> Point:
        attrs = recorded_points(self.studies.results)[key].user_attrs
        if attrs["role"] == "reference":
            return self.sweep.reference_point()
        if attrs["role"] == "search":
            return self.sweep.search_job(attrs["params"][self.sweep.search_knob]).points[0]
        return next(point for job in self.sweep.jobs() for point in job.points if point.key == key)

    def _job_of(self, point: Point) -> Job:
        if point.role == "reference":
            return self.sweep.jobs()[0]
        if point.role == "search":
            return self.sweep.search_job(point.params[self.sweep.search_knob])
        return next(job for job in self.sweep.jobs() if job.key == point.job)

    def _models(self, job: Job) -> dict[str, Path]:
        """Each point's model folder: made by the stage unless already published here."""
        if job.key == "reference":
            return {job.points[0].key: self.base}
        stage = stage_class(self.sweep.config.method)
        if not trains(stage):
            return {job.points[0].key: self._made(job, stage)}
        return self._trained(job)

    def _made(self, job: Job, stage) -> Path:
        """A stage that makes its model in one step (negation): into the trial's folder, published atomically."""
        out = self.out / "trials" / job.name / "model"
        if (out / MANIFEST_NAME).is_file():
            return out
        _, options = stage_settings(self.sweep, job.settings, out, base=str(self.base))
        try:
            stage(options).make(self.base, out, progress=False)
        except DebiasError:
            if (out / MANIFEST_NAME).is_file():  # another process sharing DIR published it meanwhile
                return out
            raise
        return out

    def _trained(self, job: Job) -> dict[str, Path]:
        checkpoints = self.sweep.config.checkpoints
        out = self.out / ("runs" if checkpoints else "trials") / job.name / "model"
        if checkpoints:
            snapshots = out.parent / f"{out.name}.snapshots"
            models = {point.key: snapshots / f"step-{point.params['step']}" for point in job.points}
        else:
            models = {job.points[0].key: out}
        if (out / MANIFEST_NAME).is_file() and all((m / MANIFEST_NAME).is_file() for m in models.values()):
            return models
        from debias_plugin.training import train

        config, options = stage_settings(self.sweep, job.settings, out, base=str(self.base))
        if out.exists() and not (out / MANIFEST_NAME).is_file():
            shutil.rmtree(out)  # never a published folder: the Trainer publishes atomically
        train(config, stage_class(self.sweep.config.method)(options))
        return models

    # -- phases -----------------------------------------------------------------------------------------
    def _search(self) -> SearchResult:
        sweep = self.sweep
        while True:
            recorded = [trial.user_attrs for trial in recorded_points(self.studies.results).values()]
            stopped = [(t.user_attrs["role"], t.user_attrs["params"], None)  # over budget: no values, infeasible
                       for t in sequential_eval.screens(self.screens).values() if t.state.name == "PRUNED"]
            step = search_step(sweep, [(a.get("role"), a.get("params"), a.get("summary", {})) for a in recorded]
                               + stopped, self._reference())
            if step.proposal is None:
                return step
            logger.info("Budget search: %s = %g (%s).", sweep.search_knob, step.proposal, step.reason)
            self._work([sweep.search_job(step.proposal)], "screen", sharded=False)

    def _sample(self) -> None:
        """Several knobs: the sampler's current batch (search.sample_step) through the job board, until the trials
        are spent; workers sharing the storage take the batch's settings between them."""
        sweep, sampling = self.sweep, self.sweep.sampling
        while True:
            state = sync_sampled(sweep, self.studies.results, sequential_eval.stopped_points(self.screens))
            if state.finished:
                return
            logger.info("%s search: trial %d of %d (%s).", sampling.sampler.upper(), len(state.proposals),
                        sampling.trials, "; ".join(sweep.sample_job(s).name for s in state.pending))
            self._work([sweep.sample_job(settings) for settings in state.pending], "screen", sharded=False)

    def _full_suite(self) -> None:
        if not self.sweep.full_tasks:
            return
        points = {key: self._point(key) for key in full_suite_keys(self.sweep, self.studies)}
        self._work([Job(f"point:{key}", point.name, {}, (point,)) for key, point in points.items()], "full")


def run_sweep(path: str | Path, out: str | Path, *, storage: str | None = None, shard: str | None = None,
              force: bool = False) -> Path:
    """Run (or resume, or join) the sweep of a sweep file into DIR; returns DIR (sweep.json, report.md, best/)."""
    sweep = load_sweep(path)
    with quiet_optuna():
        return SweepRun(sweep, Path(out), storage=storage, shard=Shard.parse(shard), force=force).run()
