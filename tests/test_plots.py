"""Figures (fguide.plots): reliability diagrams and image grids.

The Figure-1 and demo figures are drawn end to end by test_cli_calibration.py and
test_demo.py; here, what can be checked exactly: the JSON round trip of a reliability diagram
gives the same picture, and an image grid puts every image where the layout says.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fguide.metrics.calibration import reliability_diagram
from fguide.plots import image_grid, image_grid_png, plot_reliability, plot_reliability_dict


def test_reliability_diagram_png_and_its_json_form(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(300, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 5, (300,), generator=g)
    stats = reliability_diagram(logits, labels, n_bins=8)
    assert stats.count[0] == 0  # p̂ ≥ 1/5: an empty bin, None in the JSON form
    out = plot_reliability(stats, tmp_path / "sub" / "rel.png", title="t")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    # From the JSON form (None for empty bins): the same picture, pixel for pixel.
    again = plot_reliability_dict(stats.to_dict(), tmp_path / "again.png", title="t")
    a = np.asarray(Image.open(out).convert("RGB"))
    b = np.asarray(Image.open(again).convert("RGB"))
    np.testing.assert_array_equal(a, b)
    other = stats.to_dict()
    other["accuracy"] = list(reversed(other["accuracy"]))  # a different diagram differs
    c = np.asarray(Image.open(plot_reliability_dict(other, tmp_path / "c.png", title="t")))
    assert not np.array_equal(a, c[..., :3])


def test_image_grid_layout() -> None:
    n, h, w = 5, 2, 3
    images = np.stack([np.full((h, w, 3), 10 * (k + 1), np.uint8) for k in range(n)])
    grid = image_grid(images, columns=2)
    assert grid.shape == (3 * h, 2 * w, 3)
    for k in range(n):
        r, c = k // 2, k % 2
        assert (grid[r * h : (r + 1) * h, c * w : (c + 1) * w] == 10 * (k + 1)).all()
    assert (grid[2 * h :, w:] == 255).all()  # the unused cell is white
    assert image_grid(images, columns=8).shape == (h, n * w, 3)  # fewer images than columns
    buf = io.BytesIO()
    image_grid_png(images, columns=2)(buf)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), grid)
    with pytest.raises(ValueError, match="uint8"):
        image_grid(images.astype(np.float32))
    with pytest.raises(ValueError, match="columns"):
        image_grid(images, columns=0)
