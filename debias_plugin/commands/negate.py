"""`debias negate`: bias-vector negation through mergekit, a thin layer over debias_plugin.merge.negate."""

from __future__ import annotations

import click


@click.command("negate")
@click.option("--base", required=True, help="The model before the bias fine-tune (Hugging Face folder, safetensors).")
@click.option("--biased", multiple=True, help="The fully fine-tuned biased model (from `debias finetune`). Repeat "
              "to negate several bias vectors together, one --lambda each.")
@click.option("--adapter", multiple=True, help="A LoRA adapter of the base instead (from `debias finetune --lora`); "
              "repeatable like --biased.")
@click.option("--lambda", "lambdas", multiple=True, required=True, metavar="L",
              help="Negation strength L > 0: theta = base - L * (biased - base). With one source, repeat for "
                   "several models, each to OUT/lambda_L; with several sources, one per source in their order: "
                   "theta = base - sum_k L_k * (biased_k - base), one model in OUT.")
@click.option("--method", type=click.Choice(["task_arithmetic", "ties"]), default="task_arithmetic",
              show_default=True, help="ties: mergekit's TIES over the scaled vectors (trim to density 0.2, majority "
                                      "sign, sum of the agreeing entries) before subtracting (negate_ties.yml).")
@click.option("--out", required=True, help="Output model folder (a parent folder when several --lambda are given).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (an OUT overlapping an input is refused even so).")
@click.option("--template", default=None,
              help="A mergekit YAML to render instead of the bundled merge_configs/negate.yml / negate_lora.yml.")
@click.option("--max-shard-size", default="auto", show_default=True,
              help="Output shard size, e.g. 500MB or 2GB; mergekit holds one shard in memory while writing. "
                   "auto = model size / 8, between 100 MB and 1 GB.")
@click.option("--capability", default=None,
              help="Negate-and-retain: the base fine-tuned on neutral text, whose task vector is added back "
                   "(theta = base - L * (biased - base) + MU * (capable - base)).")
@click.option("--mu", default=None, help="Weight MU > 0 of the capability vector (with --capability).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def negate_command(base, biased, adapter, lambdas, out, force, template, max_shard_size, capability, mu, method,
                   quiet):
    """Subtract a bias vector: theta = base - lambda * (biased - base), as a mergekit task_arithmetic merge;
    several (--biased or --adapter repeated, one --lambda each) are subtracted together.

    Validates everything (lambda, architectures, tensor shapes from safetensors headers, the config's signs)
    before writing, then streams the merge with mergekit and writes the rendered mergekit_config.yml and
    debias_manifest.json into each output folder.
    """
    from debias_plugin.merge import negate

    def sources(given: tuple):  # one path as before; a list only when several are given
        return None if not given else given[0] if len(given) == 1 else list(given)

    for folder in negate(base, biased=sources(biased), adapter=sources(adapter), lambdas=lambdas, out=out,
                         force=force, template=template, shard_size=max_shard_size, progress=not quiet,
                         capability=capability, mu=mu, method=method):
        click.echo(folder)
