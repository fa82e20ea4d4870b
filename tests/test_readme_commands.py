"""The README's test command is the one CI runs, verbatim, and both install torch first."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _test_command(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip().endswith("pytest -q")]
    assert len(lines) == 1, lines
    return lines[0]


def test_ci_runs_the_readme_test_command() -> None:
    readme = _test_command((ROOT / "README.md").read_text())
    ci = _test_command((ROOT / ".ci" / "run").read_text())
    assert readme == ci
    # torch first, pinned, then everything else under the constraints that keep it.
    assert "pip install torch==2.13.0 && pip install -c constraints.txt" in readme
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
