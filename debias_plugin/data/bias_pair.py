"""The sentence pair contrastive unlearning (PCGU) trains on, whatever file or benchmark it came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BiasPair:
    """Two sentences that differ only at target tokens; the model should stop preferring `advantaged`."""

    advantaged: str
    disadvantaged: str
    group: str  # occupation, bias type or StereoSet domain: for filtering and reports
    origin: str  # "file, line N": where the pair came from, for error messages and overlap warnings
