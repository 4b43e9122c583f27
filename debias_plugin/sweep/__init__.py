"""`debias sweep`: every setting of a debiasing knob through the stage, lm-eval, an Optuna study and one report.

Modules, each importing only those above it:
schema   the sweep file's pydantic schema (YAML line errors, ${VAR})
stage    a stage's options from fixed + varied values, validated before any model loads
plan     a validated sweep: its points and the jobs that make their models
search   the budget search (bisection), pure
metrics  per-point metrics with intervals (the gate's statistics), feasibility and the choice
storage  the Optuna storage: results studies (Pareto front) and the jobs study
results  sweep.json's content from the study: points, feasibility, the choice, pending work (no rendering)
plots    the plots (PNG + SVG, byte-reproducible)
render   sweep.json / sweep.csv / report.md / plots / best from the study alone
evaluate one point's model through lm-eval (debias_plugin.evaluation), its cost and its weights' hash
run      make models (the stage), evaluate, record; resume and share
"""

from debias_plugin.sweep.plan import Sweep, load_sweep
from debias_plugin.sweep.render import render_folder
from debias_plugin.sweep.run import run_sweep
from debias_plugin.sweep.schema import SweepConfig

__all__ = ["Sweep", "SweepConfig", "load_sweep", "render_folder", "run_sweep"]
