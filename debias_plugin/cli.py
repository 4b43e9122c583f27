"""The `debias` command: a thin click group over the Python API; each command imports its heavy deps lazily."""

from __future__ import annotations

import importlib
import sys

import click

# name -> ("module:attribute", one-line help). Modules are imported only when their command runs.
_COMMANDS = {
    "eval": ("debias_plugin.commands.evaluate:eval_command", "Run lm-eval with our tasks and the hf-mlm model."),
    "default-model": ("debias_plugin.commands.evaluate:default_model_command",
                      "Write the built-in SmolLM2-135M as a safetensors folder."),
    "pcgu": ("debias_plugin.commands.pcgu:pcgu_command", "Partitioned contrastive gradient unlearning (PCGU)."),
    "finetune": ("debias_plugin.commands.finetune:finetune_command",
                 "Fine-tune a model on a biased corpus (full or LoRA): a bias vector's source."),
    "negate": ("debias_plugin.commands.negate:negate_command",
               "Subtract a bias vector (task arithmetic via mergekit): base - lambda * (biased - base)."),
    "unlearn": ("debias_plugin.commands.unlearn:unlearn_command",
                "Unlearn chosen tokens by gradient ascent (Lu et al., masked-token unlearning)."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is used."""

    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def get_command(self, ctx, name):
        if name not in _COMMANDS:
            return None
        module_name, attribute = _COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx, formatter):
        """List commands from the registry's one-line help, so `debias --help` imports nothing heavy."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, _COMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup)
@click.version_option(package_name="debias-plugin")
def cli():
    """Measure and remove social bias in language models (lm-eval, mergekit, peft, transformers)."""


def _show_messages() -> None:
    """Our library logs (resume notices, skipped rows) go to stderr as plain lines when run from the CLI."""
    import logging

    logger = logging.getLogger("debias_plugin")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user-facing errors become one paragraph on stderr and exit code 2, never a traceback."""
    from debias_plugin.errors import DebiasError

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
    if isinstance(exit_code, int) and exit_code:
        sys.exit(exit_code)
