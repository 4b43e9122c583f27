"""Option models: one pydantic declaration gives each option its default, range, help text, check and CLI flag."""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from debias_plugin.errors import DebiasError


class Options(BaseModel):
    """Base of every option model: unknown keys are errors, and assignments are checked too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
