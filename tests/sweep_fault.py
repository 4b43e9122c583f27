"""`python tests/sweep_fault.py K debias-args...`: the debias CLI, SIGKILLed at its K-th model evaluation.

The sweep tests inject the fault here (debias_plugin has no kill hook): the process dies mid-claim, after the
job's model is made and before its results are recorded, as a machine lost mid-trial would.
"""

import os
import signal
import sys

from debias_plugin.sweep import run


def main() -> None:
    kill_at, args = int(sys.argv[1]), sys.argv[2:]
    evaluate, calls = run.evaluate_model, []

    def evaluate_or_die(*positional, **named):
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return evaluate(*positional, **named)

    run.evaluate_model = evaluate_or_die
    from debias_plugin.cli import main as cli

    cli(args)


if __name__ == "__main__":
    main()
