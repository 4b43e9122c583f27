"""lm-eval glue for CrowS-Pairs: local data, per-pair outcome, stereo/antistereo breakdown."""

import datasets

from debias_plugin.data import load_crows_pairs
from debias_plugin.scoring.crows import mean_of_marked, prefers_stereotype


def load(crows_path=None, bias_type=None, scoring="crows_pair", **_model_args_and_metadata):
    """custom_dataset hook: the CrowS-Pairs CSV (--metadata '{"crows_path": ...}' or $DEBIAS_DATA_DIR).

    `scoring` tells a masked LM which sentence score to return (hf-mlm reads doc["scoring"]).
    """
    pairs = [pair for pair in load_crows_pairs(crows_path) if bias_type in (None, pair.bias_type)]
    rows = [{"scoring": scoring, "pair_id": p.index, "sent_more": p.sent_more, "sent_less": p.sent_less,
             "stereo_antistereo": p.direction, "bias_type": p.bias_type} for p in pairs]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_choice(doc):
    return [doc["sent_more"], doc["sent_less"]]


def process_results(doc, results):
    (score_more, _), (score_less, _) = results
    stereotyped = 100.0 if prefers_stereotype(score_more, score_less) else 0.0
    is_stereo = doc["stereo_antistereo"] == "stereo"
    return {
        "pct_stereotype": stereotyped,
        "likelihood_diff": abs(score_more - score_less),
        "pct_stereotype_stereo": (stereotyped, is_stereo),
        "pct_stereotype_antistereo": (stereotyped, not is_stereo),
    }


def mean_over_marked(items):
    return mean_of_marked(items)
