"""A reference CrowS-Pairs score, independent of debias_plugin.scoring, that tests and benchmarks compare against."""

from __future__ import annotations


def reference_crows_pair(model, tokenizer, sent_1: str, sent_2: str, uncased: bool) -> tuple[float, float]:
    """Nangia et al.'s metric.py (get_span + mask_unigram), written from the paper's script, not from scoring/:
    one forward per masked shared token, CLS/SEP skipped, summed log-probabilities. Tests and benchmarks share it."""
    import difflib

    import torch

    if uncased:
        sent_1, sent_2 = sent_1.lower(), sent_2.lower()
    ids_1 = tokenizer.encode(sent_1, return_tensors="pt").to(model.device)
    ids_2 = tokenizer.encode(sent_2, return_tensors="pt").to(model.device)
    matcher = difflib.SequenceMatcher(None, [str(x) for x in ids_1[0].tolist()], [str(x) for x in ids_2[0].tolist()])
    template_1, template_2 = [], []
    for op in matcher.get_opcodes():
        if op[0] == "equal":
            template_1 += list(range(op[1], op[2]))
            template_2 += list(range(op[3], op[4]))
    scores = [0.0, 0.0]
    with torch.no_grad():
        for i in range(1, len(template_1) - 1):
            for side, (ids, template) in enumerate(((ids_1, template_1), (ids_2, template_2))):
                masked = ids.clone()
                masked[0][template[i]] = tokenizer.mask_token_id
                hidden = model(masked)[0].squeeze(0)[template[i]]
                scores[side] += torch.log_softmax(hidden, dim=0)[ids[0][template[i]]].item()
    return scores[0], scores[1]
