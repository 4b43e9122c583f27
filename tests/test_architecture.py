"""The architecture contracts of pyproject.toml ([tool.importlinter]) hold, and a wrong import breaks them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
LAYERS = "Layers point one way: from the CLI down to errors"
PURE_SCORING = "Scoring is pure: debias_plugin.scoring imports neither lm_eval nor click"
LM_EVAL_GLUE = "Only debias_plugin.lm_eval imports lm_eval"


def lint_imports(folder: Path) -> tuple[int, dict[str, str], str]:
    """Exit code, contract name -> KEPT/BROKEN and the report, for the debias_plugin package in `folder` (found
    first on the path: lint-imports puts its working folder there)."""
    result = subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo", str(CONFIG)], cwd=folder, capture_output=True,
                            text=True)
    verdicts = dict(re.findall(r"^(.+?) (KEPT|BROKEN)\b", result.stdout, flags=re.MULTILINE))
    return result.returncode, verdicts, result.stdout + result.stderr


def test_the_package_keeps_every_contract():
    code, verdicts, report = lint_imports(ROOT)
    assert {LAYERS, PURE_SCORING, LM_EVAL_GLUE} <= verdicts.keys(), report
    assert code == 0 and "BROKEN" not in verdicts.values(), report


def test_a_wrong_import_breaks_its_contracts(tmp_path):
    """click in scoring breaks pure scoring; data importing the CLI points a layer upwards."""
    package = tmp_path / "debias_plugin"
    shutil.copytree(ROOT / "debias_plugin", package, ignore=shutil.ignore_patterns("__pycache__"))
    for module, line in (("scoring/gap.py", "import click"), ("data/_io.py", "from debias_plugin import cli")):
        with open(package / module, "a") as file:
            file.write(f"\n{line}  # noqa: E402,F401  (deliberately wrong)\n")

    code, verdicts, report = lint_imports(tmp_path)
    assert code != 0
    assert verdicts[PURE_SCORING] == "BROKEN" and verdicts[LAYERS] == "BROKEN", report
    assert verdicts[LM_EVAL_GLUE] == "KEPT", report
    assert "debias_plugin.data._io -> debias_plugin.cli" in report and "debias_plugin.scoring.gap -> click" in report
