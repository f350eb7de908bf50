"""``fguide demo``: every guidance method in the Gaussian-mixture world, measured exactly.

For each world (K classes on a circle in R^d) the demo samples with DDPM and the exact
denoiser, guided by the overconfident Bayes classifier on x̂0 with each objective, and measures
target accuracy, the per-class Fréchet distance to the exact class-conditional, precision and
recall (k = 3) against exact samples, and per-step classifier confidence, guidance-gradient
norm and the fraction of samples whose guidance has vanished (the paper's Figure 1).
The guidance scale γ is chosen once per world by a sweep of the EluCD base method on a
validation seed (METHODS.md §8); every method then uses that γ.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fguide import rng
from fguide.diagnostics import TrajectoryRecorder
from fguide.guidance import ClassifierGuide
from fguide.io.files import atomic_write_json, atomic_write_text, provenance
from fguide.io.folders import DEMO_FILES, claim_folder
from fguide.metrics.precision_recall import precision_recall
from fguide.objectives import Objective, objective
from fguide.samplers import StepRecord, ddpm
from fguide.schedules import make_process
from fguide.worlds.gmm import BayesClassifier, ExactEpsModel, GaussianMixture, NoisyBayesClassifier
from fguide.worlds.method_batch import MethodBatchGuide, split_callback, tiled_noise

__all__ = [
    "METHOD_NAMES",
    "DemoConfig",
    "DemoRun",
    "markdown_table",
    "method_objectives",
    "report",
    "run_demo",
    "run_world",
    "table",
    "write_demo",
]

METHOD_NAMES = (
    "none",
    "logsoftmax",
    "elucd",
    "entropy",
    "rkl",
    "fkl",
    "js",
    "hellinger",
    "tilted",
    "exact",
)


def method_objectives(tilt_group_size: int | None = 8) -> dict[str, Objective | None]:
    """The demo's methods with the paper's defaults (``none`` and ``exact`` are special).

    Tilting uses groups of ``tilt_group_size`` samples: the mean-one weights can put up to G
    times the gradient on one sample, and with this world's overconfident classifier groups of
    64 or more make that sample's step overshoot (measured; see the README).
    """
    return {
        "none": None,
        "logsoftmax": objective("logsoftmax"),
        "elucd": objective("base"),
        "entropy": objective("entropy"),
        "rkl": objective("rkl"),
        "fkl": objective("fkl"),
        "js": objective("js"),
        "hellinger": objective("hellinger"),
        "tilted": objective("tilted", group_size=tilt_group_size),
        "exact": objective("logsoftmax"),
    }


@dataclass
class DemoConfig:
    """Settings of one demo run (every default is stated in the report)."""

    dims: tuple[int, ...] = (2, 16)
    num_classes: int = 8
    radius: float = 4.0
    s: float = 0.5
    sharpness: float = 8.0
    samples_per_class: int = 250
    steps: int = 100
    noise_schedule: str = "linear"
    sine_factor: float = 0.3
    scale_grid: tuple[float, ...] = tuple(2.0**k for k in range(-8, 3))
    sweep_samples_per_class: int = 100
    seed: int = 0
    validation_seed: int = 1
    vanish_tol: float = 1e-3
    tilt_group_size: int = 8
    methods: tuple[str, ...] = METHOD_NAMES

    @classmethod
    def quick(cls, **kw: Any) -> DemoConfig:
        """A small, fast configuration for tests and smoke runs."""
        base: dict[str, Any] = dict(
            dims=(2,),
            samples_per_class=40,
            steps=25,
            sweep_samples_per_class=30,
            scale_grid=(2.0**-5, 2.0**-3, 2.0**-1),
        )
        base.update(kw)
        return cls(**base)


@dataclass
class MethodResult:
    name: str
    accuracy: float
    frechet_mean: float
    frechet_per_class: list[float]
    precision: float
    recall: float
    integral_ece: float | None
    vanished_mean: float | None
    max_tilt_weight: float | None
    curves: dict[str, list[float | None]] = field(default_factory=dict)


@dataclass
class World:
    mixture: GaussianMixture
    config: DemoConfig

    def __post_init__(self) -> None:
        c = self.config
        self.process = make_process(
            c.noise_schedule, 1000, str(c.steps), variance_type="fixed_small"
        )
        full = make_process(c.noise_schedule, 1000, "")
        self.model = ExactEpsModel(self.mixture, full["alphas_cumprod"])
        self.classifier = BayesClassifier(self.mixture, c.sharpness)
        self.noisy_classifier = NoisyBayesClassifier(self.mixture, full["alphas_cumprod"])
        # pull of a maximally uncertain classifier across one radius: the gradient's natural unit
        self.vanish_threshold = c.vanish_tol * c.sharpness * c.radius / c.s**2

    def labels(self, per_class: int, seed: int) -> Tensor:
        """Class-balanced targets in a seeded random order (so tilt groups mix classes)."""
        y = torch.arange(self.mixture.num_classes).repeat_interleave(per_class)
        return y[torch.randperm(len(y), generator=rng.generator(seed, rng.DEMO_LABELS))]

    def sample(
        self,
        method: str,
        obj: Objective | None,
        scale: float,
        labels: Tensor,
        seed: int,
        callback: Callable[[StepRecord], None] | None = None,
    ) -> Tensor:
        """One method's samples (the demo batches all but ``exact``: :meth:`sample_blocks`)."""
        gen = rng.generator(seed, rng.DEMO_NOISE)
        z = torch.randn(len(labels), self.mixture.dim, generator=gen, dtype=torch.float64)

        def noise(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=gen, dtype=like.dtype)

        guide = None
        sine = self.config.sine_factor
        if method == "exact":
            assert obj is not None
            guide = ClassifierGuide(self.noisy_classifier, obj, 1.0, input="xt", time_aware=True)
            sine = 0.0  # classic classifier guidance: μ' = μ + Σ ∇ log r_y(x_t)
        elif obj is not None:
            guide = ClassifierGuide(self.classifier, obj, scale)
        return ddpm(
            self.model,
            z,
            self.process,
            labels=labels,
            guide=guide,
            noise=noise,
            callback=callback,
            clip_denoised=False,
            sine_factor=sine,
        )

    def sample_blocks(
        self,
        objectives: Sequence[Objective | None],
        labels: Tensor,
        seed: int,
        scale: float = 1.0,
        gains: Sequence[float] | None = None,
        callbacks: Sequence[Callable[[StepRecord], None] | None] | None = None,
    ) -> Tensor:
        """Samples [len(objectives), n, d] of the x̂0 methods ``objectives`` (None: unguided) in
        one sampler call; block i is what :meth:`sample` gives that method alone, to round-off
        (same noise, same per-block tilt groups; :mod:`fguide.worlds.method_batch`)."""
        m, n, d = len(objectives), len(labels), self.mixture.dim
        gen = rng.generator(seed, rng.DEMO_NOISE)
        z = torch.randn(n, d, generator=gen, dtype=torch.float64).repeat(m, 1)
        guide = MethodBatchGuide(self.classifier, objectives, n, scale, gains)
        x = ddpm(
            self.model,
            z,
            self.process,
            labels=labels.repeat(m),
            guide=guide,
            noise=tiled_noise(gen, n, m, torch.float64),
            callback=split_callback(guide, n, callbacks) if callbacks else None,
            clip_denoised=False,
            sine_factor=self.config.sine_factor,
        )
        return x.reshape(m, n, d)

    def frechet(self, x: Tensor, labels: Tensor) -> list[float]:
        return [
            self.mixture.frechet_to_class(x[labels == k], k)
            for k in range(self.mixture.num_classes)
        ]

    def sweep(self) -> dict[str, Any]:
        """Mean per-class Fréchet distance of EluCD base guidance over the scale grid (every
        scale in one sampler call: the gains of :meth:`sample_blocks`)."""
        c = self.config
        labels = self.labels(c.sweep_samples_per_class, c.validation_seed)
        grid = c.scale_grid
        x = self.sample_blocks(
            [objective("base")] * len(grid), labels, c.validation_seed, 1.0, grid
        )
        scores = [float(np.mean(self.frechet(xi, labels))) for xi in x]
        best = int(np.nanargmin(scores))
        return {"grid": list(grid), "frechet_mean": scores, "chosen": grid[best]}

    def evaluate(
        self, methods: dict[str, Objective | None], scale: float
    ) -> dict[str, tuple[MethodResult, Tensor]]:
        """Every method's result and samples (on this world's targets, see :meth:`labels`):
        the x̂0 methods and ``none`` in one sampler call, ``exact`` (another guide, no sine
        boost) alone."""
        c = self.config
        labels = self.labels(c.samples_per_class, c.seed)
        # a guided x̂0 method's recorder reads the guide's own logits, which are this
        # classifier's on x̂0 already; the others apply the classifier to x̂0 themselves
        recorders = {
            name: TrajectoryRecorder(vanish_threshold=self.vanish_threshold)
            if name != "exact" and methods[name] is not None
            else TrajectoryRecorder(labels, self.classifier, self.vanish_threshold)
            for name in methods
        }
        batched = [name for name in methods if name != "exact"]
        xs: dict[str, Tensor] = {}
        if batched:
            x = self.sample_blocks(
                [methods[m] for m in batched],
                labels,
                c.seed,
                scale,
                callbacks=[recorders[m] for m in batched],
            )
            xs.update(zip(batched, x, strict=True))
        if "exact" in methods:
            xs["exact"] = self.sample(
                "exact", methods["exact"], scale, labels, c.seed, recorders["exact"]
            )
        ref = self.mixture.sample(labels, rng.generator(c.seed, rng.DEMO_REFERENCE))
        return {
            name: (self._measure(name, xs[name], labels, ref, recorders[name]), xs[name])
            for name in methods
        }

    def _measure(
        self, name: str, x: Tensor, labels: Tensor, ref: Tensor, rec: TrajectoryRecorder
    ) -> MethodResult:
        pr = precision_recall(ref, x, k=3, mode="float64")
        fd = self.frechet(x, labels)
        acc = float((self.mixture.bayes_labels(x) == labels).double().mean())
        curves = {k: v for k, v in rec.curves().items() if any(x is not None for x in v)}
        summary = rec.summary()
        return MethodResult(
            name=name,
            accuracy=acc,
            frechet_mean=float(np.mean(fd)),
            frechet_per_class=fd,
            precision=pr.precision,
            recall=pr.recall,
            integral_ece=summary["integral_ece"],
            vanished_mean=summary["vanished_mean"],
            max_tilt_weight=summary["max_tilt_weight"],
            curves=curves,
        )


def run_world(
    dim: int,
    config: DemoConfig,
    progress: Callable[[str], None] | None = None,
    on_method: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """Sweep γ, then run every method in the world of dimension ``dim``.

    Returns the JSON-able summary and the samples and targets per method.
    """
    c = config
    world = World(GaussianMixture.circle(c.num_classes, c.radius, c.s, dim, seed=c.seed), c)
    sweep = world.sweep()
    scale = sweep["chosen"]
    objs = method_objectives(c.tilt_group_size)
    if progress:
        progress(f"d={dim}")
    evaluated = world.evaluate({name: objs[name] for name in c.methods}, scale)
    labels = world.labels(c.samples_per_class, c.seed)
    results: dict[str, Any] = {}
    samples: dict[str, dict[str, Tensor]] = {}
    for name, (res, x) in evaluated.items():
        results[name] = asdict(res)
        samples[name] = {"x": x, "labels": labels}
        if on_method:
            on_method()
    summary = {
        "dim": dim,
        "guidance_scale": scale,
        "scale_sweep": sweep,
        "vanish_threshold": world.vanish_threshold,
        "methods": results,
        "plane": world.mixture.plane().tolist(),
        "means": world.mixture.means.tolist(),
    }
    return summary, samples


# -- the whole demo ----------------------------------------------------------------------------


@dataclass
class DemoRun:
    """The demo's outcome: per-world summaries, the samples per world and method, wall time."""

    config: DemoConfig
    worlds: list[dict[str, Any]]
    samples: dict[int, dict[str, dict[str, Tensor]]]
    seconds: float


def run_demo(
    config: DemoConfig,
    progress: Callable[[str], None] | None = None,
    on_method: Callable[[], None] | None = None,
) -> DemoRun:
    """:func:`run_world` for every dimension of ``config``, on one thread.

    The tensors are tiny: threads cost more than they bring, and one thread keeps runs
    bit-stable. The caller's thread count is restored.
    """
    if config.sharpness < 1:
        raise ValueError(f"--sharpness must be >= 1 (κ = 1 is calibrated); got {config.sharpness}")
    start = time.perf_counter()
    worlds, samples = [], {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for d in config.dims:
            summary, xs = run_world(d, config, progress=progress, on_method=on_method)
            worlds.append(summary)
            samples[d] = xs
    finally:
        torch.set_num_threads(threads)
    return DemoRun(config, worlds, samples, time.perf_counter() - start)


def write_demo(run: DemoRun, out: str | os.PathLike[str]) -> list[Path]:
    """Write ``results.json``, ``report.md`` and the figures into ``out``; returns the files."""
    from fguide.plots import plot_demo

    out = Path(out)
    claim_folder(out, "demo", DEMO_FILES["demo"], hold=False)  # refuses others' files
    c = run.config
    plots = plot_demo(run.worlds, run.samples, out)
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


# -- tables and the report ---------------------------------------------------------------------

COLUMNS = (
    ("accuracy", "acc", "{:.3f}"),
    ("frechet_mean", "FD", "{:.4f}"),
    ("precision", "P", "{:.3f}"),
    ("recall", "R", "{:.3f}"),
    ("integral_ece", "ECE", "{:.3f}"),
    ("vanished_mean", "vanished", "{:.3f}"),
    ("max_tilt_weight", "max w", "{:.2f}"),
)


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else spec.format(value)


def table(summary: dict[str, Any]) -> str:
    """A fixed-width table of one world's results."""
    header = f"{'method':<11}" + "".join(f"{h:>10}" for _, h, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for name, r in summary["methods"].items():
        lines.append(f"{name:<11}" + "".join(f"{_fmt(r[k], s):>10}" for k, _, s in COLUMNS))
    return "\n".join(lines)


def markdown_table(summary: dict[str, Any]) -> str:
    head = "| method | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    rows = [
        f"| {name} | " + " | ".join(_fmt(r[k], s) for k, _, s in COLUMNS) + " |"
        for name, r in summary["methods"].items()
    ]
    return "\n".join([head, sep, *rows])


def report(
    worlds: list[dict[str, Any]], config: DemoConfig, seconds: float, plots: list[str]
) -> str:
    c = config
    parts = [
        "# fguide demo: guidance methods in the exact Gaussian-mixture world",
        "",
        f"K = {c.num_classes} classes on a circle of radius {c.radius}, class spread s = {c.s}, "
        f"off-the-shelf classifier = Bayes classifier sharpened by κ = {c.sharpness}, applied to "
        f"x̂0. DDPM with the exact denoiser, {c.steps} steps respaced from 1000 "
        f"({c.noise_schedule} betas, fixed-small variance), EluCD sine boost γ_sine = "
        f"{c.sine_factor}; {c.samples_per_class} samples per class, seed {c.seed}. "
        f"Tilted: t_tilt = −0.2 in groups of {c.tilt_group_size}. `exact` is classic classifier "
        "guidance with the exact noisy classifier ∇ log r_y(x_t) at scale 1 (a reference, not a "
        "method). Wall time: " + f"{seconds:.1f} s.",
        "",
        "Columns: target-class accuracy (Bayes label of the sample), mean per-class Fréchet "
        "distance to the exact class-conditional (lower is better), precision/recall (k = 3) "
        "against exact target samples, integral ECE of the classifier on x̂0 along the "
        "trajectory, mean fraction of samples whose guidance has vanished "
        "(‖∇S‖ below the threshold stated per world), largest tilt weight.",
    ]
    for w in worlds:
        sweep = w["scale_sweep"]
        grid = ", ".join(f"{g:g}" for g in sweep["grid"])
        fds = ", ".join(f"{v:.3f}" for v in sweep["frechet_mean"])
        best = min(
            (n for n in w["methods"] if n not in ("none", "exact")),
            key=lambda n: w["methods"][n]["frechet_mean"],
        )
        parts += [
            "",
            f"## d = {w['dim']}",
            "",
            f"Guidance scale γ = {w['guidance_scale']:g}, chosen by a sweep of the EluCD base "
            f"method over [{grid}] on validation seed {c.validation_seed} "
            f"(mean per-class FD: {fds}). Vanishing threshold: ‖∇S‖ < "
            f"{w['vanish_threshold']:.3g}.",
            "",
            markdown_table(w),
            "",
            f"Lowest Fréchet distance among the guidance methods: **{best}** "
            f"({w['methods'][best]['frechet_mean']:.4f}).",
        ]
    parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"
