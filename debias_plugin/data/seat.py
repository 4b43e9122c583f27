"""SEAT tests (May et al. 2019) in bias-bench's layout: one JSON object per file with targ1, targ2, attr1, attr2."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from debias_plugin.data._io import json_document
from debias_plugin.errors import DataError, DebiasError
from debias_plugin.paths import data_folder

SEAT_RELATIVE_DIR = "seat"
SEAT_SUFFIX = ".jsonl"
SEAT_SETS = ("targ1", "targ2", "attr1", "attr2")
# The tests bias-bench runs and the Bias Vector paper reports (bias-bench export/seat.py), by bias type.
SEAT_TESTS_BY_BIAS = {
    "gender": ("sent-weat6", "sent-weat6b", "sent-weat7", "sent-weat7b", "sent-weat8", "sent-weat8b"),
    "race": ("sent-angry_black_woman_stereotype", "sent-angry_black_woman_stereotype_b", "sent-weat3",
             "sent-weat3b", "sent-weat4", "sent-weat5", "sent-weat5b"),
    "religion": ("sent-religion1", "sent-religion1b", "sent-religion2", "sent-religion2b"),
}
DEFAULT_SEAT_TESTS = tuple(test for tests in SEAT_TESTS_BY_BIAS.values() for test in tests)


@dataclass(frozen=True)
class SeatSet:
    """One of the four sets: its category name (e.g. 'MaleNames') and example sentences."""

    category: str
    examples: tuple[str, ...]


@dataclass(frozen=True)
class SeatTest:
    """Targets X (targ1), Y (targ2) and attributes A (attr1), B (attr2) of one test file."""

    name: str  # the file stem, e.g. 'sent-weat6'
    path: Path
    targ1: SeatSet
    targ2: SeatSet
    attr1: SeatSet
    attr2: SeatSet


def bias_type_of(test: str) -> str | None:
    """'gender', 'race' or 'religion' for bias-bench's tests, None for the others."""
    return next((bias for bias, tests in SEAT_TESTS_BY_BIAS.items() if test in tests), None)


def seat_folder(explicit: str | Path | None = None) -> Path:
    """The folder of SEAT files: an explicit path, else `$DEBIAS_DATA_DIR/seat`."""
    if explicit:
        folder = Path(explicit).expanduser()
        if not folder.is_dir():
            raise DebiasError(f"SEAT: the folder {folder} does not exist; expected a folder of SEAT .jsonl files.")
        return folder
    return data_folder(SEAT_RELATIVE_DIR, "SEAT")


def available_seat_tests(folder: str | Path | None = None) -> list[str]:
    """Stems of the SEAT files in the folder, sorted."""
    return sorted(path.stem for path in seat_folder(folder).glob(f"*{SEAT_SUFFIX}") if not path.name.startswith("."))


def resolve_seat_tests(tests: list[str] | None = None, folder: str | Path | None = None) -> list[Path]:
    """Files of the named tests (file stems); by default bias-bench's 17 tests, those present in the folder."""
    folder = seat_folder(folder)
    available = set(available_seat_tests(folder))
    if not tests:
        tests = [test for test in DEFAULT_SEAT_TESTS if test in available]
        if not tests:
            raise DebiasError(f"SEAT: {folder} holds none of the default tests ({', '.join(DEFAULT_SEAT_TESTS)}); "
                              "name the tests to run with --tests.")
    elif unknown := [test for test in tests if test not in available]:
        raise DebiasError(f"SEAT: no test file {', '.join(f'{t}{SEAT_SUFFIX}' for t in unknown)} in {folder}; "
                          f"available tests: {', '.join(sorted(available)) or 'none'}.")
    elif len(set(tests)) != len(tests):
        raise DebiasError(f"SEAT: a test is named twice in {', '.join(tests)}.")
    return [folder / f"{test}{SEAT_SUFFIX}" for test in tests]


def _seat_set(path: Path, document: dict, key: str) -> SeatSet:
    value = document.get(key)
    if not isinstance(value, dict):
        raise DataError(path, f"field '{key}'", "an object with 'category' and 'examples'",
                        "nothing" if value is None else type(value).__name__)
    category = value.get("category")
    if not isinstance(category, str) or not category.strip():
        raise DataError(path, f"field '{key}.category'", "a non-empty string", repr(category))
    examples = value.get("examples")
    if not isinstance(examples, list) or not examples:
        raise DataError(path, f"field '{key}.examples'", "a non-empty list of sentences",
                        repr(examples) if not isinstance(examples, list) else "an empty list")
    for index, example in enumerate(examples):
        if not isinstance(example, str) or not example.strip():
            raise DataError(path, f"field '{key}.examples[{index}]'", "a non-empty string", repr(example))
        if (first := examples.index(example)) < index:
            raise DataError(path, f"field '{key}.examples[{index}]'", "each example once (the sets are sets)",
                            f"a repeat of {key}.examples[{first}] {example!r}")
    return SeatSet(category.strip(), tuple(examples))


def load_seat_test(path: str | Path) -> SeatTest:
    """Read one SEAT file; targets must be of equal size, as the permutation test partitions X u Y in halves."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(path, "path", "an existing SEAT .jsonl file", "no such file")
    document = json_document(path)
    if not isinstance(document, dict):
        raise DataError(path, "top level", f"one JSON object with {', '.join(SEAT_SETS)}", type(document).__name__)
    sets = {key: _seat_set(path, document, key) for key in SEAT_SETS}
    if len(sets["targ1"].examples) != len(sets["targ2"].examples):
        raise DataError(path, "fields 'targ1.examples' and 'targ2.examples'", "target sets of equal size",
                        f"{len(sets['targ1'].examples)} and {len(sets['targ2'].examples)} examples")
    name = path.name[: -len(SEAT_SUFFIX)] if path.name.endswith(SEAT_SUFFIX) else path.stem
    return SeatTest(name=name, path=path, **sets)


def load_seat_tests(tests: list[str] | None = None, folder: str | Path | None = None) -> list[SeatTest]:
    """The named tests (default: bias-bench's, those present), each file checked."""
    return [load_seat_test(path) for path in resolve_seat_tests(tests, folder)]
