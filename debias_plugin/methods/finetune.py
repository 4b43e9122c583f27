"""Bias fine-tuning: make a model MORE biased on a corpus, the source of a bias/task vector to negate later.

Causal models train next-token prediction, masked models BERT-style MLM (15%, 80/10/10), picked from the
config. Full fine-tuning writes a model folder; LoRA (peft) writes an adapter folder (Dige et al. use r=8),
or a merged full model with ``merge_lora``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, FiniteFloat

from debias_plugin.errors import DebiasError
from debias_plugin.methods import encode, label_logprobs, lm_batch, per_example_mean, perplexity, special_positions
from debias_plugin.methods.base import TrainingMethod
from debias_plugin.methods.lora import SHARDING_REFUSAL, LoraOptions, output_format, save_lora_or_full, wrap_lora
from debias_plugin.options import InputPath

EVAL_TEXTS = 64


class FinetuneOptions(LoraOptions):
    """What to train on and how (the shared loop options live in TrainConfig; LoRA options in methods.lora)."""

    corpus: InputPath = Field(description="Biased corpus: .txt, .csv/.tsv or .jsonl.")
    column: str | None = Field(None, description="Text column of a CSV/JSONL corpus (default 'text').")
    where: dict[str, str] = Field({}, description="Keep rows with COLUMN=VALUE (repeatable), e.g. split=dev.")
    mlm_probability: FiniteFloat = Field(0.15, gt=0, le=1, description="Masked models only.")


class Finetune(TrainingMethod):
    """Fine-tune a model on a (biased) corpus: the source of a bias vector to negate.

    Causal models learn next-token prediction, masked models MLM. Defaults to the shared loop's
    defaults (batch 8, 50 steps, lr 1e-5); bias fine-tuning usually wants more steps and a higher lr.
    """

    name = "finetune"
    Options = FinetuneOptions

    def __init__(self, options: FinetuneOptions):
        super().__init__(options)
        self.seed = 0
        self.texts: list[str] = []

    def inputs(self) -> dict:
        return {"corpus": self.opts.corpus}

    def read_inputs(self) -> None:
        from debias_plugin.data import load_texts

        self.texts = load_texts(self.opts.corpus, self.opts.column, self.opts.where)

    def report(self) -> dict:
        return {"texts": len(self.texts), "output_format": output_format(self.opts)}

    def sharding_refusal(self) -> str | None:
        return SHARDING_REFUSAL if self.opts.trains_lora else None

    def setup(self, run) -> list:
        self.run_kind, self.tokenizer, self.seed = run.kind, run.tokenizer, run.config.seed
        if run.kind == "masked" and run.tokenizer.mask_token_id is None:
            raise DebiasError(f"{run.config.model}: the tokenizer has no mask token, needed for MLM fine-tuning.")
        if self.opts.trains_lora:
            run.model = wrap_lora(run, self.opts)
        encoded = (encode(run.tokenizer, text, run.kind, run.config.max_length)[0] for text in self.texts)
        return [ids for ids in encoded if not all(special_positions(run.tokenizer, ids))]  # an ordinary token to learn

    def collate(self, examples: list[list[int]], positions: list[int]) -> dict:
        return lm_batch(examples, positions, self.run_kind, self.tokenizer, self.seed, self.opts.mlm_probability)

    def loss(self, model, batch: dict):
        """Mean over examples of each example's mean token NLL (causal: all tokens; masked: the masked ones)."""
        return -per_example_mean(label_logprobs(model, self.run_kind, batch), batch["targets"]).mean()

    def evaluate(self, run) -> dict:
        texts = self.texts[:EVAL_TEXTS]
        return {"corpus_perplexity": perplexity(run.eval_model, run.tokenizer, run.kind, texts, run.config.max_length,
                                                run.device, progress="corpus perplexity" if run.is_main else None)}

    def save(self, run, folder: Path) -> None:
        save_lora_or_full(run, folder, self.opts)
