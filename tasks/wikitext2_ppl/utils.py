"""lm-eval glue for WikiText-2 perplexity from the local raw test file, scored as lm-eval's `wikitext` task."""

import re

import datasets

from debias_plugin.data import load_wikitext_documents


def load(wikitext_path=None, articles=None, **_model_args_and_metadata):
    """custom_dataset hook: the 62 test articles, or the first `articles` (--metadata '{"wikitext_path": ...}')."""
    pages = load_wikitext_documents(wikitext_path)[:articles]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": pages})})


def detokenize(doc):
    """Undo WikiText's tokenization (' @-@ ' and friends) before scoring, as lm-eval's wikitext task does."""
    text = doc["page"]
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for spaced, joined in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                           (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(spaced, joined)
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for spaced, joined in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
                           (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(spaced, joined)
    return text


def process_results(doc, results):
    """Words and bytes are counted on the original (tokenized) page, as lm-eval's wikitext task does."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    size = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
