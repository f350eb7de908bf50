"""The Gaussian-mixture demo's outputs: tables, ``report.md``, ``results.json`` and figures."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fguide.io.files import atomic_write_json, atomic_write_text, provenance
from fguide.io.folders import DEMO_FILES, claim_folder
from fguide.worlds.demo import DemoConfig, DemoRun
from fguide.worlds.demo_family import FAMILY

__all__ = ["markdown_table", "report", "table", "write_demo"]


def write_demo(run: DemoRun, out: str | os.PathLike[str]) -> list[Path]:
    """Write ``results.json``, ``report.md`` and the figures into ``out``; returns the files."""
    from fguide.plots import plot_demo, plot_quality_vs_cost

    out = Path(out)
    claim_folder(out, "demo", DEMO_FILES["demo"], hold=False)  # refuses others' files
    c = run.config
    plots = plot_demo(run.worlds, run.samples, out)
    plots.append(plot_quality_vs_cost(run.worlds, out / "quality_vs_cost.png").name)
    results = {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(c).items()},
        "seed": c.seed,
        "wall_time_s": run.seconds,
        "worlds": run.worlds,
        "provenance": provenance(),
    }
    written = [atomic_write_json(out / "results.json", results)]
    written.append(atomic_write_text(out / "report.md", report(run.worlds, c, run.seconds, plots)))
    return written + [out / p for p in plots]


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else spec.format(value)


def _fmt_scaled(value: Any, spec: str, factor: float) -> str:
    return "—" if value is None else spec.format(value * factor)


def _evals(cost: dict[str, float], net: str) -> str:
    """Forward/backward evaluations per sample of ``net`` (``eps`` or ``classifier``)."""
    if not cost:
        return "—"
    return f"{cost[net + '_evals']:.0f}/{cost[net + '_backward']:.0f}"


Cell = Callable[[dict[str, Any]], str]
COLUMNS: tuple[tuple[str, Cell], ...] = (
    ("strength", lambda r: _fmt(r.get("strength"), "{:.3g}")),
    ("acc", lambda r: _fmt(r["accuracy"], "{:.3f}")),
    ("FD", lambda r: _fmt(r["frechet_mean"], "{:.4f}")),
    ("FD sd", lambda r: _fmt(r.get("frechet_sd"), "{:.4f}")),
    ("FD↔exact", lambda r: _fmt(r.get("frechet_to_exact"), "{:.4f}")),
    ("P", lambda r: _fmt(r["precision"], "{:.3f}")),
    ("R", lambda r: _fmt(r["recall"], "{:.3f}")),
    ("ECE", lambda r: _fmt(r["integral_ece"], "{:.3f}")),
    ("vanished", lambda r: _fmt(r["vanished_mean"], "{:.3f}")),
    ("max w", lambda r: _fmt(r["max_tilt_weight"], "{:.2f}")),
    ("ε f/b", lambda r: _evals(r.get("cost", {}), "eps")),
    ("clf f/b", lambda r: _evals(r.get("cost", {}), "classifier")),
    ("CPU ms", lambda r: _fmt_scaled(r.get("cost", {}).get("cpu_s"), "{:.3f}", 1e3)),
)
"""The tables' columns: heading and cell of a row's result."""


def table(summary: dict[str, Any]) -> str:
    """A fixed-width table of one world's results."""
    header = f"{'method':<12}" + "".join(f"{h:>10}" for h, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for name, r in summary["methods"].items():
        lines.append(f"{name:<12}" + "".join(f"{cell(r):>10}" for _, cell in COLUMNS))
    return "\n".join(lines)


def markdown_table(summary: dict[str, Any]) -> str:
    head = "| method | " + " | ".join(h for h, _ in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    rows = [
        f"| {name} | " + " | ".join(cell(r) for _, cell in COLUMNS) + " |"
        for name, r in summary["methods"].items()
    ]
    return "\n".join([head, sep, *rows])


def _settings_text(c: DemoConfig, seconds: float) -> list[str]:
    return [
        f"K = {c.num_classes} classes on a circle of radius {c.radius}, class spread s = {c.s}, "
        f"off-the-shelf classifier = Bayes classifier sharpened by κ = {c.sharpness}, applied to "
        f"x̂0. DDPM with the exact denoiser, {c.steps} steps respaced from 1000 "
        f"({c.noise_schedule} betas, fixed-small variance), EluCD sine boost γ_sine = "
        f"{c.sine_factor}; {c.samples_per_class} samples per class on each of {c.eval_seeds} "
        f"evaluation seeds (seed {c.seed}, streams 0..{c.eval_seeds - 1}). "
        f"Tilted: t_tilt = −0.2 in groups of {c.tilt_group_size}. `exact` is classic classifier "
        "guidance with the exact noisy classifier ∇ log r_y(x_t) at scale 1: the reference (it "
        "samples the exact class-conditional, which every row is measured against, up to the "
        "discretisation; FD↔exact measures each row against its samples directly). Wall time: "
        + f"{seconds:.1f} s.",
        "",
        "Columns: the row's strength (γ for EluCD's objectives, the swept strength for the "
        "training-free family), target-class accuracy (Bayes label of the sample), mean per-class "
        "Fréchet distance to the exact class-conditional (lower is better) and its standard "
        "deviation over the seeds, mean per-class FD to the `exact` row's samples on the same "
        "seeds and targets, precision/recall (k = 3) against exact target samples (means "
        "over the seeds), integral ECE of the classifier on x̂0 along the trajectory, "
        "mean fraction of samples whose guidance has vanished (‖∇S‖ below the threshold stated "
        "per world; the family's ∇S is its own gradient: through the denoiser for DPS, FreeDoM, "
        "UGD and TFG's ρ part), largest tilt weight (these three on the first seed); network "
        "evaluations per sample, forward/backward, of the ε-network and of the guiding "
        "classifier (`exact`: the noisy one), counted by wrappers during the evaluation runs; CPU "
        "milliseconds per sample of the sampler calls (one thread, the trajectory recorders' time "
        "excluded). EluCD's objectives sample in one call per seed: each row is charged an equal "
        "share of that call's evaluations and CPU time.",
        "",
        "Training-free family (objective `logsoftmax`, TFG's log p(y | x̂0); its rows differ "
        "from the `logsoftmax` row only in the update rule): "
        + "; ".join(f"`{name}`: {row.about}" for name, row in FAMILY.items())
        + f". Each row's strength is chosen by its own sweep over [{_grid(c.strength_grid)}] on "
        f"validation seed {c.validation_seed} ({c.family_sweep_samples_per_class} samples per "
        "class, every strength in one sampler call), by the mean per-class FD. TFG's own "
        "three-dimensional beam search over (ρ̄, μ̄, γ̄) is not run.",
    ]


def _grid(grid: Any) -> str:
    return ", ".join(f"{g:g}" for g in grid)


def _family_text(w: dict[str, Any]) -> list[str]:
    sweeps = w.get("family_sweeps", {})
    if not sweeps:
        return []
    chosen = ", ".join(
        f"{name} {s['chosen']:g}" + (" (at the grid's edge)" if s["at_edge"] else "")
        for name, s in sweeps.items()
    )
    return ["", f"Family strengths chosen by the sweeps: {chosen}."]


def report(
    worlds: list[dict[str, Any]], config: DemoConfig, seconds: float, plots: list[str]
) -> str:
    c = config
    parts = [
        "# fguide demo: guidance methods in the exact Gaussian-mixture world",
        "",
        *_settings_text(c, seconds),
    ]
    for w in worlds:
        sweep = w["scale_sweep"]
        fds = ", ".join(f"{v:.3f}" for v in sweep["frechet_mean"])
        best = min(
            (n for n in w["methods"] if n not in ("none", "exact")),
            key=lambda n: w["methods"][n]["frechet_mean"],
            default=None,
        )
        parts += [
            "",
            f"## d = {w['dim']}",
            "",
            f"Guidance scale γ = {w['guidance_scale']:g}, chosen by a sweep of the EluCD base "
            f"method over [{_grid(sweep['grid'])}] on validation seed {c.validation_seed} "
            f"(mean per-class FD: {fds}). Vanishing threshold: ‖∇S‖ < "
            f"{w['vanish_threshold']:.3g}.",
            *_family_text(w),
            "",
            markdown_table(w),
        ]
        if best is not None:
            parts += [
                "",
                f"Lowest Fréchet distance among the guidance methods: **{best}** "
                f"({w['methods'][best]['frechet_mean']:.4f}).",
            ]
    parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"
