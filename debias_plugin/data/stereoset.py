"""StereoSet (Nadeem et al. 2021): the original dev.json layout and the flattened JSONL."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from debias_plugin.data._io import json_document, jsonl_rows, require_field
from debias_plugin.errors import DataError
from debias_plugin.paths import data_file

STEREOSET_RELATIVE_PATH = "stereoset/stereoset_dev.jsonl"
STEREOSET_DOMAINS = ("gender", "profession", "race", "religion")
KINDS = ("intrasentence", "intersentence")
LABELS = ("stereotype", "anti-stereotype", "unrelated")
BLANK = "BLANK"


@dataclass(frozen=True)
class StereoSetExample:
    id: str
    kind: str
    target: str
    bias_type: str
    context: str
    stereotype: str
    anti_stereotype: str
    unrelated: str

    def sentence(self, label: str) -> str:
        return {"stereotype": self.stereotype, "anti-stereotype": self.anti_stereotype,
                "unrelated": self.unrelated}[label]


def _check(path: Path, where: str, kind: str, bias_type: str, context: str) -> None:
    if kind not in KINDS:
        raise DataError(path, f"{where}, field 'type'", "'intrasentence' or 'intersentence'", repr(kind))
    if bias_type not in STEREOSET_DOMAINS:
        raise DataError(path, f"{where}, field 'bias_type'", f"one of {', '.join(STEREOSET_DOMAINS)}", repr(bias_type))
    if kind == "intrasentence" and BLANK not in context:
        raise DataError(path, f"{where}, field 'context'", f"the placeholder {BLANK} in an intrasentence context",
                        repr(context))


def _stable_id(kind: str, fields: tuple[str, ...], seen: dict[str, int]) -> str:
    """Content hash, so ids survive reordering; a counter keeps the dataset's duplicate rows apart."""
    digest = hashlib.sha1("\x1f".join((kind, *fields)).encode("utf-8")).hexdigest()[:12]
    seen[digest] = seen.get(digest, 0) + 1
    return digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"


def _from_jsonl(path: Path) -> list[StereoSetExample]:
    examples, seen = [], {}
    for line, row in jsonl_rows(path):
        where = f"line {line}"
        kind = require_field(path, where, row, "type")
        bias_type = require_field(path, where, row, "bias_type")
        context = require_field(path, where, row, "context")
        _check(path, where, kind, bias_type, context)
        target = require_field(path, where, row, "target")
        sentences = tuple(require_field(path, where, row, label) for label in LABELS)
        examples.append(StereoSetExample(
            _stable_id(kind, (target, context, *sentences), seen), kind, target, bias_type, context, *sentences
        ))
    return examples


def _from_dev_json(path: Path) -> list[StereoSetExample]:
    document = json_document(path)
    if not isinstance(document, dict):
        raise DataError(path, "top level", "a JSON object with a 'data' field", type(document).__name__)
    data = document.get("data")
    if not isinstance(data, dict):
        raise DataError(path, "field 'data'", "an object with 'intrasentence' and/or 'intersentence' lists")
    examples = []
    for kind in KINDS:
        for position, item in enumerate(data.get(kind, [])):
            where = f"data.{kind}[{position}]"
            bias_type = require_field(path, where, item, "bias_type")
            context = require_field(path, where, item, "context")
            _check(path, where, kind, bias_type, context)
            by_label = {}
            for sentence in item.get("sentences", []):
                label = sentence.get("gold_label")
                if label not in LABELS:
                    raise DataError(path, f"{where}.sentences, field 'gold_label'", f"one of {LABELS}", repr(label))
                by_label[label] = require_field(path, where, sentence, "sentence")
            missing = [label for label in LABELS if label not in by_label]
            if missing:
                raise DataError(path, f"{where}.sentences", f"one sentence per label {LABELS}",
                                f"none labelled {missing}")
            examples.append(StereoSetExample(
                str(require_field(path, where, item, "id")), kind, require_field(path, where, item, "target"),
                bias_type, context, *(by_label[label] for label in LABELS),
            ))
    if not examples:
        raise DataError(path, "field 'data'", "at least one intrasentence or intersentence example", "none")
    return examples


def load_stereoset(path: str | Path | None = None, kind: str | None = None) -> list[StereoSetExample]:
    """Read StereoSet from dev.json or the flattened JSONL; `kind` keeps only intra- or intersentence."""
    path = data_file(path, STEREOSET_RELATIVE_PATH, "StereoSet")
    examples = _from_dev_json(path) if path.suffix == ".json" else _from_jsonl(path)
    if kind is not None:
        if kind not in KINDS:
            raise DataError(path, "requested kind", "'intrasentence' or 'intersentence'", repr(kind))
        examples = [example for example in examples if example.kind == kind]
    return examples
