"""ruff and mypy, as configured in pyproject.toml, pass on the tree."""

from __future__ import annotations

import subprocess

from tests.conftest import BIN, ROOT


def test_ruff() -> None:
    out = subprocess.run(
        [str(BIN / "ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy() -> None:
    out = subprocess.run([str(BIN / "mypy")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
