"""Loaders read the real files, and every malformed input names the file, the line or field, and the expectation."""

from __future__ import annotations

import json

import pytest

from debias_plugin.data import (
    DataError, load_attribute_words, load_crows_pairs, load_stereoset, load_texts, load_wikitext_documents,
)
from debias_plugin.errors import DebiasError

CROWS_HEADER = ",sent_more,sent_less,stereo_antistereo,bias_type,annotations,anon_writer,anon_annotators\n"


def test_real_crows_pairs(data_dir):
    pairs = load_crows_pairs()
    assert len(pairs) == 1508
    assert sum(p.direction == "stereo" for p in pairs) == 1290
    assert sum(p.bias_type == "gender" for p in pairs) == 262
    assert any("\n" in p.sent_less for p in pairs)  # the one embedded newline survives CSV parsing


def test_real_stereoset_jsonl_has_stable_unique_ids(data_dir):
    examples = load_stereoset()
    assert len(examples) == 4229
    assert sum(e.kind == "intrasentence" for e in examples) == 2106
    assert len({e.id for e in examples}) == 4229
    assert [e.id for e in load_stereoset()] == [e.id for e in examples]
    assert len(load_stereoset(kind="intersentence")) == 2123


def test_real_wikitext_splits_into_articles(data_dir):
    documents = load_wikitext_documents()
    assert len(documents) == 62  # EleutherAI/wikitext_document_level, wikitext-2-raw-v1 test
    assert documents[0].startswith(" = Robert Boulter = ")
    assert all(doc.lstrip("\n").startswith(" = ") for doc in documents)


def test_attribute_words(data_dir):
    words = load_attribute_words()
    assert ["actor", "actress"] in words["gender"] and len(words["race"]) == 6


def test_texts_from_csv_column(data_dir):
    assert len(load_texts(data_dir / "dghs" / "dghs_women.csv", column="text")) == 446


def test_stereoset_dev_json_layout(tmp_path):
    document = {"version": "1.0", "data": {"intrasentence": [{
        "id": "abc", "target": "chess player", "bias_type": "profession", "context": "The chess player was BLANK.",
        "sentences": [
            {"sentence": "The chess player was hispanic.", "id": "s2", "labels": [], "gold_label": "anti-stereotype"},
            {"sentence": "The chess player was fox.", "id": "s3", "labels": [], "gold_label": "unrelated"},
            {"sentence": "The chess player was asian.", "id": "s1", "labels": [], "gold_label": "stereotype"},
        ]}], "intersentence": []}}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(document))
    (example,) = load_stereoset(path)
    assert (example.id, example.stereotype, example.anti_stereotype, example.unrelated) == (
        "abc", "The chess player was asian.", "The chess player was hispanic.", "The chess player was fox.")


def _crows_file(tmp_path, body, header=CROWS_HEADER):
    path = tmp_path / "pairs.csv"
    path.write_text(header + body)
    return path


@pytest.mark.parametrize("make, where, expected", [
    (lambda t: _crows_file(t, "", header=""), "line 1", "non-empty"),
    (lambda t: _crows_file(t, "0,a,b,stereo,gender\n", header=",sent_more,sent_less,bias_type\n"),
     "line 1 (header)", "stereo_antistereo"),
    (lambda t: _crows_file(t, "0,a b,c d,stereo,gender\n1,e f,g h,stereo,astrology\n"), "line 3, field 'bias_type'",
     "one of race-color"),
    (lambda t: _crows_file(t, "0,a b,c d,sideways,gender\n"), "line 2, field 'stereo_antistereo'", "'stereo'"),
    (lambda t: _crows_file(t, '0,a b,"",stereo,gender\n'), "line 2, field 'sent_less'", "non-empty"),
])
def test_crows_malformed(tmp_path, make, where, expected):
    path = make(tmp_path)
    with pytest.raises(DataError) as error:
        load_crows_pairs(path)
    message = str(error.value)
    assert str(path) in message and where in message and expected in message


def _stereoset_line(**overrides):
    row = {"type": "intrasentence", "target": "chess player", "bias_type": "profession",
           "context": "The chess player was BLANK.", "stereotype": "The chess player was asian.",
           "anti-stereotype": "The chess player was hispanic.", "unrelated": "The chess player was fox."}
    row.update(overrides)
    return json.dumps(row) + "\n"


@pytest.mark.parametrize("lines, where, expected", [
    ([_stereoset_line(), "{not json\n"], "line 2", "one JSON object per line"),
    ([_stereoset_line(), _stereoset_line(context="The chess player was good.")], "line 2, field 'context'", "BLANK"),
    ([_stereoset_line(bias_type="astrology")], "line 1, field 'bias_type'", "one of gender"),
    ([_stereoset_line(unrelated="")], "line 1, field 'unrelated'", "non-empty"),
    ([_stereoset_line(type="paragraph")], "line 1, field 'type'", "'intrasentence'"),
])
def test_stereoset_malformed(tmp_path, lines, where, expected):
    path = tmp_path / "stereoset.jsonl"
    path.write_text("".join(lines))
    with pytest.raises(DataError) as error:
        load_stereoset(path)
    message = str(error.value)
    assert str(path) in message and where in message and expected in message


def test_stereoset_dev_json_missing_label(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"data": {"intrasentence": [{
        "id": "x", "target": "t", "bias_type": "race", "context": "A BLANK.",
        "sentences": [{"sentence": "A b.", "gold_label": "stereotype"}]}]}}))
    with pytest.raises(DataError, match=r"data\.intrasentence\[0\]\.sentences.*one sentence per label"):
        load_stereoset(path)


def test_texts_malformed(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=rf"{empty}, line 1: expected a non-empty file"):
        load_texts(empty)
    no_column = tmp_path / "corpus.csv"
    no_column.write_text("body\nhello\n")
    with pytest.raises(DataError, match=r"corpus\.csv, line 1 \(header\): expected column\(s\) 'text'"):
        load_texts(no_column)
    bad_jsonl = tmp_path / "corpus.jsonl"
    bad_jsonl.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"corpus\.jsonl, line 2, field 'text': expected a string"):
        load_texts(bad_jsonl)


def test_resolution_order(tmp_path, monkeypatch, data_dir):
    explicit = _crows_file(tmp_path, "0,a b,c d,stereo,gender\n")
    assert len(load_crows_pairs(explicit)) == 1  # explicit path beats $DEBIAS_DATA_DIR
    monkeypatch.setenv("DEBIAS_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DebiasError, match="data folder .*nowhere .*has no file crows_pairs"):
        load_crows_pairs()
    monkeypatch.delenv("DEBIAS_DATA_DIR")
    from debias_plugin import paths

    if paths.CHECKOUT_DATA_DIR.is_dir():  # a checkout finds ../shared/data by itself (the one documented default)
        assert len(load_crows_pairs()) == 1508
    monkeypatch.setattr(paths, "CHECKOUT_DATA_DIR", tmp_path / "no_checkout_data")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # then the download cache, fetched on first use unless offline
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path / "empty_cache"))
    with pytest.raises(DebiasError, match="downloads are off .*run `debias data fetch crows_pairs`"):
        load_crows_pairs()


def test_wikitext_quick_variant_takes_the_first_articles(data_dir):
    import importlib.util

    from debias_plugin.paths import tasks_dir

    spec = importlib.util.spec_from_file_location("wikitext_utils", tasks_dir() / "wikitext2_ppl" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    quick = utils.load(articles=6)["test"]["page"]
    assert quick == load_wikitext_documents()[:6]
    assert len(utils.load()["test"]) == 62


def test_texts_filtered_by_column_values(data_dir, tmp_path):
    dghs = data_dir / "dghs" / "dghs_women.csv"
    assert len(load_texts(dghs, "text", {"split": "dev"})) == 215
    assert len(load_texts(dghs, "text", {"split": "test"})) == 231
    with pytest.raises(DataError, match=r"dghs_women\.csv, column 'text': expected at least one non-empty text "
                                        r"with split=train"):
        load_texts(dghs, "text", {"split": "train"})
    with pytest.raises(DataError, match=r"line 1 \(header\): expected column\(s\) 'text', 'round'"):
        load_texts(dghs, "text", {"round": "1"})
    plain = tmp_path / "corpus.txt"
    plain.write_text("one\ntwo\n")
    with pytest.raises(DataError, match=r"corpus\.txt, file type: expected a \.csv, \.tsv or \.jsonl file"):
        load_texts(plain, where={"split": "dev"})


def test_an_absurdly_long_field_names_the_file_and_line(tmp_path):
    path = _crows_file(tmp_path, f"0,{'word ' * 40_000},b c,stereo,gender\n")
    with pytest.raises(DataError, match=r"pairs\.csv, line 2: expected a well-formed CSV row .*field larger than"):
        load_crows_pairs(path)
