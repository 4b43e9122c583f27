"""`debias sweep`: every setting of a debiasing knob through the stage, lm-eval, an Optuna study and one report.

config  the sweep file (pydantic, YAML line errors) and its plan: points and the jobs that make their models
search  the budget search (bisection), pure
study   Optuna storage: results studies (Pareto front), the job board (claims, stale claims, heartbeats)
metrics per-point metrics with intervals (the gate's statistics), feasibility and the choice
runner  make models (negate, train), evaluate (debias_plugin.evaluation), record; resume and share
report  sweep.json / sweep.csv / report.md / plots / best from the study alone
"""

from debias_plugin.sweep.config import Sweep, SweepConfig, load_sweep
from debias_plugin.sweep.report import render_folder
from debias_plugin.sweep.runner import run_sweep

__all__ = ["Sweep", "SweepConfig", "load_sweep", "render_folder", "run_sweep"]
