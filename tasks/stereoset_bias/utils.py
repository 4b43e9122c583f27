"""lm-eval glue for StereoSet: local data as docs, per-token means for causal LMs; the metrics come from
debias_plugin.scoring.stereoset."""

import functools

import datasets

from debias_plugin.data import STEREOSET_DOMAINS, load_stereoset
from debias_plugin.errors import DebiasError
from debias_plugin.scoring.gap import gap
from debias_plugin.scoring.stereoset import domain_scores

LABELS = ("stereotype", "anti-stereotype", "unrelated")


def _token_counter(pretrained, tokenizer, trust_remote_code):
    """Count the continuation tokens exactly as lm-eval's HFLM scores them; None for masked LMs."""
    from debias_plugin.models import causal_start_token, load_config, load_tokenizer, model_kind

    source = tokenizer or pretrained
    if not source:
        raise DebiasError("stereoset_bias needs the model argument pretrained (or tokenizer) to count each sentence's "
                          "tokens for the per-token mean log-probability.")
    if pretrained and model_kind(load_config(pretrained, trust_remote_code=trust_remote_code)) == "masked":
        return None
    tok = load_tokenizer(source, trust_remote_code=trust_remote_code)
    prefix_id = causal_start_token(tok)

    def count(context, continuation):
        if context == "":
            ids = tok.encode(continuation, add_special_tokens=False)
            return len(ids) - (1 if ids and ids[0] == prefix_id else 0)
        return len(tok.encode(context + continuation)) - len(tok.encode(context))

    return count


def _load(kind, stereoset_path=None, pretrained=None, tokenizer=None, trust_remote_code=False, **_):
    """custom_dataset hook (--metadata '{"stereoset_path": ...}' or $DEBIAS_DATA_DIR)."""
    counter = _token_counter(pretrained, tokenizer, trust_remote_code)
    rows = []
    for example in load_stereoset(stereoset_path, kind=kind):
        choices = [example.sentence(label) for label in LABELS]
        context = "" if kind == "intrasentence" else example.context
        delimiter = "" if kind == "intrasentence" else " "
        counts = [counter(context, delimiter + choice) if counter else 1 for choice in choices]
        rows.append({"scoring": f"stereoset_{kind}", "id": example.id, "target": example.target,
                     "bias_type": example.bias_type, "context": example.context, "choices": choices,
                     "token_counts": counts})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


load_intrasentence = functools.partial(_load, "intrasentence")
load_intersentence = functools.partial(_load, "intersentence")


def doc_to_choice(doc):
    return doc["choices"]


def process_results(doc, results):
    """Score = log-likelihood / scored tokens (a masked LM returns its own score, with count 1)."""
    scores = [loglikelihood / count for (loglikelihood, _), count in zip(results, doc["token_counts"])]
    row = (doc["target"], doc["bias_type"], *scores)
    return {name: row for name in METRICS}


def _aggregation(metric, domain=None):
    def aggregate(rows):
        scores = domain_scores(rows, domain)
        return gap(scores.ss) if metric == "ss_gap" else getattr(scores, metric)

    aggregate.__name__ = f"{metric}_{domain or 'overall'}"
    return aggregate


METRICS = {f"{metric}{'_' + domain if domain else ''}": _aggregation(metric, domain)
           for metric in ("ss", "ss_gap", "lms", "icat") for domain in (None, *STEREOSET_DOMAINS)}
globals().update({f"aggregate_{name}": function for name, function in METRICS.items()})
