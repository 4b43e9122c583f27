"""custom_dataset for lm-eval's bbq task: local BBQ files, checked, in the columns lm-eval's bbq/utils.py reads."""

import datasets

from debias_plugin.data.bbq import load_bbq
from debias_plugin.errors import DataError


def load(bbq_path=None, bbq_categories=None, **_model_args_and_metadata):
    """The BBQ rows as one test split; every unknown-answer text must be one lm-eval's doc_to_choice knows."""
    from lm_eval.tasks.bbq.utils import UNKNOWN_RESPONSES

    if isinstance(bbq_categories, str):
        bbq_categories = [name.strip() for name in bbq_categories.split(",") if name.strip()]
    rows = load_bbq(bbq_path, bbq_categories or None)
    for row in rows:
        fields = row.fields
        unknown = next(key for key in ("ans0", "ans1", "ans2") if fields["answer_info"][key][1].lower() == "unknown")
        if fields[unknown] not in UNKNOWN_RESPONSES:
            raise DataError(row.path, f"line {row.line}, field '{unknown}'",
                            f"an unknown-answer text lm-eval's bbq task lists ({', '.join(UNKNOWN_RESPONSES)})",
                            repr(fields[unknown]))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([row.fields for row in rows])})
