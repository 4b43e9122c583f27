"""Pair loaders for PCGU: real WinoGender/CrowS/StereoSet files, the disadvantaged-gender rule, bad input, overlap."""

from __future__ import annotations

import csv
import warnings

import pytest

from debias_plugin.data.pairs import (
    evaluation_overlap, load_pair_csv, load_pairs, load_stereoset_pairs, load_winogender_pairs,
    warn_on_evaluation_overlap,
)
from debias_plugin.errors import DataError, DebiasError


def _bls_share(data_dir) -> dict[str, float]:
    """Read the statistics file independently of the loader."""
    with open(data_dir / "winogender" / "occupations-stats.tsv", encoding="utf-8") as handle:
        return {row["occupation"]: float(row["bls_pct_female"]) for row in csv.DictReader(handle, delimiter="\t")}


def test_winogender_pairs_follow_the_bls_rule(data_dir):
    pairs = load_winogender_pairs()
    assert len(pairs) == 240  # 60 occupations x 2 participants x 2 answers
    shares = _bls_share(data_dir)
    for pair in pairs:
        female_disadvantaged = shares[pair.group] < 50
        advantaged_words = set(pair.advantaged.lower().rstrip(".").split())
        disadvantaged_words = set(pair.disadvantaged.lower().rstrip(".").split())
        male, female = {"he", "him", "his"}, {"she", "her"}
        if female_disadvantaged:
            assert advantaged_words & male and disadvantaged_words & female, pair
        else:
            assert advantaged_words & female and disadvantaged_words & male, pair
    engineer = next(p for p in pairs if p.group == "engineer")  # 10.72% women -> women disadvantaged
    assert " she " in f" {engineer.disadvantaged} " or " her " in f" {engineer.disadvantaged} "
    assert "all_sentences.tsv, line" in engineer.origin


def _write_winogender(tmp_path, sentences: list[str], stats: list[str]):
    folder = tmp_path / "wg"
    folder.mkdir()
    (folder / "all_sentences.tsv").write_text("sentid\tsentence\n" + "\n".join(sentences) + "\n")
    (folder / "occupations-stats.tsv").write_text(
        "occupation\tbergsma_pct_female\tbls_pct_female\tbls_year\n" + "\n".join(stats) + "\n")
    return folder


GOOD_SENTENCES = ["nurse.patient.1.male.txt\tThe nurse said he would help.",
                  "nurse.patient.1.female.txt\tThe nurse said she would help."]


def test_winogender_small_folder_and_male_disadvantaged(tmp_path):
    folder = _write_winogender(tmp_path, GOOD_SENTENCES, ["nurse\t90\t90.0\t2015"])
    (pair,) = load_pairs(folder)
    assert pair.advantaged == "The nurse said she would help."
    assert pair.disadvantaged == "The nurse said he would help."


@pytest.mark.parametrize("sentences, stats, where, expected", [
    (["nurse.patient.1.man.txt\tThe nurse said he would help."] + GOOD_SENTENCES[1:], ["nurse\t1\t90\t2015"],
     "all_sentences.tsv, line 2, field 'sentid'", "occupation.participant.answer"),
    (GOOD_SENTENCES[:1], ["nurse\t1\t90\t2015"], "all_sentences.tsv, line 2", "a male and a female sentence"),
    (GOOD_SENTENCES, ["nurse\t1\tninety\t2015"], "occupations-stats.tsv, line 2, field 'bls_pct_female'",
     "a percentage"),
    (GOOD_SENTENCES, ["nurse\t1\t190\t2015"], "occupations-stats.tsv, line 2", "[0, 100]"),
    (GOOD_SENTENCES, ["doctor\t1\t40\t2015"], "all_sentences.tsv, line 2", "an occupation listed"),
    (["nurse.patient.1.male.txt\tSame.", "nurse.patient.1.female.txt\tSame."], ["nurse\t1\t90\t2015"],
     "all_sentences.tsv, line 3", "two sentences that differ"),
])
def test_winogender_bad_input_names_file_and_line(tmp_path, sentences, stats, where, expected):
    folder = _write_winogender(tmp_path, sentences, stats)
    with pytest.raises(DataError) as caught:
        load_winogender_pairs(folder / "all_sentences.tsv", folder / "occupations-stats.tsv")
    assert where in str(caught.value) and expected in str(caught.value)


def test_crows_csv_sent_more_is_advantaged_and_groups_filter(data_dir):
    pairs = load_pairs("crows", ["religion"])
    assert len(pairs) == 105
    with open(data_dir / "crows_pairs" / "crows_pairs_anonymized.csv", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["bias_type"] == "religion"]
    assert [(p.advantaged, p.disadvantaged) for p in pairs] == [(r["sent_more"].strip(), r["sent_less"].strip())
                                                                for r in rows]


def test_pair_csv_with_own_columns_and_bad_rows(tmp_path):
    good = tmp_path / "pairs.csv"
    good.write_text("advantaged,disadvantaged\nHe is a doctor.,She is a doctor.\n")
    assert load_pair_csv(good)[0].disadvantaged == "She is a doctor."
    missing = tmp_path / "missing.csv"
    missing.write_text("first,second\na,b\n")
    with pytest.raises(DataError, match=r"missing.csv, line 1 \(header\): expected column\(s\) 'sent_more'"):
        load_pair_csv(missing)
    empty_cell = tmp_path / "empty.csv"
    empty_cell.write_text("advantaged,disadvantaged\nHe is a doctor.,She is a doctor.\nHe runs.,\n")
    with pytest.raises(DataError, match=r"empty.csv, line 3, field 'disadvantaged'"):
        load_pair_csv(empty_cell)
    same = tmp_path / "same.csv"
    same.write_text("advantaged,disadvantaged\nHe runs.,He runs.\n")
    with pytest.raises(DataError, match=r"same.csv, line 2: expected two sentences that differ"):
        load_pair_csv(same)


def test_stereoset_pairs(data_dir):
    intra = load_stereoset_pairs(domains=["gender"])
    assert intra and all(p.group == "gender" for p in intra)
    inter = load_stereoset_pairs(kind="intersentence", domains=["religion"])
    first = inter[0]
    assert first.advantaged.split(" ")[:3] == first.disadvantaged.split(" ")[:3]  # the shared context


def test_unknown_pairs_source_is_a_clear_error(tmp_path):
    with pytest.raises(DebiasError, match="--pairs"):
        load_pairs(tmp_path / "pairs.xlsx")


def test_overlap_warning_for_evaluation_sentences(data_dir):
    crows = load_pairs("crows", ["gender"])
    with pytest.warns(UserWarning, match="262 of 262 training pairs contain sentences from CrowS-Pairs"):
        warn_on_evaluation_overlap(crows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_on_evaluation_overlap(load_winogender_pairs()) == {}
    assert evaluation_overlap(load_stereoset_pairs(domains=["race"])[:5]) == {"StereoSet": 5}


def test_crows_style_pair_file_is_refused_by_every_loader_alike(tmp_path):
    """A bias type CrowS does not have is one error, whether eval (load_crows_pairs) or pcgu (load_pair_csv) reads it."""
    from debias_plugin.data import load_crows_pairs
    from debias_plugin.data.pairs import load_pair_csv

    path = tmp_path / "pairs.csv"
    path.write_text(",sent_more,sent_less,stereo_antistereo,bias_type\n0,He can lead.,She can lead.,stereo,gendr\n")
    messages = []
    for load in (load_crows_pairs, load_pair_csv):
        with pytest.raises(DataError) as caught:
            load(path)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "line 2, field 'bias_type'" in messages[0] and "'gendr'" in messages[0]
