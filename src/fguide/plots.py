"""Every figure fguide draws, in one place.

- :func:`plot_reliability`: a reliability diagram (accuracy per confidence bin against the
  diagonal; METHODS.md 4), from :class:`~fguide.metrics.calibration.ReliabilityStats` or from
  its JSON form (:func:`plot_reliability_dict`);
- :func:`plot_trajectory_figures`: the paper's Figure 1 from sampling runs (ECE, confidence and
  guidance-gradient norm per sampling step), and any other per-step statistic a run defines
  (a CLIP guide's CLIP score);
- :func:`plot_calibration_vs_noise`, :func:`write_reliability_diagrams`: a classifier's
  calibration on forward-noised images;
- :func:`plot_demo`: the Gaussian-mixture demo's curves and sample scatters;
  :func:`plot_quality_vs_cost`: its rows' quality against their cost;
- :func:`image_grid_png` (from :mod:`fguide.io.files`): a grid of uint8 images as a PNG (a
  sampling run's ``grid.png``).

Figures are built on a matplotlib ``Figure`` with an Agg canvas (no pyplot global state, no
backend switch for the caller) and written atomically as PNG (:func:`fguide.io.files.save_figure`).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fguide.io.files import image_grid, image_grid_png, save_figure

if TYPE_CHECKING:
    import torch

    from fguide.diagnostics import TrajectoryCurves
    from fguide.metrics.calibration import ClassifierCalibration, LevelCalibration, ReliabilityStats

__all__ = [
    "FIGURE_FILES",
    "image_grid",
    "image_grid_png",
    "plot_digits_calibration",
    "plot_digits_curves",
    "plot_digits_samples",
    "plot_digits_table",
    "new_figure",
    "plot_calibration_vs_noise",
    "plot_demo",
    "plot_quality_vs_cost",
    "plot_reliability",
    "plot_reliability_dict",
    "plot_trajectory_figures",
    "reliability_png_name",
    "statistic_figure",
    "write_reliability_diagrams",
]


def _figure(width: float, height: float) -> Any:
    """An empty figure of ``width`` × ``height`` inches on an Agg canvas (120 dpi, as saved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def new_figure(ncols: int = 1, width: float = 4.6, height: float = 3.6) -> tuple[Any, list[Any]]:
    """A figure with ``ncols`` axes side by side, on an Agg canvas (120 dpi)."""
    fig = _figure(width * ncols, height)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _values(c: Sequence[float | None]) -> NDArray[np.float64]:
    return np.array([np.nan if v is None else float(v) for v in c], dtype=np.float64)


# -- reliability diagrams ---------------------------------------------------------------------


def plot_reliability(
    stats: ReliabilityStats, path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Write a reliability diagram (accuracy bars per bin, the diagonal, the ECE) as a PNG."""
    fig, (ax,) = new_figure(1, 4.5, 4.5)
    lo, width = stats.edges[:-1], np.diff(stats.edges)
    acc = np.nan_to_num(stats.accuracy, nan=0.0)
    conf = np.nan_to_num(stats.mean_confidence, nan=0.0)
    ax.bar(lo, acc, width=width, align="edge", edgecolor="black", label="accuracy")
    ax.bar(
        lo,
        conf - acc,
        bottom=acc,
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"ECE = {stats.ece:.4f} (n = {int(stats.count.sum())})")
    ax.legend(loc="upper left")
    return save_figure(fig, Path(path))


def plot_reliability_dict(
    stats: Mapping[str, Any], path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """:func:`plot_reliability` of a ``ReliabilityStats.to_dict()`` (None = an empty bin)."""
    from fguide.metrics.calibration import ReliabilityStats

    rs = ReliabilityStats(
        edges=np.asarray(stats["edges"], dtype=np.float64),
        count=np.asarray(stats["count"], dtype=np.int64),
        mean_confidence=_values(stats["mean_confidence"]),
        accuracy=_values(stats["accuracy"]),
        ece=float(stats["ece"]),
    )
    return plot_reliability(rs, path, title=title)


def reliability_png_name(level: LevelCalibration) -> str:
    """``reliability_clean.png`` or ``reliability_t0250.png``."""
    return "reliability_clean.png" if level.t is None else f"reliability_t{level.t:04d}.png"


def write_reliability_diagrams(
    result: ClassifierCalibration, out_dir: str | os.PathLike[str]
) -> dict[str, Path]:
    """One reliability diagram PNG per noise level."""
    out = Path(out_dir)
    written = {}
    for lv in result.levels:
        title = f"{lv.label}: ECE {lv.ece:.4f}, acc {lv.accuracy:.3f} (n = {lv.n})"
        written[lv.label] = plot_reliability(
            lv.reliability, out / reliability_png_name(lv), title=title
        )
    return written


def plot_calibration_vs_noise(result: ClassifierCalibration, path: str | os.PathLike[str]) -> Path:
    """ECE, Smooth ECE, accuracy and mean confidence against the noise level."""
    fig, (ax,) = new_figure(1, width=5.5)
    labels = ["clean" if lv.t is None else str(lv.t) for lv in result.levels]
    x = np.arange(len(labels))
    for key, name, style in (
        ("ece", "ECE", "-o"),
        ("smooth_ece", "Smooth ECE", "-s"),
        ("accuracy", "accuracy", "--^"),
        ("mean_confidence", "mean confidence", "--v"),
    ):
        ax.plot(x, [getattr(lv, key) for lv in result.levels], style, label=name)
    ax.set_xticks(x, labels)
    ax.set_xlabel("noise level (training timestep t of x_t)")
    ax.set_ylim(0, 1.02)
    ax.set_title("classifier calibration on forward-noised images")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, Path(path))


# -- Figure 1: calibration along sampling trajectories ----------------------------------------

FIGURE_FILES = {
    "ece": "ece_vs_step.png",
    "confidence": "confidence_vs_step.png",
    "grad_norm": "grad_norm_vs_step.png",
}


def statistic_figure(curve: str) -> str:
    """The file of an extra per-step statistic's figure: ``clip_score_vs_step.png``."""
    return f"{curve}_vs_step.png"


def _trajectory_panel(ax: Any, runs: Sequence[TrajectoryCurves], kind: str) -> None:
    """Draw one Figure-1 panel (``ece``, ``confidence``, ``grad_norm``) or the panel of an
    extra per-step statistic (any other curve name, e.g. ``clip_score``)."""
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        x = _values(run.curves["step"])
        if kind == "ece":
            ece_curve = _values(run.curves["ece"])
            integral = float(np.nanmean(ece_curve)) if np.isfinite(ece_curve).any() else math.nan
            ax.plot(x, ece_curve, color=color, label=f"{run.label} (integral {integral:.3f})")
        elif kind == "confidence":
            ax.plot(x, _values(run.curves["confidence_mean"]), color=color, label=run.label)
            ax.plot(x, _values(run.curves["confidence_top25"]), color=color, ls="--", lw=1)
        elif kind not in FIGURE_FILES:
            if kind in run.curves:
                ax.plot(x, _values(run.curves[kind]), color=color, label=run.label)
        else:
            g = _values(run.curves["grad_norm"])
            if np.isfinite(g).any():
                ax.plot(x, g, color=color, label=run.label)
    ax.set_xlabel("sampling step (0 = noisiest)")
    if kind == "ece":
        ax.set_ylabel("ECE (10 bins)")
        ax.set_title("calibration along the trajectory")
        ax.set_ylim(bottom=0)
    elif kind == "confidence":
        ax.set_ylabel("confidence in the target p_y")
        ax.set_title("confidence: mean (solid), top 25% (dashed)")
        ax.set_ylim(0, 1.02)
    elif kind not in FIGURE_FILES:
        ax.set_ylabel(kind)
        definition = next((r.definitions[kind] for r in runs if kind in r.definitions), kind)
        ax.set_title(textwrap.fill(definition, 48), fontsize=8)
    else:
        ax.set_ylabel("guidance-gradient norm ‖∇S‖")
        ax.set_title("guidance-gradient norm")
        lines = ax.get_lines()
        if not lines:
            msg = "no guidance gradient recorded\n(unguided run)"
            ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes)
        elif all(np.nanmin(np.asarray(ln.get_ydata(), float)) > 0 for ln in lines):
            ax.set_yscale("log")  # vanishing gradients span orders of magnitude
    if ax.get_lines():
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_trajectory_figures(
    runs: Sequence[TrajectoryCurves], out_dir: str | os.PathLike[str]
) -> dict[str, Path]:
    """Write the three curves as separate PNGs and side by side (``figure1.png``); each extra
    per-step statistic a run defines adds its figure and a panel (a CLIP guide's CLIP score:
    ``clip_score_vs_step.png``, EluCD's Figure 7)."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    kinds = dict(FIGURE_FILES)
    for run in runs:
        for curve in run.definitions:
            kinds.setdefault(curve, statistic_figure(curve))
    for kind, name in kinds.items():
        fig, (ax,) = new_figure(1)
        _trajectory_panel(ax, runs, kind)
        fig.tight_layout()
        written[kind] = save_figure(fig, out / name)
    fig, axes = new_figure(len(kinds))
    for ax, kind in zip(axes, kinds, strict=True):
        _trajectory_panel(ax, runs, kind)
    fig.tight_layout()
    written["figure1"] = save_figure(fig, out / "figure1.png")
    return written


# -- the Gaussian-mixture demo ----------------------------------------------------------------


def plot_demo(
    worlds: Sequence[Mapping[str, Any]],
    samples: Mapping[int, Mapping[str, Mapping[str, torch.Tensor]]],
    out: str | os.PathLike[str],
) -> list[str]:
    """The demo's figures: confidence and ‖∇S‖ per step (one panel per world), and each
    method's samples projected on the plane of the class means. Returns the file names."""
    import torch

    out = Path(out)
    written = []
    for key, ylabel, log in (
        ("confidence", "classifier confidence in the target", False),
        ("grad_norm", "guidance-gradient norm ‖∇S‖", True),
    ):
        fig, axes = new_figure(len(worlds), 6.0, 4.2)
        for ax, w in zip(axes, worlds, strict=True):
            for i, (name, r) in enumerate(w["methods"].items()):
                color = f"C{i % 10}"
                if key == "confidence":
                    ax.plot(r["curves"]["confidence_mean"], color=color, label=name)
                    ax.plot(r["curves"]["confidence_top25"], color=color, ls="--", lw=0.8)
                elif "grad_norm" in r["curves"] and name != "exact":
                    ax.plot(_values(r["curves"]["grad_norm"]), color=color, label=name)
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("sampling step (0 = noisiest)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"d = {w['dim']}" + (" (dashed: top-25%)" if key == "confidence" else ""))
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        name = f"{key}_vs_step.png"
        save_figure(fig, out / name)
        written.append(name)
    for w in worlds:
        d = w["dim"]
        plane = torch.tensor(w["plane"], dtype=torch.float64)
        means = torch.tensor(w["means"], dtype=torch.float64) @ plane
        methods = list(samples[d])
        cols = 5
        rows = (len(methods) + cols - 1) // cols
        fig = _figure(3 * cols, 3 * rows)
        grid = fig.subplots(rows, cols, squeeze=False)
        for ax, name in zip(grid.flat, methods, strict=False):
            x = samples[d][name]["x"] @ plane
            y = samples[d][name]["labels"]
            ax.scatter(x[:, 0], x[:, 1], c=y, cmap="tab10", s=2, alpha=0.5, vmin=0, vmax=9)
            ax.scatter(means[:, 0], means[:, 1], c="k", marker="x", s=20)
            r = w["methods"][name]
            ax.set_title(f"{name}: acc {r['accuracy']:.2f}, FD {r['frechet_mean']:.3f}", fontsize=8)
            lim = 1.6 * float(means.abs().max())
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in list(grid.flat)[len(methods) :]:
            ax.axis("off")
        fig.suptitle(f"samples (d = {d}, plane of the class means), colour = target class")
        fig.tight_layout()
        name = f"samples_d{d}.png"
        save_figure(fig, out / name)
        written.append(name)
    return written


def plot_quality_vs_cost(worlds: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """The demo's quality against cost: each row's mean per-class FD (log scale) against its
    network evaluations per sample (top: ε-network + classifier forwards) and CPU time per
    sample (bottom), one column per world; ``exact`` and ``none`` as horizontal references."""
    fig = _figure(5.2 * len(worlds), 8.4)
    axes = fig.subplots(2, len(worlds), squeeze=False)
    for col, w in enumerate(worlds):
        for row, (key, factor, xlabel) in enumerate(
            (
                ("nfe", 1.0, "network evaluations per sample (ε-net + classifier forwards)"),
                ("cpu_s", 1e3, "CPU ms per sample"),
            )
        ):
            ax = axes[row, col]
            for i, (name, r) in enumerate(w["methods"].items()):
                color = f"C{i % 10}"
                if name in ("exact", "none"):
                    ls = "-" if name == "exact" else ":"
                    ax.axhline(r["frechet_mean"], color="k", ls=ls, lw=1, label=name)
                    continue
                x, y = r["cost"][key] * factor, r["frechet_mean"]
                marker = "^" if name in w.get("family_sweeps", {}) else "o"  # family: triangles
                ax.scatter([x], [y], color=color, marker=marker, s=30, label=name)
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("mean per-class FD to the exact class-conditional")
            ax.set_title(f"d = {w['dim']}")
            if row == 0 and col == 0:
                ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, Path(path))


# -- the digits world ---------------------------------------------------------------------


def plot_digits_table(results: Mapping[str, Any], path: Path) -> None:
    m = results["methods"]
    names = list(m)
    fig = _figure(11, 4)
    for j, (key, label) in enumerate((("fd", "FD (lower is better)"), ("accuracy", "accuracy"))):
        ax = fig.add_subplot(1, 2, j + 1)
        mu = [m[n]["mean"][key] or 0.0 for n in names]
        sd = [m[n]["std"][key] or 0.0 for n in names]
        ax.bar(range(len(names)), mu, yerr=sd, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_title(label)
    fig.tight_layout()
    save_figure(fig, path)


def plot_digits_curves(curves: Mapping[str, Any], path: Path) -> None:
    from matplotlib import colormaps

    colours = colormaps["tab20"]
    fig = _figure(13, 3.8)
    panels = (
        ("confidence_top25", "top-25 % confidence in the target"),
        ("grad_norm", "‖∇S‖ (mean)"),
        ("ece", "ECE of the guide on its input"),
    )
    for j, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, j + 1)
        for i, (name, c) in enumerate(curves.items()):
            ys = c.get(key) or []
            if not ys or all(v is None for v in ys):
                continue
            xs = list(range(len(ys)))
            ax.plot(
                xs,
                [np.nan if v is None else v for v in ys],
                label=name,
                linewidth=1.2,
                color=colours(i % 20),
                linestyle=("-", "--", ":")[i // 7 % 3],
            )
        ax.set_xlabel("sampling step (noise → data)")
        ax.set_title(title, fontsize=9)
        if key == "grad_norm":
            ax.set_yscale("log")
    fig.axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def plot_digits_samples(
    samples: Mapping[str, tuple[NDArray[np.uint8], NDArray[np.int64]]], path: Path
) -> None:
    """One panel per method: rows = target class 0..9, up to 6 samples each."""

    names = list(samples)
    cols = 4
    rows = -(-len(names) // cols)
    fig = _figure(2.6 * cols, 4.0 * rows)
    for j, name in enumerate(names):
        images, labels = samples[name]
        grey = images.mean(axis=-1)
        canvas = np.ones((10 * 9, 6 * 9))
        for k in range(10):
            idx = np.flatnonzero(labels == k)[:6]
            for c, i in enumerate(idx):
                canvas[k * 9 : k * 9 + 8, c * 9 : c * 9 + 8] = 1 - grey[i] / 255.0
        ax = fig.add_subplot(rows, cols, j + 1)
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def plot_digits_calibration(calib: Mapping[str, Any], path: Path) -> None:
    regs = calib["regimes"]
    fig = _figure(4.5 * len(regs), 3.6)
    losses = ("before", "ce", "smooth_ece", "soft_binned_ece")
    for j, (name, reg) in enumerate(regs.items()):
        ax = fig.add_subplot(1, len(regs), j + 1)
        mu = [reg["before"]["ece"]] + [reg[k]["mean"]["ece"] for k in losses[1:]]
        sd = [0.0] + [reg[k]["std"]["ece"] for k in losses[1:]]
        ax.bar(range(4), mu, yerr=sd, capsize=3, color=["grey", "tab:blue", "tab:red", "tab:green"])
        ax.set_xticks(range(4))
        ax.set_xticklabels(["before", "CE", "CE+SmoothECE", "CE+softECE"], fontsize=8)
        ax.set_title(f"{name}: accuracy ≈ {reg['before']['accuracy']:.2f}", fontsize=9)
        ax.set_ylabel("held-out ECE (x̂0 inputs)")
    fig.tight_layout()
    save_figure(fig, path)
