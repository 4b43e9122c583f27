"""Model folders: causal vs. masked from the config (never the path), and safe weight loading."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

from debias_plugin.errors import DataError, DebiasError, one_line

ModelKind = Literal["causal", "masked"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HEAD_SUFFIXES = {"masked": ("ForMaskedLM", "ForPreTraining"), "causal": ("ForCausalLM", "LMHeadModel")}


def model_kind(config) -> ModelKind:
    """'causal' or 'masked', from the config's architectures, else from its model_type."""
    from transformers.models.auto import modeling_auto

    for architecture in getattr(config, "architectures", None) or []:
        if architecture.endswith("ForMaskedLM"):
            return "masked"
        if architecture.endswith(_HEAD_SUFFIXES["causal"]):
            return "causal"
    model_type = getattr(config, "model_type", None)
    if model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "masked"
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise DebiasError(
        f"Model type '{model_type}' (architectures {getattr(config, 'architectures', None)}) is neither a causal "
        "nor a masked language model that transformers knows; expected e.g. Llama, GPT-2, OPT, BERT, RoBERTa."
    )


def check_weights(model_dir: str | Path, allow_pickle: bool = False) -> None:
    """Refuse a folder without weights, and a pickle-only folder unless the user opted in."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DebiasError(f"{model_dir}: no config.json; expected a Hugging Face model folder.")
    files = [path.name for path in model_dir.iterdir()]
    if any(name.endswith(".safetensors") for name in files):
        _check_safetensors_headers(model_dir)
        return
    pickles = [name for name in files if name.endswith(_PICKLE_SUFFIXES)]
    if not pickles:
        raise DebiasError(f"{model_dir}: no weights found; expected *.safetensors files beside config.json.")
    if not allow_pickle:
        raise DebiasError(
            f"{model_dir}: weights only as pickle ({', '.join(sorted(pickles))}), which can run arbitrary code "
            "when loaded. Convert them to safetensors, or opt in with allow_pickle (--allow-pickle) if you "
            "trust this folder."
        )


def _check_safetensors_headers(model_dir: Path) -> None:
    """Name the one file that is truncated or corrupt (the header and the file's length are checked; no data read)."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(path, framework="numpy"):
                pass
        except (SafetensorError, OSError) as err:
            raise DataError(path, "header", "complete safetensors (re-download or re-save the model)",
                            f"a truncated or corrupt file ({one_line(err)})") from None


def load_model(model_dir: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False, dtype=None):
    """(model, tokenizer, kind) with the right Auto class for the config; safetensors unless opted out.

    A checkpoint without its language-model head, or without a usable tokenizer, is refused: from_pretrained
    would give it a random head, and an empty vocabulary scores everything as [UNK].
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    check_weights(model_dir, allow_pickle)
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    kind = model_kind(config)
    head_name = "masked-LM" if kind == "masked" else "causal-LM"
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(name.endswith(_HEAD_SUFFIXES[kind]) for name in architectures):
        raise DebiasError(f"{model_dir}: config.json declares {architectures}, a model without a {head_name} head, "
                          f"so there are no token predictions to score or train. Expected e.g. "
                          f"{'BertForMaskedLM' if kind == 'masked' else 'LlamaForCausalLM'}.")
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    try:
        model, info = auto.from_pretrained(
            model_dir, dtype=dtype or torch.float32, use_safetensors=not allow_pickle or None,
            trust_remote_code=trust_remote_code, output_loading_info=True,
        )
    except ValueError as err:  # transformers: unrecognized configuration class for the Auto class
        if "configuration class" not in str(err):
            raise DebiasError(f"{model_dir}: the weights cannot be loaded ({one_line(err)}).") from None
        raise DebiasError(f"{model_dir}: architecture {config.model_type!r} has no {head_name} class in "
                          f"transformers ({one_line(err)}).") from None
    except (OSError, RuntimeError) as err:  # truncated or corrupt safetensors, shape mismatches
        raise DebiasError(f"{model_dir}: the weights cannot be read ({one_line(err)}); expected complete "
                          "safetensors files matching config.json.") from None
    except SafetensorError as err:
        raise DebiasError(f"{model_dir}: a .safetensors file is truncated or corrupt ({one_line(err)}).") from None
    head = model.get_output_embeddings()
    head_names = {name for name, module in model.named_modules() if module is head and head is not None}
    missing = [key for key in info.get("missing_keys", []) if any(key.startswith(name) for name in head_names)]
    if missing:
        raise DebiasError(f"{model_dir}: the weights have no {head_name} head ({', '.join(sorted(missing))} "
                          "missing); it would be randomly initialised. Expected a checkpoint saved with its head.")
    return model, tokenizer, kind


def load_config(model_dir: str | Path, *, trust_remote_code: bool = False):
    """transformers' config of a model folder; an unreadable or remote-code config is one clear error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        text = one_line(err)
        if "trust_remote_code" in text:
            raise DebiasError(f"{model_dir}/config.json needs code shipped in the folder (auto_map) to load; "
                              "pass --trust-remote-code only if you trust it.") from None
        raise DebiasError(f"{model_dir}/config.json cannot be read as a transformers config ({text}).") from None


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False):
    """The folder's own tokenizer, refused when missing or degenerate (a probe sentence all unknown tokens)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DebiasError(f"{model_dir}: no usable tokenizer ({one_line(err)}); expected tokenizer.json or "
                          "the tokenizer's vocabulary files beside config.json.") from None
    probe = tokenizer("The doctor said she would call them tomorrow.", add_special_tokens=False)["input_ids"]
    unknown = tokenizer.unk_token_id
    if len(tokenizer) < 10 or not probe or (unknown is not None and all(token == unknown for token in probe)):
        raise DebiasError(f"{model_dir}: the tokenizer is degenerate ({len(tokenizer)} tokens; an English sentence "
                          "encodes to nothing but unknown tokens). Save the model's real tokenizer beside it.")
    return tokenizer


def causal_start_token(tokenizer) -> int | None:
    """The token a causal sequence starts from, so its first real token is predicted: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_id(tokenizer) -> int:
    """The one padding rule: the tokenizer's pad token, else EOS, else 0 (padded positions are masked anyway)."""
    candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    return next((token_id for token_id in candidates if token_id is not None), 0)


def logits_at(model, input_ids, attention_mask, flat_positions):
    """Logits [n, V] at flattened (row * width + position) indices; the vocabulary projection runs only there.

    A pre-hook on the output layer (get_output_embeddings) hands it just those hidden states, so the projection
    costs n x V instead of B x T x V; a head whose input is not [B, T, H] gets the full states and is indexed after.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def keep_queried_rows(_module, args):
        hidden = args[0]
        if hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(input_ids.shape):
            return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_positions), *args[1:])
        return None

    with head.register_forward_pre_hook(keep_queried_rows) if head is not None else contextlib.nullcontext():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits.reshape(-1, logits.shape[-1]).index_select(0, flat_positions) if logits.dim() == 3 else logits
