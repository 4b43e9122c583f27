"""lm-eval integration: our model classes (hf-bias, hf-mlm), task helpers and run.py, the one way the rest of the
package runs lm-eval (`debias eval` and evaluation.evaluate). The only package importing lm_eval."""

from __future__ import annotations

import logging


class _FirstMetadataHint(logging.Filter):
    """lm-eval logs the same `--metadata` hint for every task with a custom loader (all of ours): show it once."""

    shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Custom kwargs can be passed to `--metadata`" not in str(record.msg):
            return True
        shown, self.shown = self.shown, True
        return not shown


_METADATA_HINT = _FirstMetadataHint()


def register_models() -> None:
    """Import our LM classes so their @register_model decorators run (lm-eval 0.4.13 has no plugin discovery)."""
    # lm-eval fills its registry lazily only while it is empty: fill it first, or registering ours hides `hf`.
    import lm_eval.models  # noqa: F401

    from debias_plugin.lm_eval import bias_lm, masked_lm  # noqa: F401
    from debias_plugin.lm_eval import steered_safe  # noqa: F401
    from debias_plugin.lm_eval import selfdebias  # noqa: F401

    logging.getLogger("lm_eval.api.task").addFilter(_METADATA_HINT)  # addFilter adds a filter once
