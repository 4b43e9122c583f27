"""Config files in YAML (gate, sweep, study): safe_load plus the line of every key, pydantic's errors turned into
line-numbered problems, and one error listing every problem.

Every config passes the same bounds before pydantic sees it: at most MAX_BYTES of text, nesting at most MAX_DEPTH deep,
at most MAX_NODES values once aliases are expanded ("billion laughs" is refused, not expanded), no recursive aliases,
and no NaN or infinity anywhere (a NaN must never reach a check). pydantic's strict mode already refuses booleans as
numbers and null where a value is required.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError

from debias_plugin.errors import DataError, one_line

MAX_BYTES = 1 << 20  # a config file is a few kB; anything this large is a mistake or an attack
MAX_NODES = 100_000  # values after alias expansion
MAX_DEPTH = 64  # nesting levels (PyYAML's composer recurses per level)
_LIMITS = (f"at most {MAX_BYTES // (1 << 20)} MiB of text, {MAX_NODES:,} values with aliases expanded, "
           f"{MAX_DEPTH} levels deep")
_FLOAT_TAG = "tag:yaml.org,2002:float"

KeysAt = Callable[[tuple], Collection[str]]  # a key path -> the keys its mapping allows (() for free-form maps)


def _pattern(regex: str, expected: str):
    def check(value: str) -> str:
        if not re.fullmatch(regex, value):
            raise ValueError(expected)
        return value
    return AfterValidator(check)


def _folder_name(value: str) -> str:
    if value[0] in ".-":
        raise ValueError("a label names a folder: it starts with a letter, digit or '_' (not '.' or '-')")
    if len(value) > 100:
        raise ValueError(f"a label names a folder: at most 100 characters (found {len(value)})")
    return value


TaskMetric = Annotated[str, _pattern(r"[^/\s]+/[^/\s]+", "expected task/metric, e.g. crows_bias/pct_stereotype")]
# A model, sweep or stage name from a config becomes a folder name: never '.', '..', hidden, an option or a path.
Label = Annotated[str, _pattern(r"[A-Za-z0-9_.-]+", "labels use letters, digits, '_', '.', '-'"),
                  AfterValidator(_folder_name)]
Count = Annotated[int, Field(ge=1)]  # batch sizes, steps, limits: a count of zero or less is a typo, never a setting


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
        text += f"[{element}]" if isinstance(element, int) else (f".{shown(element)}" if text else shown(element))
    return text or "(top level)"


def shown(key) -> str:
    """A key as written; quoted (and cut) where it holds a newline or another unprintable character, or is very long,
    so the error stays one short line."""
    if not isinstance(key, str):
        return str(key)
    return key if key.isprintable() and len(key) <= 120 else quoted(key)


def quoted(value, limit: int = 120) -> str:
    """repr of a value from a file, cut to `limit` characters: an absurdly long field stays a short message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


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
        return f"unknown key '{shown(loc[-1])}'; allowed keys: {', '.join(keys_at(loc))}"
    if error["type"] == "missing":
        return "required key missing"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and not isinstance(error["input"], (dict, list)):
        message += " (found null)" if error["input"] is None else f" (found {quoted(error['input'])})"
    return message


def validation_problems(err: ValidationError, lines: dict[tuple, int], keys_at: KeysAt) -> list[tuple[int, str, str]]:
    """Every error of a pydantic validation as (line, field, message), in line order."""
    problems = []
    for error in err.errors():
        loc = written_loc(error["loc"], lines, keys_at)
        problems.append((line_of(lines, loc), field_text(loc), describe_error(error, loc, keys_at)))
    return sorted(problems, key=lambda problem: problem[0])


def _node_lines(node, path: tuple, lines: dict[tuple, int], duplicates: list, non_finite: list) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            here = path + (key_node.value,)
            if here in seen:
                duplicates.append((here, key_node.start_mark.line + 1))
            seen.add(here)
            lines[here] = key_node.start_mark.line + 1
            _node_lines(key_node, here, lines, duplicates, non_finite)
            _node_lines(value_node, here, lines, duplicates, non_finite)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            _node_lines(item, path + (index,), lines, duplicates, non_finite)
    elif node.tag == _FLOAT_TAG and not _finite(node.value):
        non_finite.append((path, node.start_mark.line + 1, node.value))


def _finite(raw: str) -> bool:
    """What PyYAML's float constructor makes of a scalar is finite: .inf, .nan, nan (!!float), 1e999 are not."""
    value = raw.replace("_", "").lower().lstrip("+-")
    if value in (".inf", ".nan"):
        return False
    try:
        return math.isfinite(float(value))
    except ValueError:  # sexagesimal (1:30.5): finite
        return True


@functools.cache
def _bounded_loader():
    """A SafeLoader that refuses nesting deeper than MAX_DEPTH while composing (before Python's recursion limit)."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels "
                                                      f"({_LIMITS})", self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return BoundedLoader


def _expanded_sizes(root) -> dict[int, int] | object:
    """Values per node (by id) with every alias expanded, counted once per node; a node inside itself is returned."""
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        if done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            continue
        if id(node) in open_nodes:
            return node
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                return child
            stack.append((child, False))
    return sizes


def _check_expansion(path: Path, root) -> None:
    """Refuse a document whose aliases expand past MAX_NODES, or refer to a node that contains them."""
    import yaml

    sizes = _expanded_sizes(root)
    if not isinstance(sizes, dict):
        raise DataError(path, f"line {sizes.start_mark.line + 1}", "YAML without recursive aliases",
                        "an alias to a node that contains it")
    if sizes[id(root)] <= MAX_NODES:
        return
    where = f"line {root.start_mark.line + 1}"
    if isinstance(root, yaml.MappingNode):
        key, value = max(root.value, key=lambda pair: sizes[id(pair[0])] + sizes[id(pair[1])])
        where = f"line {key.start_mark.line + 1}"
        where += f", field '{shown(key.value)}'" if isinstance(key.value, str) else ""
    raise DataError(path, where, f"a config file within the limits ({_LIMITS})",
                    f"{sizes[id(root)]:,} values once its aliases are expanded")


def _bad_scalar(path: Path, loader, root, err: Exception) -> DataError:
    """A tagged scalar PyYAML cannot build (`!!float abc`, `!!timestamp 2020-13-45`) raises a bare Python error: find
    the scalar for its line."""
    import yaml

    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            try:
                loader.construct_object(node)
            except Exception:  # noqa: BLE001 - PyYAML's constructors raise whatever their parser does
                return DataError(path, f"line {node.start_mark.line + 1}", f"a valid {node.tag.rsplit(':', 1)[-1]}",
                                 quoted(node.value))
        elif isinstance(node, yaml.MappingNode):
            stack.extend(child for pair in reversed(node.value) for child in reversed(pair))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
    return DataError(path, "line 1", "valid YAML", f"{type(err).__name__}: {err}")


def _yaml_error(path: Path, err, text: str) -> DataError:
    import yaml

    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else 1
        found = err.problem or err.context
        if err.problem and err.context and err.context_mark and err.context_mark.line + 1 != line:
            found += f" ({err.context} started on line {err.context_mark.line + 1})"
        return DataError(path, f"line {line}", "valid YAML", found)
    if isinstance(err, yaml.reader.ReaderError) and isinstance(err.character, int):
        line = text.count("\n", 0, err.position) + 1
        return DataError(path, f"line {line}", "valid YAML", f"the character {chr(err.character)!r} ({err.reason})")
    return DataError(path, "line 1", "valid YAML", one_line(err))


def config_text(path: Path) -> str:
    """A config file's text, its size checked before it is read (a huge file is refused, not loaded)."""
    from debias_plugin.data._io import read_text

    size = path.stat().st_size
    if size > MAX_BYTES:
        raise DataError(path, "line 1", f"a config file within the limits ({_LIMITS})", f"{size:,} bytes")
    return read_text(path)


def read_yaml(path: Path, text: str, what: str, keys_hint: str = "",
              error: type[ConfigFileError] | None = None) -> tuple[Any, dict[tuple, int]]:
    """yaml.safe_load of a mapping, bounded (see the module docstring), plus the 1-based line of every key and list
    item; duplicate keys and non-finite numbers are errors."""
    import yaml

    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise DataError(path, "line 1", f"a {what} file within the limits ({_LIMITS})", f"{size:,} bytes")
    try:
        loader = _bounded_loader()(text)  # the reader refuses unprintable characters here
        node = loader.get_single_node()
    except yaml.YAMLError as err:
        raise _yaml_error(path, err, text) from None
    try:
        if node is not None:
            _check_expansion(path, node)
        try:
            data = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as err:
            raise _yaml_error(path, err, text) from None
        except Exception as err:  # noqa: BLE001 - a tagged scalar's constructor raises whatever float(), int() do
            raise _bad_scalar(path, _bounded_loader()(""), node, err) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise DataError(path, "line 1", f"a mapping of {what} keys{keys_hint}", type(data).__name__)
    lines: dict[tuple, int] = {(): node.start_mark.line + 1}
    duplicates: list = []
    non_finite: list = []
    _node_lines(node, (), lines, duplicates, non_finite)
    problems = [(line, field_text(loc), "duplicate key") for loc, line in duplicates]
    problems += [(line, field_text(loc), f"NaN and infinity are not allowed: give a finite number (found {raw})")
                 for loc, line, raw in non_finite]
    if problems:
        problems.sort(key=lambda problem: problem[0])
        raise error(path, problems) if error else ConfigFileError(path, problems, what)
    return data, lines
