"""fguide.evaluation.calibration: where a run's diagnostics are found (the figures and the
numbers are tested end to end in test_cli_calibration.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from fguide.evaluation.calibration import find_trajectory
from fguide.io import runs


def _run(root: Path, status: str, trajectory: bool) -> Path:
    root.mkdir()
    (root / runs.MANIFEST).write_text(json.dumps({"format": runs.FORMAT, "status": status}))
    if trajectory:
        (root / runs.TRAJECTORY).write_text("{}")
    return root


def test_a_run_folder_is_read_through_its_manifest(tmp_path: Path) -> None:
    done = _run(tmp_path / "done", "complete", trajectory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_trajectory(done) == done / runs.TRAJECTORY
    running = _run(tmp_path / "running", "running", trajectory=True)
    with pytest.warns(UserWarning, match="'running', not 'complete'"):
        assert find_trajectory(running) == running / runs.TRAJECTORY
    # A run without its trajectory is an error: no search below it for some other file.
    empty = _run(tmp_path / "empty", "running", trajectory=False)
    (empty / "old").mkdir()
    (empty / "old" / runs.TRAJECTORY).write_text("{}")
    with pytest.raises(FileNotFoundError, match="no trajectory.json"):
        find_trajectory(empty)
    # A plain folder (no manifest) is searched as before.
    plain = tmp_path / "plain" / "a"
    plain.mkdir(parents=True)
    (plain / runs.TRAJECTORY).write_text("{}")
    assert find_trajectory(tmp_path / "plain") == plain / runs.TRAJECTORY
