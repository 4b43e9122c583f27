"""`debias finetune`: bias fine-tuning (full or LoRA), thin over debias_plugin.methods.finetune."""

from __future__ import annotations

import click

from debias_plugin.training import click_training_options


@click.command("finetune")
@click_training_options
@click.option("--corpus", required=True, type=click.Path(), help="Biased corpus: .txt, .csv/.tsv or .jsonl.")
@click.option("--column", default=None, help="Text column of a CSV/JSONL corpus (default 'text').")
@click.option("--where", multiple=True, help="Keep rows with COLUMN=VALUE (repeatable), e.g. split=dev.")
@click.option("--lora", is_flag=True, help="Train a LoRA adapter (peft) instead of all weights.")
@click.option("--lora-r", default=8, show_default=True)
@click.option("--lora-alpha", default=16, show_default=True)
@click.option("--lora-dropout", default=0.05, show_default=True, type=float)
@click.option("--lora-target-modules", default=None,
              help="Comma-separated module names (default: peft's choice for the architecture).")
@click.option("--merge-lora", is_flag=True, help="Write a full model with the adapter merged in.")
@click.option("--mlm-probability", default=0.15, show_default=True, type=float, help="Masked models only.")
def finetune_command(corpus, column, where, lora, lora_r, lora_alpha, lora_dropout, lora_target_modules,
                     merge_lora, mlm_probability, **shared):
    """Fine-tune a model on a (biased) corpus: the source of a bias vector to negate.

    Causal models learn next-token prediction, masked models MLM. Defaults to the shared loop's
    defaults (batch 8, 50 steps, lr 1e-5); bias fine-tuning usually wants more steps and a higher lr.
    """
    from debias_plugin.methods import parse_where
    from debias_plugin.methods.finetune import Finetune, FinetuneOptions
    from debias_plugin.training import config_from_options, train

    config, _ = config_from_options(shared)
    modules = [m.strip() for m in lora_target_modules.split(",") if m.strip()] if lora_target_modules else None
    options = FinetuneOptions(corpus=corpus, column=column, where=parse_where(where), lora=lora or merge_lora,
                              lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                              lora_target_modules=modules, merge_lora=merge_lora, mlm_probability=mlm_probability)
    click.echo(train(config, Finetune(options)))
