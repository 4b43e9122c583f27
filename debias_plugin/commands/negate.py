"""`debias negate`: bias-vector negation through mergekit, a thin layer over debias_plugin.merge.negate."""

from __future__ import annotations

import click


@click.command("negate")
@click.option("--base", required=True, help="The model before the bias fine-tune (Hugging Face folder, safetensors).")
@click.option("--biased", default=None, help="The fully fine-tuned biased model (from `debias finetune`).")
@click.option("--adapter", default=None, help="A LoRA adapter of the base instead (from `debias finetune --lora`).")
@click.option("--lambda", "lambdas", multiple=True, required=True, metavar="L",
              help="Negation strength L > 0: theta = base - L * (biased - base). Repeat for several; each goes "
                   "to OUT/lambda_L.")
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
def negate_command(base, biased, adapter, lambdas, out, force, template, max_shard_size, capability, mu, quiet):
    """Subtract a bias vector: theta = base - lambda * (biased - base), as a mergekit task_arithmetic merge.

    Validates everything (lambda, architectures, tensor shapes from safetensors headers, the config's signs)
    before writing, then streams the merge with mergekit and writes the rendered mergekit_config.yml and
    debias_manifest.json into each output folder.
    """
    from debias_plugin.merge import negate

    for folder in negate(base, biased=biased, adapter=adapter, lambdas=lambdas, out=out, force=force,
                         template=template, shard_size=max_shard_size, progress=not quiet, capability=capability,
                         mu=mu):
        click.echo(folder)
