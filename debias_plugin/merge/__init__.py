"""Bias-vector negation, theta = base - lambda * (biased - base), as mergekit task_arithmetic configs: `config`
(templates, signs), `checkpoints` (safetensors headers), `engine` (mergekit runs), `negate` (one staged output)."""

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
