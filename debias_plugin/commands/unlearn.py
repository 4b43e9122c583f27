"""`debias unlearn`: masked-token gradient ascent (Lu et al.), thin over debias_plugin.methods.unlearn."""

from __future__ import annotations

import click

from debias_plugin.training import click_training_options


@click.command("unlearn")
@click_training_options
@click.option("--corpus", required=True, type=click.Path(), help="Forget set: .txt, .csv/.tsv or .jsonl.")
@click.option("--column", default=None, help="Text column of a CSV/JSONL corpus (default 'text').")
@click.option("--where", multiple=True, help="Keep forget rows with COLUMN=VALUE (repeatable), e.g. split=dev.")
@click.option("--targets", type=click.Choice(["words", "markup"]), default="words", show_default=True,
              help="words: matches of a word list; markup: spans written as [[word]] in the text.")
@click.option("--words", default=None, type=click.Path(),
              help="Word list: domain-keyed JSON (bias_attribute_words.json layout) or .txt, one word per line "
                   "(default: bias_attribute_words.json in $DEBIAS_DATA_DIR).")
@click.option("--domain", "domains", multiple=True, default=("gender",), show_default=True,
              help="Domain(s) of the JSON word list (repeatable).")
@click.option("--heldout", default=None, type=click.Path(), help="Held-out corpus for perplexity logging.")
@click.option("--heldout-column", default=None)
@click.option("--heldout-where", multiple=True, help="COLUMN=VALUE filter for the held-out corpus, e.g. split=test.")
@click.option("--retain", default=None, type=click.Path(), help="Retain corpus for the regulariser.")
@click.option("--retain-column", default=None)
@click.option("--retain-where", multiple=True)
@click.option("--regulariser", type=click.Choice(["none", "gd", "kl"]), default="none", show_default=True,
              help="gd: plus the retain corpus NLL (gradient difference); kl: plus KL to the original model.")
@click.option("--retain-weight", default=1.0, show_default=True, type=float)
@click.option("--eval-texts", default=0, show_default=True, help="Texts per perplexity evaluation (0 = all).")
def unlearn_command(corpus, column, where, targets, words, domains, heldout, heldout_column, heldout_where, retain,
                    retain_column, retain_where, regulariser, retain_weight, eval_texts, **shared):
    """Unlearn chosen tokens by gradient ascent on their likelihood (Lu et al., "Towards Transfer Unlearning").

    Defaults follow the paper: batch 8, 50 steps, lr 1e-5. Texts without a target token are counted and
    reported. --eval-every N logs forget-set and held-out perplexity into the manifest's history.
    """
    from debias_plugin.methods import parse_where
    from debias_plugin.methods.unlearn import Unlearn, UnlearnOptions
    from debias_plugin.training import config_from_options, train

    config, _ = config_from_options(shared)
    options = UnlearnOptions(
        corpus=corpus, column=column, where=parse_where(where), targets=targets, words=words, domains=list(domains),
        heldout=heldout, heldout_column=heldout_column, heldout_where=parse_where(heldout_where), retain=retain,
        retain_column=retain_column, retain_where=parse_where(retain_where), regulariser=regulariser,
        retain_weight=retain_weight, eval_texts=eval_texts,
    )
    click.echo(train(config, Unlearn(options)))
