"""lm-eval glue for WikiText-2 perplexity from the local raw test file, scored by lm-eval's own `wikitext` task code."""

import datasets
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401 (YAML)

from debias_plugin.data import load_wikitext_documents


def load(wikitext_path=None, articles=None, **_model_args_and_metadata):
    """custom_dataset hook: the 62 test articles, or the first `articles` (--metadata '{"wikitext_path": ...}')."""
    pages = load_wikitext_documents(wikitext_path)[:articles]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": pages})})
