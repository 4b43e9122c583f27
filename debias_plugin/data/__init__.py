"""Loaders for the benchmark files; each raises DataError naming the file and line on bad input."""

from debias_plugin.data.bbq import BBQRow, load_bbq, load_bbq_pairs
from debias_plugin.data.crows import CROWS_BIAS_TYPES, CrowsPair, load_crows_pairs
from debias_plugin.data.seat import DEFAULT_SEAT_TESTS, SeatTest, load_seat_test, load_seat_tests
from debias_plugin.data.stereoset import STEREOSET_DOMAINS, StereoSetExample, load_stereoset
from debias_plugin.data.texts import load_texts, load_wikitext_documents, split_wikitext_documents
from debias_plugin.data.words import domain_words, load_attribute_words
from debias_plugin.errors import DataError

__all__ = [
    "BBQRow", "CROWS_BIAS_TYPES", "CrowsPair", "DEFAULT_SEAT_TESTS", "DataError", "STEREOSET_DOMAINS", "SeatTest",
    "StereoSetExample", "domain_words", "load_attribute_words", "load_bbq", "load_bbq_pairs", "load_crows_pairs",
    "load_seat_test", "load_seat_tests", "load_stereoset", "load_texts", "load_wikitext_documents",
    "split_wikitext_documents",
]
