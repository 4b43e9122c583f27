"""lm-eval integration: our model classes (hf-mlm) and task helpers. The only package importing lm_eval."""

from __future__ import annotations

import importlib

_MODEL_MODULES = ("debias_plugin.lm_eval.masked_lm", "debias_plugin.lm_eval.bias_lm")


def register_models() -> None:
    """Import our LM classes so their @register_model decorators run (lm-eval 0.4.13 has no plugin discovery)."""
    # lm-eval fills its registry lazily only while it is empty: fill it first, or registering ours hides `hf`.
    import lm_eval.models  # noqa: F401

    for module in _MODEL_MODULES:
        importlib.import_module(module)
