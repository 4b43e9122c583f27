"""The sweep's Optuna storage: results as multi-objective trials, and a job board so processes share the work.

Three studies per sweep in one storage (SQLite in the output folder by default, or any RDB URL):
  NAME        one COMPLETE trial per screened point: values = (|objective - target|, budget metrics...), the
              point's parameters, and its metrics / intervals / model hash as user attributes;
              `study.best_trials` is the Pareto front;
  NAME.full   the same for points that also got the full evaluation suite;
  NAME.jobs   claims: a RUNNING trial per job being worked on (user attrs: job key, host, pid), run by
              `study.optimize` so Optuna records its heartbeat; COMPLETE when the job's results are in.
A claim whose heartbeat stopped for the grace period (its process was killed, its machine lost) is failed by
Optuna's `fail_stale_trials` and the job claimed again: that is how a rerun resumes after kill -9 (after the grace
period) and how a sweep outlives a lost machine. Two processes claiming one job at the same moment both see both
claims; the lower trial number keeps it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from debias_plugin.errors import DebiasError, one_line
from debias_plugin.outputs import write_text_atomically

logger = logging.getLogger(__name__)

HEARTBEAT_ENV = "DEBIAS_SWEEP_HEARTBEAT_SECONDS"
HEARTBEAT_SECONDS = 10  # a claim records a heartbeat this often ...
GRACE_BEATS = 6  # ... and is stale (its process gone) after this many intervals without one
STATE_FILE = "sweep_state.json"


def heartbeat_seconds() -> int:
    return int(os.environ.get(HEARTBEAT_ENV) or HEARTBEAT_SECONDS)


def grace_seconds() -> int:
    return GRACE_BEATS * heartbeat_seconds()


@contextmanager
def quiet_optuna():
    """Optuna's INFO lines (each study created, each claim finished) are noise in a sweep's log: WARNING while
    the sweep's own calls run, the caller's level restored afterwards."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _log_stale(study, trial) -> None:
    logger.info("Job %s: the claim of %s (pid %s) stopped its heartbeat; taking it over.",
                trial.user_attrs.get("job"), trial.user_attrs.get("host"), trial.user_attrs.get("pid"))


def write_state(out: Path, sweep, url: str, *, external: bool) -> None:
    """Where the study lives, for `debias sweep report DIR` (a URL with a password is not written down)."""
    from sqlalchemy.engine import make_url

    try:
        secret = make_url(url).password is not None
    except Exception:
        secret = True
    state = {"study": sweep.study_name, "storage": url if external and not secret else None}
    write_text_atomically(out / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def storage_url(url: str | None, out: Path) -> str:
    return url or f"sqlite:///{out / 'study.db'}"


def open_storage(url: str):
    """An Optuna RDB storage with heartbeats (claims of killed processes go stale); SQLite waits for the file lock
    instead of failing when processes share it."""
    import optuna

    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_seconds(),
                                                  grace_period=grace_seconds(),
                                                  heartbeat_stale_trial_callback=_log_stale)
        except Exception as err:  # bad URL, missing driver, unreachable server: one paragraph
            racing = "already exists" in str(err) or "UNIQUE constraint failed" in str(err)
            if racing and attempt < 5:  # another process is creating the same new storage's tables
                time.sleep(0.5 * (attempt + 1))
                continue
            raise DebiasError(f"--storage {url}: Optuna could not open it ({type(err).__name__}: "
                              f"{one_line(err)}).") from None


@dataclass
class Studies:
    """The three studies of one sweep."""

    results: object
    full: object
    jobs: object

    @classmethod
    def open(cls, storage, name: str, directions: list[str], *, create: bool = True) -> Studies:
        import optuna

        def study(suffix: str, directions_: list[str]):
            if create:
                return optuna.create_study(storage=storage, study_name=name + suffix, directions=directions_,
                                           load_if_exists=True)
            try:
                return optuna.load_study(storage=storage, study_name=name + suffix)
            except KeyError:
                raise DebiasError(f"The storage holds no study '{name + suffix}': the sweep has not run "
                                  "there (or ran with another sweep file).") from None

        return cls(study("", directions), study(".full", directions), study(".jobs", ["minimize"]))


def _trials(study, state=None):
    return study.get_trials(deepcopy=False, states=None if state is None else (state,))


class JobBoard:
    """Claims on jobs, shared by every process working the sweep through one storage.

    A claim is a jobs-study trial run by `study.optimize`, so Optuna records its heartbeat; `fail_stale_trials`
    fails a claim whose heartbeat stopped (its process was killed), and the job is then free to claim again."""

    def __init__(self, study):
        self.study = study
        self.host, self.pid = socket.gethostname(), os.getpid()

    def _claims(self, key: str):
        return [t for t in _trials(self.study) if t.user_attrs.get("job") == key]

    def fail_stale(self) -> None:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    def status(self, key: str) -> str:
        """done, failed (finished with an error), busy (a live claim elsewhere) or free; stale claims are failed."""
        import optuna

        self.fail_stale()
        running, failed = False, False
        for trial in self._claims(key):
            if trial.state == optuna.trial.TrialState.COMPLETE:
                if "error" not in trial.user_attrs:
                    return "done"
                failed = True
            elif trial.state == optuna.trial.TrialState.RUNNING:
                running = True
        return "busy" if running else ("failed" if failed else "free")

    def run(self, key: str, work) -> bool:
        """Claim the job and run `work()` (which returns an error message or None) unless another process holds
        it; whether it ran here. An exception out of `work` fails the claim and propagates."""
        import optuna

        ran = []

        def claim(trial):
            for name, value in (("host", self.host), ("pid", self.pid), ("job", key)):
                trial.set_user_attr(name, value)
            if not self._first(key, trial.number):
                trial.set_user_attr("duplicate", True)
                raise optuna.TrialPruned()
            ran.append(key)
            error = work()
            if error:
                trial.set_user_attr("error", error)
            return 0.0

        self.study.optimize(claim, n_trials=1)
        return bool(ran)

    def _first(self, key: str, number: int) -> bool:
        """Whether claim `number` keeps the job: the lowest-numbered live claim does, once every earlier claim
        (a RUNNING trial not yet naming its job) has named it, so two claimants never both see themselves first."""
        import optuna

        running, complete = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE
        deadline = time.monotonic() + grace_seconds()
        while True:
            trials = _trials(self.study)
            unnamed = [t for t in trials if t.number < number and t.state == running and "job" not in t.user_attrs]
            if not unnamed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
            self.fail_stale()
        claims = [t for t in trials if t.user_attrs.get("job") == key]
        if any(t.state == complete and "error" not in t.user_attrs for t in claims):
            return False
        return min(t.number for t in claims if t.state == running) == number


# ------------------------------------------------------------------------------------------ results trials

def distributions(sweep) -> dict:
    """One Optuna distribution per parameter, from the whole grid / range, so every trial declares the same."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from debias_plugin.sweep.plan import STEP

    config, found = sweep.config, {}
    for key, values in (config.grid or {}).items():
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(values) and all(isinstance(v, int) for v in values):
            found[key] = IntDistribution(min(values), max(values))
        elif len(numbers) == len(values):
            found[key] = FloatDistribution(float(min(values)), float(max(values)))
        else:
            found[key] = CategoricalDistribution(sorted({_categorical(v) for v in values}, key=str))
    for key, (low, high) in (config.search or {}).items():
        found[key] = FloatDistribution(float(low), float(high))
    if config.sampling:
        from debias_plugin.sweep.stage import integer_knobs

        integers = integer_knobs(sweep)
        for key, knob in config.sampling.knobs.items():
            found[key] = (IntDistribution(int(knob.low), int(knob.high), step=int(knob.step or 1), log=knob.log)
                          if key in integers else FloatDistribution(knob.low, knob.high, step=knob.step, log=knob.log))
    if config.checkpoints:
        found[STEP] = IntDistribution(1, config.checkpoints[-1])
    return found


def _categorical(value):
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)


def trial_params(point, known: dict) -> tuple[dict, dict]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    params, dists = {}, {}
    for key, value in point.params.items():
        distribution = known[key]
        if isinstance(distribution, CategoricalDistribution):
            value = _categorical(value)
        elif isinstance(distribution, FloatDistribution):
            value = float(value)
        params[key], dists[key] = value, distribution
    return params, dists


def add_point(study, point, values: list[float] | None, attrs: dict, known: dict,
              constraints: dict[str, float] | None = None) -> None:
    """Record a point's results once (a second add of the same point, e.g. after a crash, is skipped).

    constraints (budget rules, <= 0 where they hold) make `best_trials` the Pareto front of the feasible points."""
    import optuna

    if any(t.user_attrs.get("key") == point.key for t in _trials(study, optuna.trial.TrialState.COMPLETE)):
        return
    params, dists = trial_params(point, known)
    finite = values is not None and all(v is not None and math.isfinite(v) for v in values)
    attrs = {**attrs, "key": point.key, "name": point.name, "role": point.role, "params": point.params}
    if not finite:
        attrs["no_values"] = "objective or budget metric missing or not finite"
    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE if finite else optuna.trial.TrialState.FAIL,
                                      values=values if finite else None, params=params, distributions=dists,
                                      user_attrs=attrs, constraints=constraints if finite else None)
    study.add_trial(trial)


def recorded_points(study) -> dict[str, object]:
    """key -> the trial recorded for that point: the first COMPLETE one, else the latest FAIL (with its reason)."""
    import optuna

    found = {}
    for trial in sorted(_trials(study), key=lambda t: t.number):
        key = trial.user_attrs.get("key")
        if key is None or trial.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL):
            continue
        if key not in found or found[key].state != optuna.trial.TrialState.COMPLETE:
            found[key] = trial  # the first COMPLETE, else the latest failure (a retry's message)
    return found


def sync_sampled(sweep, study, stopped: dict | None = None):
    """A sampled search's state from the recorded points and the settings a sequential screen stopped (`stopped`:
    key -> search.Stopped, sequential_eval.stopped_points), its proposals kept on the sweep (so its plan, and
    sweep.json's points and pending work, include them); None for other sweeps."""
    import optuna

    from debias_plugin.sweep.search import sample_step

    if not sweep.sampling:
        return None
    results = dict(stopped or {})
    for key, trial in recorded_points(study).items():
        complete = trial.state == optuna.trial.TrialState.COMPLETE and len(trial.constraints) == len(sweep.config.budget)
        results[key] = (trial.values, dict(trial.constraints)) if complete else None
    state = sample_step(sweep.sampling, {key: value for key, value in distributions(sweep).items()
                                         if key in sweep.sampling.knobs},
                        results, sweep.sampled_key, sweep.directions)
    sweep.sampled = state.proposals
    return state


def pareto_keys(study) -> list[str]:
    """Point keys on Optuna's Pareto front of (|objective - target|, budget metrics) among the points that keep
    the budget (Optuna's constrained best_trials): the candidates a choice is made from."""
    return sorted({t.user_attrs["key"] for t in study.best_trials if "key" in t.user_attrs})
