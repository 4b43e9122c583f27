"""`debias sweep`: every setting of a debiasing knob through the stage, lm-eval, an Optuna study and one report.

Modules, each importing only those listed before it (pyproject.toml's sweep-layers contract checks it):
schema   the sweep file's pydantic schema (YAML line errors, ${VAR})
stage    a stage's options from fixed + varied values, validated before any model loads
plan     a validated sweep: its points and the jobs that make their models
search   the budget search (bisection) and the several-knob sampler replay
card     the chosen model's Hugging Face model card (best/README.md) from sweep.json's records
metrics  per-point metrics with intervals (the gate's statistics), feasibility and the choice
storage  the Optuna storage: results studies (Pareto front) and the jobs study (Optuna's heartbeat)
sequential_eval  a point's paired sequential screen: gate/sequential.py's confidence sequences as an Optuna
         screen study's looks, stopped points pruned (SequentialPruner), per-unit results cached by content
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
