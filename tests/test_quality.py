"""The public API stays ruff- and mypy-clean (run as part of the suite so CI enforces it)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from fixture_utils import REPO


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "args", [("check", "src", "tests", "bench"), ("format", "--check", "src", "tests", "bench")]
)
def test_ruff(args: tuple[str, ...]) -> None:
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    res = _run("ruff", *args)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy() -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[dev]')")
    res = _run(sys.executable, "-m", "mypy")
    assert res.returncode == 0, res.stdout + res.stderr
