"""The `debias` command: a thin click group over the Python API; each command imports its heavy deps lazily."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from debias_plugin.errors import DebiasError, describe_library_error

# name -> ("module:attribute", one-line help). Modules are imported only when their command runs.
_COMMANDS = {
    "eval": ("debias_plugin.commands.evaluate:eval_command", "Run lm-eval with our tasks and the hf-mlm model."),
    "default-model": ("debias_plugin.commands.evaluate:default_model_command",
                      "Write a built-in model (SmolLM2-135M, Gemma 3 270M) as a safetensors folder."),
    "data": ("debias_plugin.commands.data:data_command",
             "The benchmark files: where each is found (`data list`), fetching them checked by hash (`data fetch`)."),
    "seat": ("debias_plugin.commands.seat:seat_command", "SEAT effect sizes and p-values (May et al. 2019)."),
    "gate": ("debias_plugin.commands.gate:gate_command", "Pass/fail bias and perplexity checks for CI (exit 0/1/2)."),
    "sweep": ("debias_plugin.commands.sweep:sweep_command",
              "Sweep a debiasing knob with lm-eval and Optuna; `sweep report DIR` re-renders the report."),
    "study": ("debias_plugin.commands.sweep:study_command",
              "The same sweeps on several models: every method at its chosen setting in one table."),
    "negate": ("debias_plugin.commands.negate:negate_command",
               "Subtract a bias vector (task arithmetic via mergekit): base - lambda * (biased - base)."),
    "direction": ("debias_plugin.commands.direction:direction_command",
                  "Bias directions (mean difference, SentenceDebias PCA) or LEACE erasers as lm-eval steering files."),
}


def _commands() -> dict[str, tuple[str | None, str]]:
    """Commands above plus one per registered training stage (generated from its options; module None)."""
    from debias_plugin.methods import available_methods

    stages = {name: (None, summary) for name, (_, summary) in available_methods().items()}
    return {**stages, **_COMMANDS}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is used."""

    def list_commands(self, ctx):
        return sorted(_commands())

    def get_command(self, ctx, name):
        commands = _commands()
        if name not in commands:
            return None
        target, summary = commands[name]
        if target is None:
            from debias_plugin.commands.stage import stage_command

            return stage_command(name, summary)
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx, formatter):
        """List commands from the registry's one-line help, so `debias --help` imports nothing heavy."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in sorted(_commands().items())])


@click.group(cls=LazyGroup)
@click.version_option(package_name="debias-plugin")
def cli():
    """Measure and remove social bias in language models (lm-eval, mergekit, peft, transformers)."""


class _CurrentStderr(logging.StreamHandler):
    """Writes to sys.stderr as it is at each message (a test's capture, a notebook's redirect), not at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _ignored):
        pass


class _OthersOnly(logging.Filter):
    """Our records are printed by our own handler; the root's shows the other libraries' warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("debias_plugin")


def _show_messages() -> None:
    """Our library logs (resume notices, skipped rows, progress) go to stderr as plain lines when run from the CLI,
    once each: a root handler of our own keeps a library's root-level `logging.warning()` from installing
    logging's default one, which would print every record of ours a second time."""
    logger = logging.getLogger("debias_plugin")
    if not logger.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        others = _CurrentStderr()
        others.setLevel(logging.WARNING)
        others.addFilter(_OthersOnly())
        others.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
        root.addHandler(others)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user-facing errors become one paragraph on stderr and exit code 2, never a traceback."""
    _show_messages()
    try:
        exit_code = cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except DebiasError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(2)
    except Exception as err:  # a library we call failed: still one paragraph, exit 2 (DEBIAS_DEBUG=1 re-raises)
        if os.environ.get("DEBIAS_DEBUG") == "1":
            raise
        click.echo(f"Error: {describe_library_error(err)}", err=True)
        sys.exit(2)
    _leave_process_group()
    if isinstance(exit_code, int) and exit_code:
        sys.exit(exit_code)


def _leave_process_group() -> None:
    """Under `accelerate launch`, ranks finish together and close gloo first: a rank that exits with the group
    still open can abort in C++ ("terminate called without an active exception") and fail the whole launch."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
