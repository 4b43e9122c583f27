"""Click commands for training stages, generated from the method registry and the pydantic option models.

Each field of `TrainConfig` and of the method's `Options` becomes one flag (its name with dashes, or
`json_schema_extra={"flag": ...}`), typed from the annotation: bool -> a flag (`--x/--no-x` when it defaults to
True), Literal -> a choice, list -> a repeatable flag (or one comma-separated value with
`json_schema_extra={"separator": ","}`), dict[str, str] -> repeatable COLUMN=VALUE. Help and defaults come from
the field. Values go back through pydantic, whose errors name the flag.
"""

from __future__ import annotations

import os
import types
import typing

import click

from debias_plugin.errors import DebiasError


def flag_name(name: str, field) -> str:
    _, _, extra = _field_shape(field)
    return extra.get("flag") or "--" + name.replace("_", "-")


def _field_shape(field) -> tuple:
    """The field's type without Optional, that type's typing origin, and its json_schema_extra (a dict)."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            annotation = args[0]
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return annotation, typing.get_origin(annotation), extra


def field_option(name: str, field, default=None, help_text: str | None = None) -> click.Option:
    """One click option for one pydantic field."""
    from pydantic_core import PydanticUndefined

    annotation, origin, extra = _field_shape(field)
    flag = flag_name(name, field)
    default = field.default if default is None else default
    required = default is PydanticUndefined
    settings = dict(help=help_text or field.description, required=required, show_default=not required)
    if not required:
        settings["default"] = default
    if annotation is bool:
        declaration = f"{flag}/--no-{flag[2:]}" if default else flag
        return click.Option([declaration, name], is_flag=True, **settings)
    if origin is typing.Literal:
        return click.Option([flag, name], type=click.Choice([str(v) for v in typing.get_args(annotation)]),
                            **settings)
    if origin is dict:
        settings.update(multiple=True, default=(), show_default=False, metavar="COLUMN=VALUE")
        return click.Option([flag, name], type=str, **settings)
    if origin is list:
        if "separator" in extra:
            settings.update(default=None, show_default=False)
            return click.Option([flag, name], type=str, **settings)
        settings.update(multiple=True, default=tuple(default or ()), show_default=bool(default))
        return click.Option([flag, name], type=typing.get_args(annotation)[0], **settings)
    return click.Option([flag, name], type=annotation if annotation in (int, float) else str, **settings)


def field_value(value, field, flag: str):
    """A click value back into what the pydantic field expects."""
    _, origin, extra = _field_shape(field)
    if origin is dict:
        pairs = {}
        for item in value:
            column, sep, wanted = item.partition("=")
            if not sep or not column.strip():
                raise DebiasError(f"{flag} expects COLUMN=VALUE (e.g. split=dev), not '{item}'.")
            pairs[column.strip()] = wanted.strip()
        return pairs
    if origin is list:
        if "separator" in extra:
            if value is None:
                return field.get_default(call_default_factory=True)
            return [v.strip() for v in value.split(extra["separator"]) if v.strip()]
        return list(value)
    return value


def stage_command(name: str, summary: str) -> click.Command:
    """The `debias NAME` command of a registered training stage."""
    from debias_plugin.methods import method_class
    from debias_plugin.options import validated
    from debias_plugin.training import TrainConfig

    method = method_class(name)
    shared = {n: f for n, f in TrainConfig.model_fields.items() if n not in method.unused_training_options}
    own = method.Options.model_fields
    clash = set(shared) & set(own)
    if clash:
        raise DebiasError(f"Stage '{name}' declares options the shared loop already has: {sorted(clash)}.")
    fields = {**shared, **own}
    flags = {n: flag_name(n, f) for n, f in fields.items()}

    def run(**values):
        from debias_plugin.training import train

        converted = {n: field_value(values[n], fields[n], flags[n]) for n in fields}
        config = validated(TrainConfig, {n: converted[n] for n in shared}, what=f"{name} options",
                           name_of=lambda field: flags.get(field, field))
        options = validated(method.Options, {n: converted[n] for n in own}, what=f"{name} options",
                            name_of=lambda field: flags.get(field, field))
        output = train(config, method(options))
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(before_and_after(name, output), err=True)
        click.echo(output)

    params = [field_option(n, f, method.training_defaults.get(n), method.training_help.get(n))
              for n, f in shared.items()]
    params += [field_option(n, f) for n, f in own.items()]
    return click.Command(name, params=params, callback=run, help=method.__doc__ or summary, short_help=summary)


def before_and_after(stage: str, output) -> str:
    """The metrics a stage logged before its first and after its last step (also in its manifest)."""
    import json
    from pathlib import Path

    from debias_plugin.outputs import MANIFEST_NAME

    metrics = json.loads((Path(output) / MANIFEST_NAME).read_text())["results"]["metrics"]
    start, end = metrics.get("start") or {}, metrics.get("end") or {}
    lines = [f"{stage}: before -> after (in {MANIFEST_NAME})"]
    lines += [f"  {key:34s} {start[key]:12.4f} -> {end[key]:12.4f}" for key in start if key in end]
    return "\n".join(lines)
