"""Option models: one pydantic declaration gives each option its default, range, help text, check and CLI flag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, ClassVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from debias_plugin.errors import DebiasError


@dataclass(frozen=True)
class InputFile:
    """Marks an option whose value is a file or folder the stage reads: refused as an output, hashed as an input."""

    or_name: bool = False  # the value may instead name a built-in data set (then it is a file only if it exists)


InputPath = Annotated[str, InputFile()]
InputPathOrName = Annotated[str, InputFile(or_name=True)]


def input_file(annotation) -> InputFile | None:
    """The InputFile marker of an option's type (also inside `InputPath | None`), or None."""
    if get_origin(annotation) is Annotated:
        return next((m for m in annotation.__metadata__ if isinstance(m, InputFile)), None)
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        return next((found for arg in get_args(annotation) if (found := input_file(arg))), None)
    return None


def input_options(model: type[BaseModel]) -> dict[str, InputFile]:
    """Option name (as written: its alias if any) -> marker, for every option of `model` that names an input file."""
    found = {}
    for name, info in model.model_fields.items():
        marker = input_file(info.rebuild_annotation() if info.metadata else info.annotation)
        if marker is not None:
            found[info.alias or name] = marker
    return found


class Options(BaseModel):
    """Base of every option model: unknown keys are errors, and assignments are checked too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MadeStage:
    """A stage that makes its output without the shared training loop (negation, a bias direction, Self-Debias):
    its validated options; the sweep adds the base model itself as the reference unless base_settings names a
    setting that reproduces it."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]]

    def __init__(self, options: Options):
        self.opts = options

    @staticmethod
    def base_settings(fixed: dict) -> dict | None:
        return None


def describe_errors(err: ValidationError, name_of: Callable[[str], str] = str) -> str:
    """pydantic's errors as one sentence per field, each naming the field (or its CLI flag) and the value."""
    problems = []
    for error in err.errors():
        field = ".".join(str(part) for part in error["loc"]) or "options"
        given = "" if error["type"] == "missing" else f" (got {error.get('input')!r})"
        problems.append(f"{name_of(field)}: {error['msg'].removeprefix('Value error, ')}{given}")
    return "; ".join(problems)


def validated(model: type[BaseModel], values: dict[str, Any], *, what: str,
              name_of: Callable[[str], str] = str) -> Any:
    """Build `model` from `values`, turning pydantic's ValidationError into our one-paragraph DebiasError."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise DebiasError(f"Invalid {what}: {describe_errors(err, name_of)}.") from None
