"""`debias eval`: lm-eval's own `run` command with our tasks on the include path and our model classes registered
(hf-bias for causal LMs, hf-mlm for masked ones, chosen from the model's config unless --model is given). Task names,
model arguments, weights (safetensors unless --allow-pickle, which is ours) and tokenizer are checked first, so bad
input is one paragraph (exit 2) before any model loads. The lm-eval side (task check, device default, model class,
include path, registration, the run) is lm_eval/run.py's, shared with evaluation.evaluate."""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import click

from debias_plugin.default_model import BUILTIN_MODELS, DEFAULT_MODEL
from debias_plugin.errors import DebiasError

_CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
ALLOW_PICKLE = "--allow-pickle"
DEFAULT_OUTPUT = Path("runs") / "eval"  # results are saved unless --output_path says where (lm-eval timestamps them)


def read_flags(args: list[str]) -> argparse.Namespace:
    """The `lm_eval run` flags we check or default, spelled as lm-eval spells them; the rest pass through unread
    (lm-eval's own parser is private: lm_eval._cli)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for names in (("--model", "-M"), ("--include_path",), ("--config", "-C"), ("--device",), ("--output_path", "-o")):
        parser.add_argument(*names)
    for names in (("--model_args", "-a"), ("--tasks", "-t")):
        parser.add_argument(*names, nargs="+", action="append", default=[])
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser.parse_known_args(args)[0]


def lm_eval_arguments(args: list[str], flags: argparse.Namespace) -> list[str]:
    """The `lm_eval run` argument list: ours defaulted (include path, model, default model folder, device)."""
    from debias_plugin.lm_eval.run import default_device, include_path

    args = [*args, *([] if flags.include_path else ["--include_path", include_path()])]
    if not flags.model_args and not flags.config:
        from debias_plugin.default_model import materialize_default_model

        # 1024-token windows keep WikiText on 2 CPU cores in minutes (SmolLM2 allows 8192).
        args += ["--model_args", f"pretrained={materialize_default_model()},max_length=1024"]
    if not flags.device:
        args += ["--device", default_device()]
    if not flags.output_path and not flags.config:
        args += ["--output_path", str(DEFAULT_OUTPUT)]
    return args


def check_tasks(names: list[str], include: str) -> None:
    """Every --tasks name is an included task or one of lm-eval's (whose full index is read only when needed)."""
    from debias_plugin.lm_eval.run import UnknownTaskError, task_manager

    try:
        task_manager(names, include=include, cli_forms=True)
    except UnknownTaskError as err:
        raise DebiasError(f"--tasks: no task named {', '.join(map(repr, err.tasks))} in {include} or among "
                          "lm-eval's own tasks; expected task or group names such as crows_bias, stereoset_bias, "
                          "wikitext2_ppl (`lm_eval ls tasks --include_path DIR` lists them all).") from None


def model_folder(pretrained: str, revision: str | None = None) -> Path:
    """A local folder as is; a hub id as its snapshot (config, tokenizer, safetensors), so the checks see real files."""
    if Path(pretrained).is_dir():
        return Path(pretrained)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(pretrained, revision=revision,
                                      allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"]))
    except (OSError, ValueError) as err:  # invalid id, unknown repo, offline without a cached copy
        raise DebiasError(f"pretrained={pretrained}: not a model folder on this machine, nor a hub model that can "
                          f"be fetched or is cached ({str(err).splitlines()[0]}).") from None


def check_arguments(args: list[str], flags: argparse.Namespace, allow_pickle: bool) -> list[str]:
    """Check tasks, model arguments, weights and tokenizer before anything loads; the arguments to run lm-eval with."""
    from debias_plugin.lm_eval.masked_lm import check_masked_lm_folder, masked_lm_options
    from debias_plugin.lm_eval.run import (
        CAUSAL_MODEL_CLASS,
        MASKED_MODEL_CLASS,
        include_path,
        parse_model_args,
        resolve_model_class,
    )
    from debias_plugin.models import check_weights, load_tokenizer

    names = [name for group in flags.tasks for value in group for name in value.split(",") if name]
    if not names and not flags.config:
        raise DebiasError("--tasks is required: expected task or group names, e.g. --tasks crows_bias,stereoset_bias.")
    if names:
        check_tasks(names, flags.include_path or include_path())
    model_args = parse_model_args(flags.model_args)
    trust_remote_code = flags.trust_remote_code or str(model_args.get("trust_remote_code")).lower() == "true"
    folder = model_folder(str(model_args["pretrained"]), model_args.get("revision")) \
        if model_args.get("pretrained") else None
    if not flags.model and not flags.config:  # from the folder's config: hf-mlm (masked) or hf-bias (causal)
        flags.model = resolve_model_class(folder) if folder is not None else CAUSAL_MODEL_CLASS
        args = [*args, "--model", flags.model]
    if flags.model == MASKED_MODEL_CLASS:
        allow_pickle = allow_pickle or masked_lm_options(model_args).allow_pickle
        args = [*args, "--model_args", "allow_pickle=True"] if allow_pickle else args
    if folder is not None:
        if flags.model == MASKED_MODEL_CLASS:
            check_masked_lm_folder(str(folder), trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        else:
            check_weights(folder, allow_pickle)
            if not model_args.get("tokenizer"):  # lm-eval's hf reads the tokenizer from the model folder
                load_tokenizer(folder, trust_remote_code=trust_remote_code)
    return args


def refuse_output_over_inputs(output: Path, flags: argparse.Namespace) -> None:
    """lm-eval writes into --output_path: never the model folder, the data it reads or the task definitions."""
    from debias_plugin.lm_eval.run import include_path, parse_model_args
    from debias_plugin.outputs import refuse_overlap
    from debias_plugin.paths import data_root

    pretrained = parse_model_args(flags.model_args).get("pretrained")
    inputs = [pretrained if pretrained and Path(str(pretrained)).is_dir() else None, data_root(),
              *(flags.include_path or include_path()).split(",")]
    refuse_overlap(output, inputs, "--output_path", replaced=False)


def resolve_builtin_models(args: list[str]) -> list[str]:
    """pretrained=builtin:NAME in --model_args -> the built-in model's folder (materialised once)."""
    from debias_plugin.default_model import BUILTIN_PREFIX, resolve_model

    builtin = re.compile(rf"(pretrained=){re.escape(BUILTIN_PREFIX)}([\w.-]+)")
    return [builtin.sub(lambda m: m.group(1) + resolve_model(BUILTIN_PREFIX + m.group(2)), arg) for arg in args]


def run_lm_eval(args: list[str]) -> None:
    """Check the arguments, register our models, then run lm-eval's CLI: same flags, same results JSON."""
    from debias_plugin.lm_eval import register_models
    from debias_plugin.lm_eval.run import run_cli
    from debias_plugin.lm_eval.suite import expand_task_presets

    register_models()  # before the checks import hf-mlm: lm-eval's own registry must be filled first
    allow_pickle, args = ALLOW_PICKLE in args, [arg for arg in args if arg != ALLOW_PICKLE]
    args = resolve_builtin_models(args)
    args = expand_task_presets(args)  # bias_suite -> the members whose data is here (a notice for the rest)
    flags = read_flags(args)
    args = lm_eval_arguments(check_arguments(args, flags, allow_pickle), flags)
    output = read_flags(args).output_path  # "." is a folder too: Path(".") would equal Path("")
    if output:
        refuse_output_over_inputs(Path(output), read_flags(args))
    started = time.time()
    run_cli(args)
    if output and int(os.environ.get("RANK", "0")) == 0:
        show_summary(Path(output), started)


def show_summary(output: Path, since: float) -> None:
    """After lm-eval's tables: our summary of the results file this run wrote, and where it is."""
    from debias_plugin.gate.results import read_results
    from debias_plugin.summary import summarize

    folder, pattern = (output.parent, f"{output.stem}_*.json") if output.suffix == ".json" else \
        (output, "**/results_*.json")
    written = [path for path in folder.glob(pattern) if path.stat().st_mtime >= since - 1]
    if not written:
        return
    latest = max(written, key=lambda path: path.stat().st_mtime)
    loaded = read_results(latest)  # with the per-sample files beside it (--log_samples): the type gaps' intervals
    text = summarize({**loaded.data, "samples": loaded.samples})
    click.echo(f"{text}\n\nResults saved to {latest}" if text else f"Results saved to {latest}")


@click.command("eval", context_settings=_CONTEXT, add_help_option=False)
@click.pass_context
def eval_command(ctx):
    """Run lm-eval (same flags as `lm_eval run`) with the bundled tasks and our model classes registered.

    Without --model the class comes from the model's config: hf-bias (lm-eval's hf scores for less work) for
    causal LMs, hf-mlm for masked LMs. Without --model_args it evaluates the built-in SmolLM2-135M
    (max_length=1024); --include_path defaults to our tasks/. Pickled weights are refused unless --allow-pickle.
    """
    if "--help" in ctx.args or "-h" in ctx.args:
        click.echo(ctx.get_help())
        click.echo("\nAll `lm_eval run` flags are accepted; see `lm_eval run --help`.")
        return
    run_lm_eval(ctx.args)


@click.command("default-model")
@click.option("--name", type=click.Choice(sorted(BUILTIN_MODELS)), default=DEFAULT_MODEL, show_default=True,
              help="Which built-in model (gemma3-270m needs the [gemma] extra; elsewhere: pretrained=builtin:NAME).")
@click.option("--out", type=click.Path(), default=None, help="Folder to write (default: the package cache).")
def default_model_command(name, out):
    """Write a built-in model (a GGUF shipped on PyPI) as a float32 safetensors folder and print its path."""
    from debias_plugin.default_model import materialize_builtin

    click.echo(materialize_builtin(name, out))
