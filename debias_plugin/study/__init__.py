"""`debias study`: the same sweeps on several models, and one table of every method at its chosen setting.

config  the study file (pydantic, YAML line errors) and its plan: each model's prepared stages and derived sweeps
run     prepare, then run each sweep with debias_plugin.sweep (resume, sharing and the cache are the sweep's)
table   study.json / study.csv / study.md / plots from the sweeps' sweep.json files alone
"""

from debias_plugin.study.config import load_study
from debias_plugin.study.run import run_study
from debias_plugin.study.table import render_study

__all__ = ["load_study", "render_study", "run_study"]
