"""`debias pcgu`: partitioned contrastive gradient unlearning, thin over debias_plugin.methods.pcgu."""

from __future__ import annotations

import click

from debias_plugin.training import click_training_options


def _k_value(ctx, param, value: str) -> float:
    """Check --k before any model loads, with the rule resolve_k applies once the partitions are counted."""
    from debias_plugin.errors import DebiasError
    from debias_plugin.methods.pcgu import resolve_k

    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"expected a count (e.g. 10000) or a fraction (e.g. 0.05), not '{value}'") from None
    try:
        resolve_k(number, 1)
    except DebiasError as err:
        raise click.BadParameter(str(err)) from None
    return number


def reject_unused_options(config) -> None:
    """PCGU owns its update (masked plain SGD in fp32): refuse shared flags it would silently ignore."""
    from debias_plugin.errors import DebiasError

    unused = {"--grad-accum": config.grad_accum != 1, "--weight-decay": config.weight_decay != 0,
              "--scheduler": config.scheduler != "constant", "--warmup-steps": config.warmup_steps != 0,
              "--max-grad-norm": config.max_grad_norm != 0, "--precision": config.precision != "fp32"}
    named = [flag for flag, is_set in unused.items() if is_set]
    if named:
        raise DebiasError(f"debias pcgu does not use {', '.join(named)}: its update is plain SGD on the selected "
                          "partitions, in fp32. Use --similarity-batches to sum gradients over several batches.")


@click.command("pcgu")
@click_training_options
@click.option("--pairs", default="winogender", show_default=True,
              help="winogender | crows | stereoset (from $DEBIAS_DATA_DIR), a WinoGender folder, a pair CSV/TSV "
                   "(advantaged,disadvantaged or sent_more,sent_less) or a StereoSet .json/.jsonl.")
@click.option("--group", "groups", multiple=True,
              help="Keep pairs of this group (CrowS bias type, StereoSet domain, WinoGender occupation); repeatable.")
@click.option("--k", "k", default="10000", show_default=True, callback=_k_value,
              help="Partitions updated per step: a count, or a fraction of all partitions (e.g. 0.05).")
@click.option("--aggregation", type=click.Choice(["input", "output"]), default="input", show_default=True,
              help="input: one partition per output unit (rows of nn.Linear [out, in]); output: per input unit.")
@click.option("--direction", type=click.Choice(["advantaged", "disadvantaged", "both"]), default="advantaged",
              show_default=True, help="Lower the advantaged sequence, raise the disadvantaged one, or both.")
@click.option("--objective", type=click.Choice(["auto", "logit", "logprob"]), default="auto", show_default=True,
              help="auto: target logit for masked LMs (the paper), target-span log-prob for causal LMs.")
@click.option("--rank-by", type=click.Choice(["similarity", "flexibility"]), default="similarity",
              show_default=True, help="flexibility: cosine x (|step| / |weights|) per partition.")
@click.option("--similarity-batches", default=1, show_default=True,
              help="Batches whose gradients are summed before one selection and update.")
def pcgu_command(pairs, groups, k, aggregation, direction, objective, rank_by, similarity_batches, **shared):
    """Update only the weight partitions whose gradients for the advantaged and disadvantaged
    sentence of each pair disagree most (PCGU, Yu et al. 2023), for masked and causal LMs.

    --batch-size is pairs per forward pass (default 16, the paper's); --lr is the plain SGD rate.
    """
    from debias_plugin.methods.pcgu import PCGUOptions, run_pcgu
    from debias_plugin.training import config_from_options

    config, _ = config_from_options(shared)
    reject_unused_options(config)
    options = PCGUOptions(pairs=pairs, groups=list(groups), k=k, aggregation=aggregation, direction=direction,
                          objective=objective, rank_by=rank_by, batch_size=config.batch_size,
                          similarity_batches=similarity_batches)
    click.echo(run_pcgu(config, options))


# The shared flags default to Lu et al.'s batch 8; PCGU's paper uses 16 pairs per batch and plain SGD.
for _param in pcgu_command.params:
    if _param.name == "batch_size":
        _param.default = 16
        _param.help = "Pairs per forward pass (processes share it); the paper's default is 16."
    elif _param.name == "lr":
        _param.help = "Plain SGD learning rate (the paper's 1e-5)."
