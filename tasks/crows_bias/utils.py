"""lm-eval glue for CrowS-Pairs: the local pairs as docs; the metrics come from debias_plugin.scoring.crows."""

import datasets

from debias_plugin.data import load_crows_pairs
from debias_plugin.data.crows import crows_split
from debias_plugin.scoring.crows import (  # noqa: F401 (YAML hooks)
    mean_of_marked, pair_metrics, stereotype_gap, type_mean_gap_of_pairs, worst_type_gap_of_pairs,
)


def load(crows_path=None, bias_type=None, scoring="crows_pair", split=None, split_seed=0,
         **_model_args_and_metadata):
    """custom_dataset hook: the CrowS-Pairs CSV (--metadata '{"crows_path": ...}' or $DEBIAS_DATA_DIR).

    `scoring` tells a masked LM which sentence score to return (hf-mlm reads doc["scoring"]); `split`
    ("selection" / "heldout") keeps one half of data.crows.crows_split(pairs, split_seed).
    """
    pairs = load_crows_pairs(crows_path)
    if split is not None:
        pairs = crows_split(pairs, seed=split_seed)[split]
    pairs = [pair for pair in pairs if bias_type in (None, pair.bias_type)]
    rows = [{"scoring": scoring, "pair_id": p.index, "sent_more": p.sent_more, "sent_less": p.sent_less,
             "stereo_antistereo": p.direction, "bias_type": p.bias_type} for p in pairs]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_choice(doc):
    return [doc["sent_more"], doc["sent_less"]]


def process_results(doc, results):
    (score_more, _), (score_less, _) = results
    return pair_metrics(score_more, score_less, doc["stereo_antistereo"])



def process_results_overall(doc, results):
    """The per-pair metrics plus [bias_type, outcome] items: the per-type gaps are aggregated over all pairs."""
    metrics = process_results(doc, results)
    item = [doc["bias_type"], metrics["pct_stereotype"]]
    return {**metrics, "type_mean_gap": item, "worst_type_gap": list(item)}
