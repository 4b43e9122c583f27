"""`debias seat`: SEAT effect sizes and p-values of a model, thin over debias_plugin.scoring.seat.run_seat."""

from __future__ import annotations

import click


def _test_names(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("expected comma-separated SEAT test names (file stems, e.g. sent-weat6,sent-weat7)")
    return names


@click.command("seat")
@click.option("--model", required=True, help="Model folder: a sentence-transformers folder, an encoder / masked LM, "
                                             "or a causal LM (its base model is used; safetensors only).")
@click.option("--tests", callback=_test_names, default=None,
              help="Comma-separated SEAT file stems (default: bias-bench's gender, race and religion tests).")
@click.option("--pooling", type=click.Choice(["mean", "cls", "last"]), default=None,
              help="Pool the last hidden state by mean, first ([CLS]) or last token. Default: a "
                   "sentence-transformers folder's own pooling, otherwise mean (bias-bench).")
@click.option("--output", type=click.Path(), default=None, help="JSON file: test -> {effect_size, p_value}.")
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
@click.option("--seat-dir", default=None, help="Folder of SEAT .jsonl files (default: $DEBIAS_DATA_DIR/seat).")
@click.option("--n-samples", default=100_000, show_default=True,
              help="Permutations for the p-value (exact test when there are fewer partitions).")
@click.option("--seed", default=0, show_default=True, help="Seed of the sampled permutation test.")
@click.option("--batch-size", default=32, show_default=True, help="Sentences per forward pass.")
def seat_command(model, tests, pooling, output, force, seat_dir, n_samples, seed, batch_size):
    """Sentence Encoder Association Test (May et al. 2019): WEAT's effect size on sentence embeddings.

    Positive effect size: targ1 is closer to attr1 and targ2 to attr2 (the stereotype in bias-bench's tests).
    """
    from debias_plugin.data.seat import resolve_seat_tests
    from debias_plugin.errors import DebiasError
    from debias_plugin.scoring.seat import format_report, report_to_json, run_seat

    if n_samples < 1 or batch_size < 1:
        raise DebiasError("--n-samples and --batch-size must be at least 1.")
    resolve_seat_tests(tests, seat_dir)  # unknown test names fail before the model loads
    target = None
    if output:
        from debias_plugin.outputs import OutputFolder, write_text_atomically

        from debias_plugin.data.seat import seat_folder

        # checks only (we write one file); the SEAT folder read is an input even when it is the default one
        target = OutputFolder(output, inputs=[model, seat_folder(seat_dir)], force=force)
        if target.path.is_dir():
            raise DebiasError(f"--output {target.path} is a folder; expected a .json file path.")
    report = run_seat(model, tests, pooling, seat_dir=seat_dir, n_samples=n_samples, seed=seed,
                      batch_size=batch_size)
    click.echo(format_report(report))
    if target is not None:
        target.check_replaceable()
        target.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(target.path, report_to_json(report))
        click.echo(f"Wrote {target.path}")
