"""`debias sweep --storage postgresql+psycopg://...` on a real PostgreSQL server the test starts itself (pgserver, from
PyPI): three worker processes on one sweep, one SIGKILLed mid-trial; the other two finish it (Optuna's heartbeat
fails the dead claim) and every report equals a one-worker run's. Skipped, saying why, only where the server
cannot start."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import perturbed_copy

SWEEP = """\
base: {base}
method: negate
fixed: {{biased: {biased}}}
grid: {{lambda: [0.25, 0.5, 1.0]}}
evaluate: [crows_bias_gender, wikitext2_ppl]
objective: crows_bias_gender/pct_stereotype
budget: {{wikitext2_ppl/word_perplexity: {{max_relative_increase: 0.05}}}}
limit: 4
resamples: 200
evaluation: full
"""


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of our own (pgserver's binaries), stopped afterwards: its SQLAlchemy URL for psycopg."""
    try:
        import pgserver
        import psycopg  # noqa: F401 - SQLAlchemy's postgresql+psycopg driver
    except ImportError as err:
        pytest.skip(f"PostgreSQL cannot start: {err} (pip install '.[test]' brings pgserver and psycopg[binary])")
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="debias-pg-"))  # not under pytest's 0700 folders: pgserver runs the
    folder.chmod(0o755)  # server as its own user when we are root
    try:
        server = pgserver.get_server(folder, cleanup_mode="stop")
    except Exception as err:  # noqa: BLE001 - whatever stops the server starting is the skip reason
        pytest.skip(f"PostgreSQL cannot start here: {type(err).__name__}: {err}")
    host = re.search(r"host=([^&]+)", server.get_uri()).group(1)
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={host}"
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    base = tiny_model("gpt2")
    return base, perturbed_copy(base, tmp_path_factory.mktemp("pg_models") / "biased")


def _deterministic(out: Path) -> tuple[dict, str]:
    """sweep.json without its run section, and report.md without its cost lines (timings, requests scored)."""
    content = json.loads((out / "sweep.json").read_text())
    content.pop("run")
    report = (out / "report.md").read_text()
    report = re.sub(r"\n## Cost\n.*?(?=\n## |\Z)", "\n", report, flags=re.S)
    return content, report


def _command(*args) -> list[str]:
    return [sys.executable, "-c", "from debias_plugin.cli import main; main()", *args]


def test_three_workers_on_postgresql_one_killed_mid_trial(postgres, models, tmp_path, monkeypatch):
    import optuna

    from debias_plugin.sweep import run_sweep

    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DEBIAS_SWEEP_POLL_SECONDS", "0.5")
    monkeypatch.setenv("DEBIAS_SWEEP_HEARTBEAT_SECONDS", "1")
    base, biased = models
    path = tmp_path / "sweep.yml"
    path.write_text(SWEEP.format(base=base, biased=biased))
    expected = _deterministic(run_sweep(path, tmp_path / "alone"))  # one worker, SQLite

    args = [("sweep", str(path), "--out", str(tmp_path / f"out{i}"), "--storage", postgres) for i in range(3)]
    fault = str(Path(__file__).with_name("sweep_fault.py"))
    doomed = subprocess.Popen([sys.executable, fault, "1", *args[0]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # the doomed worker claims first (the base model) and dies evaluating it
    workers = [subprocess.Popen(_command(*a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for a in args[1:]]
    try:
        _, stderr = doomed.communicate(timeout=600)
        assert doomed.returncode == -signal.SIGKILL, stderr[-3000:]
        for worker in workers:
            _, stderr = worker.communicate(timeout=600)
            assert worker.returncode == 0, stderr[-3000:]
    finally:
        for worker in (doomed, *workers):
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for i in (1, 2):
        assert _deterministic(tmp_path / f"out{i}") == expected
    claims = optuna.load_study(study_name=expected[0]["study"] + ".jobs", storage=postgres).trials
    (stale,) = [t for t in claims if t.state.name == "FAIL"]
    assert stale.user_attrs["pid"] == doomed.pid  # the killed claim, failed by Optuna's heartbeat
    done = [t for t in claims if t.state.name == "COMPLETE"]
    assert len({t.user_attrs["job"] for t in done}) == len(done), "a job was done twice"
    assert {t.user_attrs["pid"] for t in done} <= {w.pid for w in workers}
    rerun = subprocess.run(_command(*args[0]), capture_output=True, text=True)  # the killed worker, restarted
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _deterministic(tmp_path / "out0") == expected
