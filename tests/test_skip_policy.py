"""In CI a skipped test fails the run unless nothing installable could make it run (skip_policy.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE = """
import pytest
def test_missing_tool(): pytest.skip("needs sometool (make setup)")
def test_impossible(): pytest.skip("cannot run here: needs a second machine")
def test_ok(): pass
"""


@pytest.mark.parametrize(("ci", "fixable", "code"), [("true", True, 1), ("", True, 0), ("true", False, 0)])
def test_ci_fails_on_fixable_skips(tmp_path: Path, ci: str, fixable: bool, code: int) -> None:
    sample = SAMPLE if fixable else SAMPLE.replace("needs sometool (make setup)", "cannot run here: x")
    (tmp_path / "test_sample.py").write_text(sample)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.skip_policy",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert ("needs sometool" in proc.stdout) == fixable
