"""lm-eval integration: our model classes (hf-mlm) and task helpers. The only package importing lm_eval."""

from __future__ import annotations

import importlib
import logging

_MODEL_MODULES = ("debias_plugin.lm_eval.masked_lm", "debias_plugin.lm_eval.bias_lm")


def register_models() -> None:
    """Import our LM classes so their @register_model decorators run (lm-eval 0.4.13 has no plugin discovery)."""
    # lm-eval fills its registry lazily only while it is empty: fill it first, or registering ours hides `hf`.
    import lm_eval.models  # noqa: F401

    for module in _MODEL_MODULES:
        importlib.import_module(module)
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _FirstMetadataHint) for f in task_logger.filters):
        task_logger.addFilter(_FirstMetadataHint())


class _FirstMetadataHint(logging.Filter):
    """lm-eval logs the same `--metadata` hint for every task with a custom loader (all of ours): show it once."""

    def __init__(self):
        super().__init__()
        self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Custom kwargs can be passed to `--metadata`" not in str(record.msg):
            return True
        shown, self.shown = self.shown, True
        return not shown
