"""The gate's verdict for people and for CI: terminal table, GitHub markdown summary, JUnit XML, JSON."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from debias_plugin.errors import DebiasError
from debias_plugin.gate.checks import CheckResult
from debias_plugin.outputs import refuse_overlap, write_text_atomically

STEP_SUMMARY_ENV = "GITHUB_STEP_SUMMARY"
REPORT_SCHEMA = "debias_plugin.gate-report/1"


@dataclass
class GateReport:
    gate: str
    name: str
    alpha: float
    candidate: str
    baseline: str | None
    checks: list[CheckResult]
    seconds: float = 0.0
    created_utc: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def failures(self) -> list[CheckResult]:
        return [check for check in self.checks if not check.passed]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict:
        checks = [_finite({key: value for key, value in dataclasses.asdict(check).items()
                           if key != "types" or value is not None}) for check in self.checks]
        return {"schema": REPORT_SCHEMA, "gate": self.gate, "name": self.name, "passed": self.passed,
                "alpha": self.alpha, "candidate": self.candidate, "baseline": self.baseline,
                "checks": checks, "seconds": round(self.seconds, 3), "created_utc": self.created_utc}


def _finite(value):
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def number(value: float | None) -> str:
    if value is None:
        return ""
    if math.isnan(value):
        return "NaN"
    return f"{value:.4g}"


def interval(check_interval) -> str:
    if check_interval is None:
        return ""
    return f"[{number(check_interval.low)}, {number(check_interval.high)}]"


def p_value(value: float | None) -> str:
    if value is None:
        return ""
    return "<0.0001" if value < 1e-4 else f"{value:.3g}"


def _compared(check: CheckResult) -> str:
    if check.delta is None:
        return ""
    text = f"{check.delta_label} {check.delta:+.4g}"
    if check.delta_interval is not None:
        text += f" {interval(check.delta_interval)}"
    return text


def _worse_types(check: CheckResult) -> str:
    """types_not_worse: each worse CrowS type / StereoSet domain with both values and its Holm-adjusted p."""
    worse = [row for row in check.types or [] if row["worse"]]
    return ("worse: " + ", ".join(f"{row['name']} ({number(row['baseline'])} -> {number(row['candidate'])}, Holm p = "
                                  f"{p_value(row['adjusted_p'])})" for row in worse)) if worse else ""


def _notes(check: CheckResult) -> str:
    return "; ".join(part for part in (check.method, _worse_types(check), check.note) if part)


def _rows(report: GateReport) -> list[list[str]]:
    confidence = f"{100 * (1 - report.alpha):g}% CI"
    rows = [["result", "check", "estimate", confidence, "baseline", "compared", "p", "method"]]
    for check in report.checks:
        rows.append(["PASS" if check.passed else "FAIL", check.title, number(check.value), interval(check.interval),
                     number(check.baseline_value), _compared(check), p_value(check.p_value), _notes(check)])
    return rows


def _headline(report: GateReport) -> str:
    verdict = "passed" if report.passed else "FAILED"
    passed = len(report.checks) - len(report.failures)
    return (f"debias gate {verdict}: {report.name} ({passed}/{len(report.checks)} checks passed, "
            f"alpha = {report.alpha:g})")


def terminal_table(report: GateReport) -> str:
    rows = _rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    sources = f"candidate: {report.candidate}" + (f"; baseline: {report.baseline}" if report.baseline else "")
    return "\n".join([_headline(report), sources, "", *lines])


def _cell(text: str) -> str:
    """Markdown table cell: HTML-escaped (names may hold <, >, &), pipes escaped, one line."""
    import html

    return html.escape(text, quote=False).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_summary(report: GateReport) -> str:
    """A GitHub-flavoured markdown table (for $GITHUB_STEP_SUMMARY, PR comments, GitLab)."""
    rows = _rows(report)
    for row in rows[1:]:
        row[0] = "✅ pass" if row[0] == "PASS" else "❌ fail"
    lines = [f"### {'✅' if report.passed else '❌'} {_headline(report)}", "",
             f"candidate: `{report.candidate}`" + (f" · baseline: `{report.baseline}`" if report.baseline else ""),
             "", "| " + " | ".join(_cell(cell) for cell in rows[0]) + " |",
             "|" + "|".join(" --- " for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def junit_xml(report: GateReport) -> str:
    """JUnit XML (the Ant/Jenkins schema GitHub, GitLab and Jenkins read): one testcase per check."""
    import xml.etree.ElementTree as ET

    counts = {"tests": str(len(report.checks)), "failures": str(len(report.failures)), "errors": "0"}
    seconds = f"{report.seconds:.3f}"
    suites = ET.Element("testsuites", name="debias gate", **counts, time=seconds)
    suite = ET.SubElement(suites, "testsuite", name=report.name, **counts, skipped="0", time=seconds,
                          timestamp=report.created_utc.replace("+00:00", ""), hostname=socket.gethostname())
    properties = ET.SubElement(suite, "properties")
    for name, value in (("gate", report.gate), ("candidate", report.candidate), ("baseline", report.baseline),
                        ("alpha", f"{report.alpha:g}")):
        if value is not None:
            ET.SubElement(properties, "property", name=name, value=str(value))
    classname = "debias_gate." + Path(report.gate).stem.replace(".", "_")
    for check in report.checks:
        case = ET.SubElement(suite, "testcase", name=check.title, classname=classname, time=f"{check.seconds:.3f}")
        detail = _detail(check)
        if not check.passed:
            failure = ET.SubElement(case, "failure", type="GateCheckFailed",
                                    message=f"{check.metric} = {number(check.value)}, required {check.requirement}")
            failure.text = detail
        ET.SubElement(case, "system-out").text = detail
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _detail(check: CheckResult) -> str:
    parts = [f"{check.metric}: estimate {number(check.value)}"]
    if check.interval is not None:
        parts.append(f"{100 * check.interval.confidence:g}% CI {interval(check.interval)} ({check.interval.method})")
    if check.baseline_value is not None:
        parts.append(f"baseline {number(check.baseline_value)}")
    if check.delta is not None:
        parts.append(_compared(check))
    if check.p_value is not None:
        parts.append(f"p = {p_value(check.p_value)}")
    parts.append(f"requirement: {check.requirement} (gate line {check.line})")
    if check.method or check.note:
        parts.append(_notes(check))
    return "; ".join(parts)


def check_report_path(path: str | Path, option: str, inputs: list[Path]) -> Path:
    """A report file may be replaced (as pytest's --junitxml is), but never an input, a folder, or in no folder."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise DebiasError(f"{option} {path} is a folder; give a file name.")
    refuse_overlap(path, inputs, option)
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise DebiasError(f"{option} {path}: the folder {path.parent} does not exist or is not writable.")
    return path


def write_reports(report: GateReport, *, junit: str | Path | None = None, json_path: str | Path | None = None,
                  markdown: str | Path | None = None) -> None:
    """The requested report files, and the markdown appended to $GITHUB_STEP_SUMMARY when that is set."""
    import json

    if junit:
        write_text_atomically(Path(junit), junit_xml(report))
    if json_path:
        write_text_atomically(Path(json_path), json.dumps(report.to_dict(), indent=2) + "\n")
    summary = markdown_summary(report)
    if markdown:
        write_text_atomically(Path(markdown), summary)
    step_summary = os.environ.get(STEP_SUMMARY_ENV)
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as handle:
            handle.write(summary + "\n")
