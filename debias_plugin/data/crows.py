"""CrowS-Pairs (Nangia et al. 2020): pairs of minimally different sentences."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from debias_plugin.data._io import csv_rows, require_field
from debias_plugin.errors import DataError
from debias_plugin.paths import data_file

CROWS_RELATIVE_PATH = "crows_pairs/crows_pairs_anonymized.csv"
CROWS_BIAS_TYPES = (
    "race-color", "socioeconomic", "gender", "disability", "nationality",
    "sexual-orientation", "physical-appearance", "religion", "age",
)
CROWS_TASK = "crows_bias"  # the lm-eval group; one task per bias type below it


def crows_type_task(bias_type: str) -> str:
    """The lm-eval task of one CrowS bias type: race-color -> crows_bias_race_color."""
    return f"{CROWS_TASK}_{bias_type.replace('-', '_')}"


CROWS_TYPE_TASKS = tuple(crows_type_task(bias_type) for bias_type in CROWS_BIAS_TYPES)
DIRECTIONS = ("stereo", "antistereo")


@dataclass(frozen=True)
class CrowsPair:
    index: int
    sent_more: str
    sent_less: str
    direction: str
    bias_type: str


def checked_bias_type(path: Path, where: str, value: str) -> str:
    """One rule for a CrowS bias_type, whichever command reads the file."""
    bias_type = value.strip()
    if bias_type not in CROWS_BIAS_TYPES:
        raise DataError(path, f"{where}, field 'bias_type'", f"one of {', '.join(CROWS_BIAS_TYPES)}", repr(bias_type))
    return bias_type


def load_crows_pairs(path: str | Path | None = None) -> list[CrowsPair]:
    """Read the CrowS-Pairs CSV (explicit path, else $DEBIAS_DATA_DIR)."""
    path = data_file(path, CROWS_RELATIVE_PATH, "CrowS-Pairs")
    pairs = []
    for line, row in csv_rows(path, ["sent_more", "sent_less", "stereo_antistereo", "bias_type"]):
        where = f"line {line}"
        direction = require_field(path, where, row, "stereo_antistereo").strip()
        if direction not in DIRECTIONS:
            raise DataError(path, f"{where}, field 'stereo_antistereo'", "'stereo' or 'antistereo'", repr(direction))
        bias_type = checked_bias_type(path, where, require_field(path, where, row, "bias_type"))
        index_text = (row.get("") or "").strip()
        pairs.append(CrowsPair(
            index=int(index_text) if index_text.isdigit() else len(pairs),
            sent_more=require_field(path, where, row, "sent_more"),
            sent_less=require_field(path, where, row, "sent_less"),
            direction=direction,
            bias_type=bias_type,
        ))
    return pairs
