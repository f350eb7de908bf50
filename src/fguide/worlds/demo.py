"""``fguide demo``: every guidance method in the Gaussian-mixture world, measured exactly.

For each world (K classes on a circle in R^d) the demo samples with DDPM and the exact
denoiser, guided by the overconfident Bayes classifier on x̂0 with each objective, or by each
training-free method (:mod:`fguide.worlds.demo_family`), and measures target accuracy, the
per-class Fréchet distance to the exact class-conditional, precision and recall (k = 3)
against exact samples, and per-step classifier confidence, guidance-gradient norm and the
fraction of samples whose guidance has vanished (the paper's Figure 1), with each row's network
evaluations and CPU time per sample. The guidance scale γ is chosen once per world by a sweep
of the EluCD base method on a validation seed (METHODS.md §8); every EluCD objective then uses
that γ. Each family method's strength is chosen by its own sweep on the validation seed. Rows
are measured on ``eval_seeds`` evaluation seeds. The outputs: :mod:`fguide.worlds.demo_report`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fguide import rng
from fguide.diagnostics import TrajectoryRecorder
from fguide.guidance import ClassifierGuide
from fguide.metrics.precision_recall import precision_recall
from fguide.objectives import Objective, objective
from fguide.samplers import StepRecord, ddpm
from fguide.schedules import make_process
from fguide.training_free_step import GuidanceMethod
from fguide.worlds.demo_family import FAMILY, STRENGTH_GRID, Cost, Counted, family_method
from fguide.worlds.gmm import (
    BayesClassifier,
    ExactEpsModel,
    GaussianMixture,
    NoisyBayesClassifier,
    frechet_between,
)
from fguide.worlds.method_batch import MethodBatchGuide, split_callback, tiled_noise
from fguide.worlds.workers import job_pool

__all__ = [
    "METHOD_NAMES",
    "DemoConfig",
    "DemoRun",
    "method_objectives",
    "run_demo",
    "run_part",
    "run_world",
    "world_parts",
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
    *FAMILY,
    "exact",
)
"""Every row of the demo: ``none``, EluCD's x̂0 objectives, the training-free family
(:data:`~fguide.worlds.demo_family.FAMILY`) and ``exact`` (the ground truth)."""


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
    eval_seeds: int = 3
    """Evaluation seeds: streams 0..n−1 of ``seed`` (stream 0 is the seed's own)."""
    strength_grid: tuple[float, ...] = STRENGTH_GRID
    """Each family row's strength sweep (one sampler call per row and world)."""
    family_sweep_samples_per_class: int = 25
    """The family sweeps' samples per class (cut from 100 to keep the demo within 60 s)."""

    @classmethod
    def quick(cls, **kw: Any) -> DemoConfig:
        """A small, fast configuration for tests and smoke runs."""
        base: dict[str, Any] = dict(
            dims=(2,),
            samples_per_class=40,
            steps=25,
            sweep_samples_per_class=30,
            scale_grid=(2.0**-5, 2.0**-3, 2.0**-1),
            eval_seeds=2,
            strength_grid=tuple(0.25 * 4.0**j for j in range(-6, 2)),
            family_sweep_samples_per_class=10,
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
    strength: float | None = None
    """The row's strength: γ for EluCD's objectives, the swept one for the family."""
    frechet_sd: float | None = None
    frechet_to_exact: float | None = None
    """Mean per-class FD to ``exact``'s samples on the same seeds (set with ``exact``)."""
    """Standard deviation of the mean per-class FD over the evaluation seeds."""
    per_seed: dict[str, list[float]] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    """Per sample: network evaluations and CPU seconds (:meth:`Cost.per_sample`)."""
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
        # the samplers see counting wrappers (each row's network evaluations); recorders and
        # metrics use the classifier itself
        self.model = Counted(ExactEpsModel(self.mixture, full["alphas_cumprod"]))
        self.classifier = BayesClassifier(self.mixture, c.sharpness)
        self.guide_classifier = Counted(self.classifier)
        self.noisy_classifier = Counted(NoisyBayesClassifier(self.mixture, full["alphas_cumprod"]))
        # pull of a maximally uncertain classifier across one radius: the gradient's natural unit
        self.vanish_threshold = c.vanish_tol * c.sharpness * c.radius / c.s**2

    def labels(self, per_class: int, seed: int, repeat: int = 0) -> Tensor:
        """Class-balanced targets in a seeded random order (so tilt groups mix classes);
        ``repeat`` r > 0: the r-th further evaluation seed's (r = 0 is the seed's own)."""
        return _labels(self.mixture.num_classes, per_class, seed, repeat)

    def sample(
        self,
        method: str,
        obj: Objective | None,
        scale: float,
        labels: Tensor,
        seed: int,
        callback: Callable[[StepRecord], None] | None = None,
        repeat: int = 0,
    ) -> Tensor:
        """One method's samples: ``none``, ``exact``, an x̂0 objective at γ = ``scale`` (the demo
        batches those: :meth:`sample_blocks`) or a family row at strength ``scale``."""
        gen = rng.generator(seed, rng.DEMO_NOISE, repeat)
        z = torch.randn(len(labels), self.mixture.dim, generator=gen, dtype=torch.float64)

        def noise(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=gen, dtype=like.dtype)

        guide: ClassifierGuide | GuidanceMethod | None = None
        sine = self.config.sine_factor
        if method == "exact":
            assert obj is not None
            guide = ClassifierGuide(self.noisy_classifier, obj, 1.0, input="xt", time_aware=True)
            sine = 0.0  # classic classifier guidance: μ' = μ + Σ ∇ log r_y(x_t)
        elif method in FAMILY:
            guide = family_method(method, self.guide_classifier, scale)
        elif obj is not None:
            guide = ClassifierGuide(self.guide_classifier, obj, scale)
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
        repeat: int = 0,
    ) -> Tensor:
        """Samples [len(objectives), n, d] of the x̂0 methods ``objectives`` (None: unguided) in
        one sampler call; block i is what :meth:`sample` gives that method alone, to round-off
        (same noise, same per-block tilt groups; :mod:`fguide.worlds.method_batch`)."""
        m, n, d = len(objectives), len(labels), self.mixture.dim
        gen = rng.generator(seed, rng.DEMO_NOISE, repeat)
        z = torch.randn(n, d, generator=gen, dtype=torch.float64).repeat(m, 1)
        guide = MethodBatchGuide(self.guide_classifier, objectives, n, scale, gains)
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

    def sample_family(self, name: str, gains: Sequence[float], labels: Tensor, seed: int) -> Tensor:
        """Samples [len(gains), n, d] of family row ``name`` at each strength of ``gains`` in
        one sampler call (the method's per-sample ``gains``; the same noise in every block)."""
        m, n, d = len(gains), len(labels), self.mixture.dim
        gen = rng.generator(seed, rng.DEMO_NOISE)
        z = torch.randn(n, d, generator=gen, dtype=torch.float64).repeat(m, 1)
        per_row = torch.tensor(gains, dtype=torch.float64).repeat_interleave(n)
        x = ddpm(
            self.model,
            z,
            self.process,
            labels=labels.repeat(m),
            guide=family_method(name, self.guide_classifier, 1.0, per_row),
            noise=tiled_noise(gen, n, m, torch.float64),
            clip_denoised=False,
        )
        return x.reshape(m, n, d)

    def frechet(self, x: Tensor, labels: Tensor) -> list[float]:
        return [
            self.mixture.frechet_to_class(x[labels == k], k)
            for k in range(self.mixture.num_classes)
        ]

    def _sweep_result(self, grid: Sequence[float], x: Tensor, labels: Tensor) -> dict[str, Any]:
        scores = [float(np.mean(self.frechet(xi, labels))) for xi in x]
        best = int(np.nanargmin(scores))
        edge = best in (0, len(grid) - 1) and len(grid) > 1
        return {"grid": list(grid), "frechet_mean": scores, "chosen": grid[best], "at_edge": edge}

    def sweep(self) -> dict[str, Any]:
        """Mean per-class Fréchet distance of EluCD base guidance over the scale grid (every
        scale in one sampler call: the gains of :meth:`sample_blocks`)."""
        c = self.config
        labels = self.labels(c.sweep_samples_per_class, c.validation_seed)
        grid = c.scale_grid
        x = self.sample_blocks(
            [objective("base")] * len(grid), labels, c.validation_seed, 1.0, grid
        )
        return self._sweep_result(grid, x, labels)

    def sweep_family(self, name: str) -> dict[str, Any]:
        """:meth:`sweep` for family row ``name`` over ``strength_grid`` (one sampler call, with
        ``family_sweep_samples_per_class`` samples per class on the validation seed)."""
        c = self.config
        labels = self.labels(c.family_sweep_samples_per_class, c.validation_seed)
        x = self.sample_family(name, c.strength_grid, labels, c.validation_seed)
        return self._sweep_result(c.strength_grid, x, labels)

    def evaluate(
        self, names: Sequence[str], scale: float, strengths: Mapping[str, float] | None = None
    ) -> dict[str, tuple[MethodResult, list[Tensor]]]:
        """Every row's result over the evaluation seeds, and its samples on each seed.

        Per seed: the x̂0 objectives in one sampler call (each row costs its share: the
        call's network rows and CPU time divided equally among its rows), ``none``,
        ``exact`` and each family row (at ``strengths[name]``) in their own calls.
        Accuracy, FD, precision and recall are means over the seeds; the trajectory
        statistics (ECE, vanished, tilt weight, curves) are the first seed's."""
        c = self.config
        strengths = dict(strengths or {})
        objs = method_objectives(c.tilt_group_size)
        # a guided x̂0 method's recorder reads the guide's own logits, which are this
        # classifier's on x̂0 already; the others apply the classifier to x̂0 themselves
        recorders = {
            name: TrajectoryRecorder(vanish_threshold=self.vanish_threshold)
            if _batched(name)
            else TrajectoryRecorder(torch.empty(0), self.classifier, self.vanish_threshold)
            for name in names
        }
        costs = {name: Cost() for name in names}
        per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        seeds: dict[str, list[Tensor]] = {name: [] for name in names}
        for r in range(c.eval_seeds):
            labels = self.labels(c.samples_per_class, c.seed, r)
            for rec in recorders.values():
                if rec.classifier is not None:
                    rec.labels = labels
            # the trajectory statistics come from the first seed: 2000 samples a row
            # measure them well, and recording costs a third of a cheap row's sampling
            recs = recorders if r == 0 else {}
            xs = self._sample_seed(names, objs, scale, strengths, labels, r, recs, costs)
            ref = self.mixture.sample(labels, rng.generator(c.seed, rng.DEMO_REFERENCE, r))
            for name in names:
                per_seed[name].append(self._measure(xs[name], labels, ref))
                seeds[name].append(xs[name])
        out = {}
        for name in names:
            strength = 1.0 if name == "exact" else strengths.get(name, scale)
            res = _result(name, per_seed[name], recorders[name], costs[name])
            res.strength = None if name == "none" else strength
            out[name] = (res, seeds[name])
        return out

    def _sample_seed(
        self,
        names: Sequence[str],
        objs: Mapping[str, Objective | None],
        scale: float,
        strengths: Mapping[str, float],
        labels: Tensor,
        repeat: int,
        recorders: Mapping[str, TrajectoryRecorder],
        costs: dict[str, Cost],
    ) -> dict[str, Tensor]:
        """One evaluation seed's samples of every row, each call's cost added to its rows'."""
        seed, n = self.config.seed, len(labels)
        xs: dict[str, Tensor] = {}
        batched = [name for name in names if _batched(name)]
        if batched:
            cost = Cost()
            with cost.measure((self.model, self.guide_classifier), n * len(batched)):
                x = self.sample_blocks(
                    [objs[m] for m in batched],
                    labels,
                    seed,
                    scale,
                    callbacks=[cost.excluding(recorders.get(m)) for m in batched]
                    if recorders
                    else None,
                    repeat=repeat,
                )
            for m, xm in zip(batched, x, strict=True):
                xs[m] = xm
                costs[m] += cost.share(n, n * len(batched))
        for name in names:
            if name in xs:
                continue
            cost = costs[name]
            clf = self.noisy_classifier if name == "exact" else self.guide_classifier
            rec = cost.excluding(recorders.get(name))
            with cost.measure((self.model, clf), n):
                xs[name] = self.sample(
                    name, objs.get(name), strengths.get(name, scale), labels, seed, rec, repeat
                )
        return xs

    def _measure(self, x: Tensor, labels: Tensor, ref: Tensor) -> dict[str, Any]:
        """One seed's accuracy, per-class FD, precision and recall (k = 3, against ``ref``)."""
        pr = precision_recall(ref, x, k=3, mode="float64")
        fd = self.frechet(x, labels)
        acc = float((self.mixture.bayes_labels(x) == labels).double().mean())
        return {
            "accuracy": acc,
            "frechet_mean": float(np.mean(fd)),
            "frechet_per_class": fd,
            "precision": pr.precision,
            "recall": pr.recall,
        }


def _labels(num_classes: int, per_class: int, seed: int, repeat: int) -> Tensor:
    """:meth:`World.labels` (a function of the class count, not of the world)."""
    y = torch.arange(num_classes).repeat_interleave(per_class)
    return y[torch.randperm(len(y), generator=rng.generator(seed, rng.DEMO_LABELS, repeat))]


def _batched(name: str) -> bool:
    """Whether the demo samples row ``name`` in the x̂0 objectives' shared call."""
    return name not in FAMILY and name not in ("none", "exact")


def _result(
    name: str, seeds: list[dict[str, Any]], rec: TrajectoryRecorder, cost: Cost
) -> MethodResult:
    """A row's means over the evaluation seeds, trajectory summary and cost per sample."""

    def mean(key: str) -> float:
        return float(np.mean([s[key] for s in seeds]))

    fds = [s["frechet_mean"] for s in seeds]
    curves = {k: v for k, v in rec.curves().items() if any(x is not None for x in v)}
    summary = rec.summary()
    return MethodResult(
        name=name,
        accuracy=mean("accuracy"),
        frechet_mean=mean("frechet_mean"),
        frechet_per_class=np.mean([s["frechet_per_class"] for s in seeds], axis=0).tolist(),
        precision=mean("precision"),
        recall=mean("recall"),
        integral_ece=summary["integral_ece"],
        vanished_mean=summary["vanished_mean"],
        max_tilt_weight=summary["max_tilt_weight"],
        frechet_sd=float(np.std(fds, ddof=1)) if len(fds) > 1 else None,
        per_seed={
            k: [s[k] for s in seeds] for k in ("accuracy", "frechet_mean", "precision", "recall")
        },
        cost=cost.per_sample(),
        curves=curves,
    )


def world_parts(config: DemoConfig) -> list[tuple[int, tuple[str, ...]]]:
    """The demo's independent jobs (dimension, rows): per world, EluCD's sweep with the rows
    that share its scale (``none``, the x̂0 objectives, ``exact``), and each family row with
    its own sweep; the costliest first, so that workers end together."""
    base = tuple(m for m in config.methods if m not in FAMILY)
    jobs = [
        (d, rows)
        for d in config.dims
        for rows in (base, *((m,) for m in config.methods if m in FAMILY))
    ]

    def cost(job: tuple[int, tuple[str, ...]]) -> float:
        d, rows = job
        row = FAMILY[rows[0]].cost if len(rows) == 1 and rows[0] in FAMILY else 2.0
        return row * (1 + d / 32)  # measured: d = 16 costs about 1.5 times d = 2

    return sorted(jobs, key=lambda job: -cost(job))


def run_part(dim: int, config: DemoConfig, rows: tuple[str, ...]) -> dict[str, Any]:
    """One job of :func:`world_parts`: the sweeps and evaluation of ``rows`` in world ``dim``
    (EluCD's sweep where a row is not of the family). JSON-able results and every
    evaluation seed's samples by row, and the job's CPU seconds (its thread's)."""
    start, c = time.thread_time(), config
    world = World(GaussianMixture.circle(c.num_classes, c.radius, c.s, dim, seed=c.seed), c)
    part: dict[str, Any] = {"family_sweeps": {}, "methods": {}, "samples": {}}
    scale = 1.0
    if any(name not in FAMILY for name in rows) or not rows:
        part["scale_sweep"] = world.sweep()
        scale = part["scale_sweep"]["chosen"]
        part["vanish_threshold"] = world.vanish_threshold
    for name in (m for m in rows if m in FAMILY):
        part["family_sweeps"][name] = world.sweep_family(name)
    strengths = {name: s["chosen"] for name, s in part["family_sweeps"].items()}
    for name, (res, x) in world.evaluate(rows, scale, strengths).items():
        part["methods"][name] = asdict(res)
        part["samples"][name] = x
    part.update(rows=" ".join(rows), cpu_s=time.thread_time() - start)
    return part


def _merge(
    dim: int, c: DemoConfig, parts: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """One world's summary and samples from its parts (rows in ``--methods`` order)."""
    (base,) = [p for p in parts if "scale_sweep" in p]
    methods = {k: v for p in parts for k, v in p["methods"].items()}
    sweeps = {k: v for p in parts for k, v in p["family_sweeps"].items()}
    xs: dict[str, list[Tensor]] = {k: v for p in parts for k, v in p["samples"].items()}
    mixture = GaussianMixture.circle(c.num_classes, c.radius, c.s, dim, c.seed)
    labels = [_labels(c.num_classes, c.samples_per_class, c.seed, r) for r in range(c.eval_seeds)]
    if "exact" in xs:
        _to_exact(mixture, methods, xs, labels)
    summary = {
        "dim": dim,
        "guidance_scale": base["scale_sweep"]["chosen"],
        "scale_sweep": base["scale_sweep"],
        "family_sweeps": {m: sweeps[m] for m in c.methods if m in sweeps},
        "vanish_threshold": base["vanish_threshold"],
        "job_cpu_s": {p["rows"]: p["cpu_s"] for p in parts},
        "methods": {m: methods[m] for m in c.methods},
        "plane": mixture.plane().tolist(),
        "means": mixture.means.tolist(),
    }
    samples = {m: {"x": xs[m][0], "labels": labels[0]} for m in c.methods}
    return summary, samples


def _to_exact(
    mixture: GaussianMixture,
    methods: dict[str, Any],
    xs: Mapping[str, list[Tensor]],
    labels: Sequence[Tensor],
) -> None:
    """Add each row's ``frechet_to_exact``: the mean per-class Fréchet distance between its
    samples and ``exact``'s on the same seed and targets (per seed, and their mean)."""
    classes = range(mixture.num_classes)
    for name, result in methods.items():
        fds = []
        for x, e, y in zip(xs[name], xs["exact"], labels, strict=True):
            fds.append(float(np.mean([frechet_between(x[y == k], e[y == k]) for k in classes])))
        result["per_seed"]["frechet_to_exact"] = fds
        result["frechet_to_exact"] = float(np.mean(fds))


def run_world(
    dim: int,
    config: DemoConfig,
    progress: Callable[[str], None] | None = None,
    on_method: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """Sweep γ and each family row's strength, then run every method in the world of
    dimension ``dim`` (the jobs of :func:`world_parts`, one after another).

    Returns the JSON-able summary and the samples and targets per method.
    """
    parts = []
    for d, rows in world_parts(config):
        if d != dim:
            continue
        if progress:
            progress(f"d={dim}: {', '.join(rows) or 'sweep'}")
        parts.append(run_part(dim, config, rows))
        for _ in rows:
            if on_method:
                on_method()
    return _merge(dim, config, parts)


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
    workers: int = 1,
) -> DemoRun:
    """Every world of ``config``: the jobs of :func:`world_parts`, each on one torch thread,
    in this process (``workers`` = 1; ``progress`` and ``on_method`` called as it goes) or on
    up to ``workers`` processes (``on_method`` as each job ends). The tensors are tiny:
    threads cost more than they bring, and one thread keeps runs bit-stable, so the results
    do not depend on ``workers``. The caller's thread count is restored."""
    if config.sharpness < 1:
        raise ValueError(f"--sharpness must be >= 1 (κ = 1 is calibrated); got {config.sharpness}")
    start = time.perf_counter()
    jobs = world_parts(config)
    workers = max(1, min(workers, len(jobs)))
    with job_pool(workers) as pool:
        if workers == 1:
            done = [run_world(d, config, progress, on_method) for d in config.dims]
        else:
            futures = [(d, rows, pool.submit(run_part, d, config, rows)) for d, rows in jobs]
            parts: dict[int, list[dict[str, Any]]] = {d: [] for d in config.dims}
            for d, rows, future in futures:
                parts[d].append(future.result())
                for _ in rows:
                    if on_method:
                        on_method()
            done = [_merge(d, config, parts[d]) for d in config.dims]
    samples = {d: xs for d, (_, xs) in zip(config.dims, done, strict=True)}
    return DemoRun(config, [w for w, _ in done], samples, time.perf_counter() - start)
