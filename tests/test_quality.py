"""The code stays ruff- and mypy-clean (run as part of the suite so CI enforces it).

The tools run as ``sys.executable -m ruff`` / ``-m mypy``: the interpreter that runs the tests,
whether or not its scripts folder is on PATH. ruff and mypy are dev dependencies (the README's test
command installs ``.[dev]``), so a missing tool fails the check instead of skipping it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from fixture_utils import REPO


def _run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.fail(
            f"{module} is not installed for {sys.executable}; it is a dev dependency: "
            "python3 -m pip install -e '.[dev]'"
        )
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "args", [("check", "src", "tests", "bench"), ("format", "--check", "src", "tests", "bench")]
)
def test_ruff(args: tuple[str, ...]) -> None:
    res = _run_module("ruff", *args)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy() -> None:
    res = _run_module("mypy")  # files and options from pyproject.toml [tool.mypy]
    assert res.returncode == 0, res.stdout + res.stderr
