"""`debias sweep SWEEP.yml --out DIR` and `debias sweep report DIR`: thin click glue over debias_plugin.sweep."""

from __future__ import annotations

import click


class _SweepGroup(click.Group):
    """`debias sweep FILE ...` runs the sweep (`run` is implied); `debias sweep report DIR` re-renders it."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("sweep", cls=_SweepGroup)
def sweep_command():
    """Sweep a debiasing knob (negation lambda, training steps or learning rate, PCGU k) and pick the setting.

    `debias sweep SWEEP.yml --out DIR` runs every setting of the sweep file through the stage, evaluates it with
    lm-eval, records it in an Optuna study and writes DIR/sweep.json, sweep.csv, report.md, plots/ and best/.
    `debias sweep report DIR` re-renders those from the study without evaluating anything. (A sweep file named
    "report" or "run" needs the explicit form `debias sweep run FILE`.)
    """


@sweep_command.command("run")
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--out", required=True, help="Output folder (created; a folder holding the same sweep is resumed).")
@click.option("--storage", default=None, metavar="URL",
              help="Optuna storage URL shared by every process of this sweep (default: sqlite in DIR), e.g. "
                   "postgresql://host/db or sqlite:////shared/sweep.db.")
@click.option("--shard", default=None, metavar="I/N",
              help="Take only every N-th job, starting at I (job arrays); the processes must share --storage.")
@click.option("--force", is_flag=True, help="Replace DIR when it holds another sweep.")
def run_command(sweep_file, out, storage, shard, force):
    """Run, resume or join the sweep of SWEEP_FILE into DIR."""
    from debias_plugin.sweep import run_sweep

    click.echo(run_sweep(sweep_file, out, storage=storage, shard=shard, force=force) / "report.md")


@sweep_command.command("report")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--storage", default=None, metavar="URL", help="The study's storage when it is not DIR/study.db.")
def report_command(out, storage):
    """Re-render DIR's sweep.json, sweep.csv, report.md, plots and best/ from its study (no evaluation)."""
    from debias_plugin.sweep import render_folder

    click.echo(render_folder(out, storage) / "report.md")


@click.command("study")
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option("--out", required=True, help="Output folder (created; a folder holding the same study is resumed).")
@click.option("--force", is_flag=True, help="Replace DIR when it holds another study.")
@click.option("--only", multiple=True, metavar="MODEL[/SWEEP]",
              help="Run only this part (repeatable); the table marks the rest pending.")
@click.option("--report-only", is_flag=True, help="Re-render study.md/json/csv and plots from DIR's sweeps.")
def study_command(study_file, out, force, only, report_only):
    """Run the same sweeps on several models and tabulate each method at its chosen setting (DIR/study.md)."""
    from pathlib import Path

    from debias_plugin.study import load_study, render_study, run_study

    if report_only:
        click.echo(render_study(Path(out).resolve(), load_study(study_file)))
    else:
        click.echo(run_study(study_file, out, force=force, only=list(only)))
