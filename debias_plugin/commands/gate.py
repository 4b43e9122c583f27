"""`debias gate GATE.yml`: pass/fail bias and perplexity checks for CI (exit 0 pass, 1 a check failed, 2 bad input)."""

from __future__ import annotations

import click


@click.command("gate")
@click.argument("gate_file", type=click.Path(dir_okay=False))
@click.option("--junit", type=click.Path(dir_okay=False), default=None,
              help="Write JUnit XML here (one testcase per check).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the full report (estimates, intervals, p-values) as JSON here.")
@click.option("--markdown", type=click.Path(dir_okay=False), default=None,
              help="Write the markdown summary here (it is also appended to $GITHUB_STEP_SUMMARY when set).")
def gate_command(gate_file, junit, json_path, markdown):
    """Evaluate a model (cached by content) or read lm-eval results, and check bias / perplexity limits.

    A check fails only when the evidence says so at the gate's alpha: exact binomial intervals and McNemar tests
    for CrowS-Pairs, bootstrap over target terms (StereoSet) or documents (perplexity). See docs/ci.md.
    """
    from debias_plugin.gate import gate_inputs, load_gate, run_gate, terminal_table, write_reports
    from debias_plugin.gate.report import check_report_path

    inputs = gate_inputs(load_gate(gate_file))  # the gate file is validated before anything runs
    junit, json_path, markdown = (check_report_path(path, option, inputs) if path else None for option, path in
                                  (("--junit", junit), ("--json", json_path), ("--markdown", markdown)))
    report = run_gate(gate_file)
    click.echo(terminal_table(report))
    write_reports(report, junit=junit, json_path=json_path, markdown=markdown)
    return report.exit_code
