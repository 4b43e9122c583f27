"""BBQ (Parrish et al. 2022): question-answering examples, and (advantaged, disadvantaged) pairs for PCGU.

Pairs follow Dige et al. 2024 (VectorInstitute/bias-mitigation-unlearning, pcgu/src/dataset.py::load_sents_bbq):
only ambiguous contexts (where the right answer is "unknown"); the advantaged sentence picks the biased answer
(BBQ's `target_loc`: the stereotyped group's member for a negative question, the other person for a
non-negative one), the disadvantaged sentence picks the other person; both read

    "{context} {question} Choose among the following two options: A: {first}; B: {second}. Answer: Option {X}"

with the two people in a random order per example, so the pair differs only in the final letter. Dige et al.
shuffle with Python's unseeded global `random`; we seed per example (category, example_id, seed), so the
pairs are the same in every run. BBQ's `target_loc` lives in supplemental/additional_metadata.csv, which we
do not have; we take the stereotyped answer from the example itself (answer_info groups vs
additional_metadata.stereotyped_groups) and skip, with a count in the log, examples where that does not single
out one answer (BBQ's own metadata drops 16 examples for the same reason).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from debias_plugin.data._io import jsonl_rows, require_field
from debias_plugin.data.bias_pair import BiasPair
from debias_plugin.errors import DataError, DebiasError
from debias_plugin.paths import data_folder

logger = logging.getLogger(__name__)

BBQ_RELATIVE_DIR = "bbq"
ANSWER_KEYS = ("ans0", "ans1", "ans2")
POLARITIES = ("neg", "nonneg")
CONTEXT_CONDITIONS = ("ambig", "disambig")
PAIR_TEMPLATE = ("{context} {question} Choose among the following two options: A: {first}; B: {second}. "
                 "Answer: Option {letter}")


@dataclass(frozen=True)
class BBQRow:
    """One checked BBQ example (its original fields) and where it came from."""

    path: Path
    line: int
    fields: dict

    @property
    def origin(self) -> str:
        return f"{self.path}, line {self.line}"


def bbq_files(path: str | Path | None = None, categories: list[str] | None = None) -> list[Path]:
    """BBQ .jsonl files: one file, or a folder's files (default `$DEBIAS_DATA_DIR/bbq`), by category stem."""
    if path:
        source = Path(path).expanduser()
        if source.is_file():
            return [source]
        if not source.is_dir():
            raise DebiasError(f"BBQ: {source} is neither a .jsonl file nor a folder of BBQ files.")
    else:
        source = data_folder(BBQ_RELATIVE_DIR, "BBQ")
    files = sorted(source.glob("*.jsonl"))
    if categories:
        missing = [c for c in categories if not (source / f"{c}.jsonl").is_file()]
        if missing:
            raise DebiasError(f"BBQ: no file {', '.join(f'{c}.jsonl' for c in missing)} in {source}; found "
                              f"{', '.join(f.stem for f in files) or 'none'}.")
        files = [source / f"{c}.jsonl" for c in categories]
    if not files:
        raise DebiasError(f"BBQ: {source} holds no .jsonl files (expected e.g. Religion.jsonl).")
    return files


def _check_row(path: Path, line: int, row: dict) -> dict:
    where = f"line {line}"

    def problem(field: str, expected: str, found: str) -> DataError:
        return DataError(path, f"{where}, field '{field}'", expected, found)

    if not isinstance(row.get("example_id"), int):
        raise problem("example_id", "an integer", repr(row.get("example_id")))
    for field, allowed in (("question_polarity", POLARITIES), ("context_condition", CONTEXT_CONDITIONS)):
        if row.get(field) not in allowed:
            raise problem(field, f"one of {', '.join(allowed)}", repr(row.get(field)))
    for field in ("category", "context", "question", *ANSWER_KEYS):
        if not isinstance(require_field(path, where, row, field), str):
            raise problem(field, "a string", type(row[field]).__name__)
    if row.get("label") not in (0, 1, 2):
        raise problem("label", "0, 1 or 2 (the index of the right answer)", repr(row.get("label")))
    info = row.get("answer_info")
    if not isinstance(info, dict):
        raise problem("answer_info", "an object mapping ans0..ans2 to [text, group]", repr(info))
    for key in ANSWER_KEYS:
        value = info.get(key)
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise problem(f"answer_info.{key}", "a [text, group] pair of strings", repr(value))
    metadata = row.get("additional_metadata")
    groups = metadata.get("stereotyped_groups") if isinstance(metadata, dict) else None
    if not (isinstance(groups, list) and groups and all(isinstance(g, str) for g in groups)):
        raise problem("additional_metadata.stereotyped_groups", "a non-empty list of group names", repr(groups))
    unknown = [key for key in ANSWER_KEYS if info[key][1].strip().lower() == "unknown"]
    if len(unknown) != 1:
        raise problem("answer_info", "exactly one answer of group 'unknown'", f"{len(unknown)}")
    return row


def load_bbq(path: str | Path | None = None, categories: list[str] | None = None) -> list[BBQRow]:
    """Every example of the BBQ files (see bbq_files), each checked field by field."""
    return [BBQRow(file, line, _check_row(file, line, row))
            for file in bbq_files(path, categories) for line, row in jsonl_rows(file)]


def _answer_groups(info: list[str]) -> set[str]:
    """The names an answer goes by: its text and group label, lower-cased, also split at '-' (e.g. 'F-Black')."""
    names = {value.strip().lower() for value in info}
    return names | {part for value in names for part in value.split("-") if part}


def biased_answer(fields: dict) -> tuple[str, str] | None:
    """(biased, other) answer keys of an example, or None when its groups do not single out one of each."""
    info, polarity = fields["answer_info"], fields["question_polarity"]
    stereotyped = {group.strip().lower() for group in fields["additional_metadata"]["stereotyped_groups"]}
    people = [key for key in ANSWER_KEYS if info[key][1].strip().lower() != "unknown"]
    targets = [key for key in people if _answer_groups(info[key]) & stereotyped]
    if len(people) != 2 or len(targets) != 1:
        return None
    target, other = targets[0], next(key for key in people if key != targets[0])
    return (target, other) if polarity == "neg" else (other, target)


def load_bbq_pairs(path: str | Path | None = None, categories: list[str] | None = None,
                   seed: int = 0) -> list[BiasPair]:
    """PCGU pairs from BBQ's ambiguous examples (Dige et al. 2024; the construction is in the module docstring)."""
    pairs, skipped = [], 0
    for row in load_bbq(path, categories):
        fields = row.fields
        if fields["context_condition"] != "ambig":
            continue
        keys = biased_answer(fields)
        if keys is None:
            skipped += 1
            continue
        order = list(keys)
        random.Random(f"{seed}:{fields['category']}:{fields['example_id']}").shuffle(order)
        first, second = (fields[key].strip() for key in order)
        context, question = fields["context"].strip(), fields["question"].strip()
        advantaged, disadvantaged = (
            PAIR_TEMPLATE.format(context=context, question=question, first=first, second=second,
                                 letter="AB"[order.index(key)]) for key in keys)
        pairs.append(BiasPair(advantaged, disadvantaged, fields["category"], row.origin))
    if skipped:
        logger.info("BBQ: skipped %d ambiguous example(s) whose answer groups do not match the stereotyped "
                    "groups in exactly one answer.", skipped)
    if not pairs:
        raise DebiasError("BBQ: no ambiguous example with one stereotyped and one other answer in "
                          f"{', '.join(str(f) for f in bbq_files(path, categories))}.")
    return pairs
