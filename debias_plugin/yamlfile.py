"""Config files in YAML (gate, sweep, study): safe_load plus the line of every key, pydantic's errors turned into
line-numbered problems, and one error listing every problem."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, ValidationError

from debias_plugin.errors import DataError

KeysAt = Callable[[tuple], Collection[str]]  # a key path -> the keys its mapping allows (() for free-form maps)


def _pattern(regex: str, expected: str):
    def check(value: str) -> str:
        if not re.fullmatch(regex, value):
            raise ValueError(expected)
        return value
    return AfterValidator(check)


TaskMetric = Annotated[str, _pattern(r"[^/\s]+/[^/\s]+", "expected task/metric, e.g. crows_bias/pct_stereotype")]
Label = Annotated[str, _pattern(r"[A-Za-z0-9_.-]+", "labels use letters, digits, '_', '.', '-'")]


class ConfigFileError(DataError):
    """Every problem of a config file at once, each with its line and field, as one paragraph."""

    def __init__(self, path: Path, problems: list[tuple[int, str, str]], what: str):
        self.problems = problems
        first_line, first_field, first_message = problems[0]
        super().__init__(path, f"line {first_line}, field '{first_field}'", f"a valid {what} file", first_message)
        parts = [f"line {line}, field '{field}': {message}" for line, field, message in problems]
        self.args = (f"{path}: {len(problems)} problem(s) in the {what} file: " + "; ".join(parts) + ".",)


def field_text(loc) -> str:
    """('checks', 1, 'within') -> checks[1].within"""
    text = ""
    for element in loc:
        text += f"[{element}]" if isinstance(element, int) else (f".{element}" if text else str(element))
    return text or "(top level)"


def line_of(lines: dict[tuple, int], loc) -> int:
    """The line of a key path, or of its nearest written parent (pydantic may name keys the file lacks)."""
    loc = tuple(loc)
    while loc not in lines:
        loc = loc[:-1]
    return lines[loc]


def schema_keys(root, nested: dict | None = None) -> KeysAt:
    """keys_at of a file whose top level is the pydantic model `root` and whose `key: {label or index: {...}}`
    entries are the models in `nested` (e.g. {"checks": CheckConfig})."""
    nested = nested or {}

    def keys_at(loc: tuple) -> tuple[str, ...]:
        if len(loc) == 1:
            return tuple(root.model_fields)
        return tuple(nested[loc[0]].model_fields) if len(loc) == 3 and loc[0] in nested else ()
    return keys_at


def written_loc(loc, lines: dict[tuple, int], keys_at: KeysAt) -> tuple:
    """pydantic's error location cut where the file stops naming it: no union-member tags ('int', 'literal[...]')
    or '[key]' markers, but a missing key the schema allows is kept."""
    kept: list = []
    for element in loc:
        here = tuple(kept + [element])
        if here not in lines and not (isinstance(element, str) and element in keys_at(here)):
            break
        kept.append(element)
    return tuple(kept)


def describe_error(error: dict, loc: tuple, keys_at: KeysAt) -> str:
    """One pydantic error as a sentence: an unknown key with the keys allowed there, a wrong value quoted."""
    if error["type"] == "extra_forbidden":
        return f"unknown key '{loc[-1]}'; allowed keys: {', '.join(keys_at(loc))}"
    if error["type"] == "missing":
        return "required key missing"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and not isinstance(error["input"], (dict, list)):
        message += f" (found {error['input']!r})"
    return message


def validation_problems(err: ValidationError, lines: dict[tuple, int], keys_at: KeysAt) -> list[tuple[int, str, str]]:
    """Every error of a pydantic validation as (line, field, message), in line order."""
    problems = []
    for error in err.errors():
        loc = written_loc(error["loc"], lines, keys_at)
        problems.append((line_of(lines, loc), field_text(loc), describe_error(error, loc, keys_at)))
    return sorted(problems, key=lambda problem: problem[0])


def _node_lines(node, path: tuple, lines: dict[tuple, int], duplicates: list) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            here = path + (key_node.value,)
            if here in seen:
                duplicates.append((here, key_node.start_mark.line + 1))
            seen.add(here)
            lines[here] = key_node.start_mark.line + 1
            _node_lines(value_node, here, lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            _node_lines(item, path + (index,), lines, duplicates)


def read_yaml(path: Path, text: str, what: str, keys_hint: str = "",
              error: type[ConfigFileError] | None = None) -> tuple[Any, dict[tuple, int]]:
    """yaml.safe_load of a mapping plus the 1-based line of every key and list item; duplicate keys are errors."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else 1
        found = err.problem or err.context
        if err.problem and err.context and err.context_mark and err.context_mark.line + 1 != line:
            found += f" ({err.context} started on line {err.context_mark.line + 1})"
        raise DataError(path, f"line {line}", "valid YAML", found) from None
    except yaml.YAMLError as err:
        raise DataError(path, "line 1", "valid YAML", str(err)) from None
    if not isinstance(data, dict):
        raise DataError(path, "line 1", f"a mapping of {what} keys{keys_hint}", type(data).__name__)
    lines: dict[tuple, int] = {(): node.start_mark.line + 1}
    duplicates: list = []
    _node_lines(node, (), lines, duplicates)
    if duplicates:
        problems = [(line, field_text(loc), "duplicate key") for loc, line in duplicates]
        raise error(path, problems) if error else ConfigFileError(path, problems, what)
    return data, lines
