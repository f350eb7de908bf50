"""Access to the reference fixtures (``FGUIDE_FIXTURES`` or ``../shared/fixtures``).

Tests that use a fixture file call :func:`load_fixture`, which skips with the reason when the
folder or file is missing, and parametrise over :func:`case_names` so that every stored case is
exercised whatever their number.
"""

from __future__ import annotations

import functools
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import pytest
import tolerances
import torch

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    env = os.environ.get("FGUIDE_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "fixtures"


def _path(name: str) -> Path:
    return fixtures_dir() / name


@functools.cache
def _load(name: str) -> Any:
    path = _path(name)
    if name.endswith(".json"):
        return json.loads(path.read_text())
    return torch.load(path, weights_only=True)


def load_fixture(name: str) -> Any:
    """The fixture file ``name``; skips the calling test when it is not there."""
    path = _path(name)
    if not path.is_file():
        pytest.skip(f"fixture file {path} not found (set FGUIDE_FIXTURES to the fixtures folder)")
    return _load(name)


def case_names(name: str) -> list[str]:
    """Names of every case in fixture file ``name`` for parametrisation.

    When the file is missing a single placeholder is returned, so that the test runs and skips
    with the reason (via :func:`get_case`) instead of silently collecting nothing.
    """
    path = _path(name)
    if not path.is_file():
        return ["<fixtures missing>"]
    data = _load(name)
    return [c["name"] for c in data["cases"]]


def get_case(name: str, case: str) -> dict[str, Any]:
    data = load_fixture(name)
    for c in data["cases"]:
        if c["name"] == case:
            return c
    raise KeyError(f"case {case!r} not in {name}")


def fixture_init(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The fixtures' deterministic weight rule (fixtures README, 'Fixture init')."""
    g = torch.Generator().manual_seed((zlib.crc32(name.encode("utf-8")) + seed) % (2**63))
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    if name.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
    if name.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    if len(shape) <= 1:
        base = 1.0 if name.endswith("weight") or name.endswith("gamma") else 0.0
        return base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)


def fixture_state_dict(
    module: torch.nn.Module, seed: int = 0, rename: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Fixture-init weights for every key of ``module`` (optionally hashed under another name)."""
    rename = rename or {}
    return {
        k: fixture_init(rename.get(k, k), tuple(v.shape), seed)
        for k, v in module.state_dict().items()
    }


def assert_close_float32(
    actual: torch.Tensor, expected: torch.Tensor, depth: float, msg: str | None = None
) -> None:
    """A float32 result of ``depth`` stages against the float64 expected value, within
    :func:`tolerances.tol` (4 float32 ulps of max|expected| per stage)."""
    assert actual.dtype == torch.float32, f"expected a float32 result, got {actual.dtype}"
    tolerances.assert_close(actual, expected, torch.float32, depth=depth, msg=msg)


def assert_close_float64(
    actual: torch.Tensor, expected: torch.Tensor, depth: float, msg: str | None = None
) -> None:
    """A float64 result of ``depth`` stages against the float64 expected value (computed by
    another implementation), within :func:`tolerances.tol`."""
    assert actual.dtype == torch.float64, f"expected a float64 result, got {actual.dtype}"
    tolerances.assert_close(actual, expected, torch.float64, depth=depth, msg=msg)
