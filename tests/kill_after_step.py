"""`debias ARGS...` that SIGKILLs its own process once training step K is done (and any checkpoint of step K
written), so tests can check that a rerun resumes exactly after a real kill.

    python tests/kill_after_step.py K ARGS...    (K below the run's --steps)

The fault is injected here, not in the product: the loop's step method is wrapped for this process only.
"""

from __future__ import annotations

import os
import signal
import sys

from debias_plugin.cli import main
from debias_plugin.training import Trainer


def kill_after_step(step: int) -> None:
    """SIGKILL this process when the loop starts the step after `step`: step `step` and its checkpoint are done."""
    train_step = Trainer._train_step

    def train_step_or_die(self, run, *args, **kwargs):
        if run.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self, run, *args, **kwargs)

    Trainer._train_step = train_step_or_die


if __name__ == "__main__":
    kill_after_step(int(sys.argv[1]))
    main(sys.argv[2:])
