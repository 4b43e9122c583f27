"""`debias direction`: a thin layer over methods.direction.DirectionStage, its flags generated from its options."""

from __future__ import annotations

import click


def _command() -> click.Command:
    from debias_plugin.commands.stage import field_option, field_value, flag_name
    from debias_plugin.methods.direction import DirectionOptions, DirectionStage
    from debias_plugin.options import validated

    fields = DirectionOptions.model_fields
    flags = {name: flag_name(name, field) for name, field in fields.items()}

    def run(model, out, force, quiet, **values):
        converted = {name: field_value(values[name], fields[name], flags[name]) for name in fields}
        options = validated(DirectionOptions, converted, what="direction options",
                            name_of=lambda field: flags.get(field, field))
        click.echo(DirectionStage(options).make(model, out, force=force, progress=not quiet))

    params = [
        click.Option(["--model", "model"], required=True, help="The causal LM (Hugging Face folder, safetensors)."),
        click.Option(["--out", "out"], required=True,
                     help="Output folder: steer.pt (lm-eval's steered format), steer.safetensors, the manifest."),
        click.Option(["--force", "force"], is_flag=True,
                     help="Replace OUT if it exists (an OUT overlapping an input is refused even so)."),
        click.Option(["--quiet", "quiet"], is_flag=True, help="No progress bars."),
        *(field_option(name, field) for name, field in fields.items()),
    ]
    return click.Command("direction", params=params, callback=run, help=DirectionStage.__doc__,
                         short_help="Bias directions or LEACE erasers as steering files for lm-eval's steered model.")


direction_command = _command()
