"""(advantaged, disadvantaged) sentence pairs for contrastive unlearning (PCGU): WinoGender, CSVs, StereoSet, BBQ."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import warnings
from pathlib import Path

from debias_plugin.data._io import csv_rows, require_field
from debias_plugin.data.bbq import load_bbq_pairs
from debias_plugin.data.bias_pair import BiasPair
from debias_plugin.data.crows import CROWS_RELATIVE_PATH, checked_bias_type, load_crows_pairs
from debias_plugin.data.stereoset import STEREOSET_RELATIVE_PATH, load_stereoset
from debias_plugin.errors import DataError, DebiasError
from debias_plugin.paths import DATA_DIR_ENV, data_file

WINOGENDER_SENTENCES = "winogender/all_sentences.tsv"
WINOGENDER_STATS = "winogender/occupations-stats.tsv"
WINOGENDER_GENDERS = ("male", "female", "neutral")


def _winogender_stats(path: Path) -> dict[str, float]:
    """Occupation -> BLS percentage of women (0-100)."""
    stats = {}
    for line, row in csv_rows(path, ["occupation", "bls_pct_female"], delimiter="\t"):
        occupation = require_field(path, f"line {line}", row, "occupation").strip()
        text = require_field(path, f"line {line}", row, "bls_pct_female").strip()
        try:
            value = float(text)
        except ValueError:
            raise DataError(path, f"line {line}, field 'bls_pct_female'", "a percentage", repr(text)) from None
        if not 0 <= value <= 100:
            raise DataError(path, f"line {line}, field 'bls_pct_female'", "a percentage in [0, 100]", text)
        stats[occupation] = value
    return stats


def load_winogender_pairs(sentences_path: str | Path | None = None,
                          stats_path: str | Path | None = None) -> list[BiasPair]:
    """One pair per WinoGender (occupation, participant, answer) triple: the male and female sentence.

    The disadvantaged gender of an occupation is the one under-represented in it according to the
    U.S. Bureau of Labor Statistics share of women (`bls_pct_female` < 50 -> female, otherwise male);
    the official PCGU code applies the same < 50 rule to the Bergsma column. The neutral ("they")
    sentence is not used.
    """
    sentences_path = data_file(sentences_path, WINOGENDER_SENTENCES, "WinoGender sentences")
    if stats_path is None and sentences_path.with_name("occupations-stats.tsv").is_file():
        stats_path = sentences_path.with_name("occupations-stats.tsv")
    stats_path = data_file(stats_path, WINOGENDER_STATS, "WinoGender occupation statistics")
    stats = _winogender_stats(stats_path)

    by_schema: dict[tuple[str, str, str], dict[str, tuple[int, str]]] = {}
    for line, row in csv_rows(sentences_path, ["sentid", "sentence"], delimiter="\t"):
        where = f"line {line}"
        sentid = require_field(sentences_path, where, row, "sentid").strip()
        sentence = require_field(sentences_path, where, row, "sentence").strip()
        parts = sentid.split(".")
        if len(parts) != 5 or parts[3] not in WINOGENDER_GENDERS or parts[4] != "txt":
            raise DataError(sentences_path, f"{where}, field 'sentid'",
                            "occupation.participant.answer.(male|female|neutral).txt", repr(sentid))
        occupation, participant, answer, gender = parts[:4]
        if occupation not in stats:
            raise DataError(sentences_path, f"{where}, field 'sentid'",
                            f"an occupation listed in {stats_path}", repr(occupation))
        by_schema.setdefault((occupation, participant, answer), {})[gender] = (line, sentence)

    pairs = []
    for (occupation, participant, answer), sentences in by_schema.items():
        missing = [gender for gender in ("male", "female") if gender not in sentences]
        if missing:
            line = next(iter(sentences.values()))[0]
            raise DataError(sentences_path, f"line {line}",
                            f"a male and a female sentence for {occupation}.{participant}.{answer}",
                            f"no {' or '.join(missing)} sentence")
        # the gender under-represented in the occupation (BLS share of women < 50% -> female) is disadvantaged
        advantaged, disadvantaged = ("male", "female") if stats[occupation] < 50 else ("female", "male")
        line, advantaged_sentence = sentences[advantaged]
        pairs.append(_checked_pair(sentences_path, line, advantaged_sentence, sentences[disadvantaged][1], occupation))
    return pairs


def _checked_pair(path: Path, line: int, advantaged: str, disadvantaged: str, group: str) -> BiasPair:
    if advantaged.strip() == disadvantaged.strip():
        raise DataError(path, f"line {line}", "two sentences that differ", "the same sentence twice")
    return BiasPair(advantaged.strip(), disadvantaged.strip(), group, f"{path}, line {line}")


def load_pair_csv(path: str | Path, bias_types: list[str] | None = None) -> list[BiasPair]:
    """Pairs from a CSV/TSV with columns advantaged,disadvantaged or CrowS-style sent_more,sent_less.

    In CrowS-Pairs `sent_more` is always the more stereotypical sentence (whatever `stereo_antistereo`
    says), i.e. the one a biased model prefers, so it is the advantaged side. An optional `bias_type`
    column is kept as the group and can be filtered with `bias_types`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(path, "path", "an existing CSV file of sentence pairs", "no such file")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    header = path.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
    columns = next(iter(csv.reader(header, delimiter=delimiter)), [])
    if "advantaged" in columns or "disadvantaged" in columns:
        advantaged_column, disadvantaged_column = "advantaged", "disadvantaged"
    else:
        advantaged_column, disadvantaged_column = "sent_more", "sent_less"
    pairs = []
    for line, row in csv_rows(path, [advantaged_column, disadvantaged_column], delimiter=delimiter):
        where = f"line {line}"
        group = (row.get("bias_type") or "").strip()
        if group and advantaged_column == "sent_more":  # a CrowS-style file: its bias types are CrowS's
            group = checked_bias_type(path, where, group)
        if bias_types and group not in bias_types:
            continue
        pairs.append(_checked_pair(path, line, require_field(path, where, row, advantaged_column),
                                   require_field(path, where, row, disadvantaged_column), group))
    if not pairs:
        raise DataError(path, "column 'bias_type'", f"at least one pair of bias type {bias_types}", "none")
    return pairs


def load_stereoset_pairs(path: str | Path | None = None, domains: list[str] | None = None,
                         kind: str = "intrasentence") -> list[BiasPair]:
    """(stereotype, anti-stereotype) pairs from StereoSet; intersentence candidates follow their context."""
    examples = load_stereoset(path, kind=kind)
    source = data_file(path, STEREOSET_RELATIVE_PATH, "StereoSet")
    pairs = []
    for example in examples:
        if domains and example.bias_type not in domains:
            continue
        prefix = f"{example.context} " if example.kind == "intersentence" else ""
        advantaged = f"{prefix}{example.stereotype}".strip()
        disadvantaged = f"{prefix}{example.anti_stereotype}".strip()
        if advantaged == disadvantaged:
            continue  # the dataset has a few identical candidates: nothing to contrast
        pairs.append(BiasPair(advantaged, disadvantaged, example.bias_type, f"{source}, example {example.id}"))
    if not pairs:
        raise DataError(source, "field 'bias_type'", f"at least one {kind} example of domain(s) {domains}", "none")
    return pairs


def load_pairs(source: str | Path, groups: list[str] | None = None) -> list[BiasPair]:
    """Resolve --pairs: 'winogender', 'crows', 'stereoset', 'bbq' (from $DEBIAS_DATA_DIR) or a file/folder."""
    name = str(source)
    path = Path(name).expanduser()
    if name == "winogender":
        pairs = load_winogender_pairs()
    elif name == "crows":
        return load_pair_csv(data_file(None, CROWS_RELATIVE_PATH, "CrowS-Pairs"), groups)
    elif name == "stereoset":
        return load_stereoset_pairs(domains=groups)
    elif name == "bbq":  # groups are BBQ categories (file stems, e.g. Religion)
        return load_bbq_pairs(categories=groups)
    elif path.is_dir() and (path / "all_sentences.tsv").is_file():
        pairs = load_winogender_pairs(path / "all_sentences.tsv", path / "occupations-stats.tsv")
    elif path.suffix.lower() in (".csv", ".tsv"):
        return load_pair_csv(path, groups)
    elif path.suffix.lower() in (".jsonl", ".json"):
        return load_stereoset_pairs(path, domains=groups)
    else:
        raise DebiasError(
            f"--pairs {name}: expected 'winogender', 'crows', 'stereoset', 'bbq', a WinoGender folder (with "
            "all_sentences.tsv), a pair CSV/TSV (advantaged,disadvantaged or sent_more,sent_less) or a "
            "StereoSet .json/.jsonl file."
        )
    if groups:
        pairs = [pair for pair in pairs if pair.group in groups]
        if not pairs:
            raise DebiasError(f"--pairs {name}: no pair belongs to the group(s) {groups}.")
    return pairs


def _normalized(sentence: str) -> str:
    return re.sub(r"\s+", " ", sentence).strip().lower()


def evaluation_sentences() -> dict[str, set[str]]:
    """Normalised sentences of the bias benchmarks we evaluate on (those found under $DEBIAS_DATA_DIR)."""
    found: dict[str, set[str]] = {}
    if not os.environ.get(DATA_DIR_ENV):
        return found
    with contextlib.suppress(DebiasError):
        found["CrowS-Pairs"] = {_normalized(s) for p in load_crows_pairs() for s in (p.sent_more, p.sent_less)}
    with contextlib.suppress(DebiasError):
        found["StereoSet"] = {
            _normalized(text) for e in load_stereoset() for s in (e.stereotype, e.anti_stereotype, e.unrelated)
            for text in (s, f"{e.context} {s}")
        }
    return found


def evaluation_overlap(pairs: list[BiasPair], benchmarks: dict[str, set[str]] | None = None) -> dict[str, int]:
    """Benchmark name -> number of training pairs with a sentence that also appears in that benchmark."""
    benchmarks = evaluation_sentences() if benchmarks is None else benchmarks
    return {
        name: count for name, sentences in benchmarks.items()
        if (count := sum(1 for p in pairs if {_normalized(p.advantaged), _normalized(p.disadvantaged)} & sentences))
    }


def warn_on_evaluation_overlap(pairs: list[BiasPair], benchmarks: dict[str, set[str]] | None = None) -> dict:
    """Warn (UserWarning) when training pairs reuse evaluation sentences: the scores would be contaminated."""
    overlap = evaluation_overlap(pairs, benchmarks)
    for name, count in overlap.items():
        warnings.warn(
            f"{count} of {len(pairs)} training pairs contain sentences from {name}; scores on {name} after "
            "this run measure memorised pairs, not bias. Train on other pairs or report it.",
            UserWarning, stacklevel=2,
        )
    return overlap
