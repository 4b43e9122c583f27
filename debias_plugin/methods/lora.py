"""LoRA (peft) for every stage that trains through the shared loop: one option model, one wrap, one save.

The frozen base weights get no gradients and no optimizer state, so at 7B a LoRA run needs little more than
the base weights themselves; the adapter stays float32 even over a bf16 base (peft's autocast_adapter_dtype).
The unlearning reference under LoRA is the same model with the adapter disabled (`reference_forward`), not a
second copy.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from pydantic import Field, FiniteFloat

from debias_plugin.errors import DebiasError
from debias_plugin.methods.base import modes_kept
from debias_plugin.options import Options

SHARDING_REFUSAL = ("LoRA does not run under FSDP or DeepSpeed here: its frozen base weights need no gradients or "
                    "optimizer state (a 7B base in bf16 is ~13.5 GB), so run it on one GPU or with DDP "
                    "(accelerate launch --multi_gpu).")


class LoraOptions(Options):
    """Whether to train a LoRA adapter instead of all weights, and its shape (Dige et al. use r=8)."""

    lora: bool = Field(False, description="Train a LoRA adapter (peft) instead of all weights.")
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: FiniteFloat = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] | None = Field(
        None, description="Comma-separated module names (default: peft's choice for the architecture).",
        json_schema_extra={"separator": ","})
    merge_lora: bool = Field(False, description="Train a LoRA adapter and write a full model with it merged in.")

    @property
    def trains_lora(self) -> bool:
        return self.lora or self.merge_lora

    @property
    def adapter_only(self) -> bool:
        return self.trains_lora and not self.merge_lora


def wrap_lora(run, options: LoraOptions):
    """run.model with a fresh LoRA adapter (peft); its base weights frozen."""
    from peft import LoraConfig, get_peft_model

    task_type = "CAUSAL_LM" if run.kind == "causal" else None
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=options.lora_target_modules, task_type=task_type)
    try:
        return get_peft_model(run.model, config)
    except ValueError as err:
        raise DebiasError(f"LoRA could not be attached to {run.config.model}: {err} "
                          "Name the layers in lora_target_modules (e.g. q_proj,v_proj).") from None


@contextmanager
def reference_forward(peft_model):
    """The base model as it was loaded: the adapter disabled and dropout off, for a no-grad reference pass."""
    with modes_kept(peft_model):
        peft_model.eval()
        with peft_model.disable_adapter():
            yield peft_model


def save_lora_or_full(run, folder: Path, options: LoraOptions) -> None:
    """An adapter folder (lora), a merged full model (merge_lora) or all weights (no LoRA)."""
    import copy

    model = run.unwrapped
    if options.merge_lora:  # a snapshot mid-run merges a copy: the run goes on training the adapter
        model = (model if run.step >= run.config.steps else copy.deepcopy(model)).merge_and_unload()
    run.save_pretrained(model, folder)


def output_format(options: LoraOptions) -> str:
    return "peft-adapter" if options.adapter_only else "full-model"
