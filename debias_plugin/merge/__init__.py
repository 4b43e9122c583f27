"""Bias-vector negation as mergekit configs: render a merge_configs/ template, validate it, run mergekit lazily.

theta_debiased = theta_base - lambda * (theta_biased - theta_base) is mergekit's ``task_arithmetic`` with one
model at weight -lambda and ``normalize: false`` (mergekit #213). Everything that can be checked is checked
before the first byte is written (`config`: lambda, keys, signs; `checkpoints`: architectures and shapes from
safetensors headers). `engine` then streams one tensor at a time through mergekit, read with plain reads and
merged by `task_arithmetic_blocked`, task_arithmetic in row blocks; `negate` ties them together.
"""

from debias_plugin.merge.checkpoints import TensorInfo, check_adapter, check_same_model, model_tensors
from debias_plugin.merge.config import (
    ADAPTER_PLACEHOLDER, BASE_PLACEHOLDER, BIASED_PLACEHOLDER, NEGATION_FORMULA, load_template, parse_config,
    parse_lambda, parse_size, render_negation, validate_negation_config,
)
from debias_plugin.merge.negate import CONFIG_NAME, MANIFEST_NAME, lambda_folder, negate

__all__ = ["ADAPTER_PLACEHOLDER", "BASE_PLACEHOLDER", "BIASED_PLACEHOLDER", "CONFIG_NAME", "MANIFEST_NAME",
           "NEGATION_FORMULA", "TensorInfo", "check_adapter", "check_same_model", "lambda_folder", "load_template",
           "model_tensors", "negate", "parse_config", "parse_lambda", "parse_size", "render_negation",
           "validate_negation_config"]
