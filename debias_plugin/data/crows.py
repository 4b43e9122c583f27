"""CrowS-Pairs (Nangia et al. 2020): pairs of minimally different sentences."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from debias_plugin.data._io import csv_rows, require_field
from debias_plugin.errors import DataError, DebiasError
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
CROWS_OVERALL_TASK = "crows_bias_overall"  # all pairs as one task, with type_mean_gap / worst_type_gap


def crows_half_task(half: str, bias_type: str | None = None, *, overall: bool = False) -> str:
    """A task on one half of crows_split (seed 0): crows_bias_heldout, crows_bias_heldout_race_color,
    crows_bias_overall_heldout."""
    if overall:
        return f"{CROWS_OVERALL_TASK}_{half}"
    return f"{CROWS_TASK}_{half}" + ("" if bias_type is None else f"_{bias_type.replace('-', '_')}")
DIRECTIONS = ("stereo", "antistereo")
CROWS_HALVES = ("selection", "heldout")  # crows_split's halves; their tasks are crows_bias_<half>_<type>


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


def crows_split(pairs: list[CrowsPair], seed: int = 0, fraction: float = 0.5) -> dict[str, list[CrowsPair]]:
    """A seeded split stratified by bias type, so a study chooses on one half and reports the untouched other.

    The rule: one numpy.random.default_rng(seed); for each bias type in CROWS_BIAS_TYPES order, that type's pairs
    in file order are shuffled by rng.permutation, the first round(fraction * n_type) (Python's round) go to
    "selection" and the rest to "heldout". Each half keeps file order. Seed 0's pair ids are in
    tasks/crows_bias/split_seed0.txt.
    """
    import numpy as np

    if not 0 < fraction < 1:
        raise DebiasError(f"crows_split: fraction must be between 0 and 1 (exclusive), got {fraction!r}.")
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for bias_type in CROWS_BIAS_TYPES:
        members = [i for i, pair in enumerate(pairs) if pair.bias_type == bias_type]
        order = rng.permutation(len(members))
        chosen.update(members[j] for j in order[:round(fraction * len(members))])
    return {"selection": [pair for i, pair in enumerate(pairs) if i in chosen],
            "heldout": [pair for i, pair in enumerate(pairs) if i not in chosen]}
