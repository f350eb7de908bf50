"""The training-free family's rows in the Gaussian-mixture demo: strength 0 is ``none``, each
row is the method run directly through the sampler, its sweep is the methods at each strength,
and the evaluation counts and the ``--methods`` selection are what they claim."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tolerances
import torch

import fguide
from fguide import rng
from fguide import training_free as tf
from fguide.cli.main import main
from fguide.objectives import objective
from fguide.schedules import make_process
from fguide.worlds import demo_family
from fguide.worlds.demo import DemoConfig, World
from fguide.worlds.gmm import BayesClassifier, ExactEpsModel, GaussianMixture
from fguide.worlds.workers import one_thread

STEPS = 12
# the rows without recurrence: with K > 1 a step's time-travel draws more noise than the
# unguided sampler's one draw a step, so at strength 0 they are another (exact) unguided sampler
SINGLE = ("dps", "freedom", "mpgd", "ugd", "tfg")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The demo's tensors are tiny: it runs torch on one thread (so do these tests, which
    would otherwise spend their time in thread hand-offs on a busy machine)."""
    with one_thread():
        yield


def _world(dim: int = 2, **kw: Any) -> World:
    c = DemoConfig(dims=(dim,), steps=STEPS, samples_per_class=3, **kw)
    return World(GaussianMixture.circle(dim=dim, seed=c.seed), c)


@pytest.mark.parametrize("dim", [2, 16])
def test_each_family_row_at_strength_zero_is_the_none_row_bit_for_bit(dim: int) -> None:
    world = _world(dim, eval_seeds=2)
    names = ["none", *SINGLE]
    out = world.evaluate(names, 0.1, {name: 0.0 for name in SINGLE})
    none = out["none"][0]
    for name in SINGLE:
        for x, x_none in zip(out[name][1], out["none"][1], strict=True):  # every seed
            assert torch.equal(x, x_none), name
        assert out[name][0].per_seed == none.per_seed, name
    # and at a strength that guides, the rows are not ``none``
    moved = world.evaluate(["none", *SINGLE], 0.1, {name: 1e-3 for name in SINGLE})
    for name in SINGLE:
        assert not torch.equal(moved[name][1][0], moved["none"][1][0]), name


def _direct(name: str, strength: float, world: World, repeat: int) -> tuple[torch.Tensor, Any]:
    """Row ``name`` on evaluation seed ``repeat``, built here from the sampler and the methods
    (not through the demo's World): the world's exact networks made anew, the method's
    hyper-parameters spelled out, the seed streams drawn here."""
    c = world.config
    mix = GaussianMixture.circle(c.num_classes, c.radius, c.s, world.mixture.dim, seed=c.seed)
    abar = make_process(c.noise_schedule, 1000, "")["alphas_cumprod"]
    eps = ExactEpsModel(mix, abar)
    clf = BayesClassifier(mix, c.sharpness)
    obj = objective("logsoftmax")
    method = {
        "dps": lambda: tf.DPS(clf, obj, scale=strength),
        "ugd_k3m3": lambda: tf.UGD(clf, obj, scale=strength, recurrence=3, backward_steps=3),
        "freedom_k10": lambda: tf.FreeDoM(
            clf, obj, scale=strength, recurrence=10, window=(500, 800)
        ),
        "tfg": lambda: tf.TFG(clf, obj, rho=strength, mu=strength / 4, gamma=1e-3),
    }[name]()
    y = torch.arange(c.num_classes).repeat_interleave(c.samples_per_class)
    y = y[torch.randperm(len(y), generator=rng.generator(c.seed, rng.DEMO_LABELS, repeat))]
    gen = rng.generator(c.seed, rng.DEMO_NOISE, repeat)
    z = torch.randn(len(y), mix.dim, generator=gen, dtype=torch.float64)
    process = make_process(c.noise_schedule, 1000, str(c.steps), variance_type="fixed_small")
    x = fguide.ddpm(
        eps,
        z,
        process,
        labels=y,
        guide=method,
        noise=lambda like: torch.randn(like.shape, generator=gen, dtype=like.dtype),
        clip_denoised=False,
    )
    return x, y


@pytest.mark.parametrize("name", ["dps", "ugd_k3m3", "freedom_k10", "tfg"])
def test_a_family_row_is_the_method_run_directly_through_the_sampler(name: str) -> None:
    world = _world(16, eval_seeds=2)
    strength = 0.01
    (res, xs), *_ = world.evaluate([name], 0.5, {name: strength}).values()
    assert res.strength == strength
    for r in (0, 1):  # every evaluation seed is that seed's direct run, and measured on it
        direct, y = _direct(name, strength, world, r)
        # the same operations on the same inputs in the same order: the same bits
        assert torch.equal(xs[r], direct)
        assert res.per_seed["frechet_mean"][r] == float(np.mean(world.frechet(direct, y)))
    assert res.per_seed["frechet_mean"][0] != res.per_seed["frechet_mean"][1]


def test_the_family_sweep_measures_each_strength_as_the_method_alone() -> None:
    grid = (1e-3, 1e-2, 0.1)
    world = _world(2, strength_grid=grid, family_sweep_samples_per_class=3)
    c = world.config
    labels = world.labels(c.family_sweep_samples_per_class, c.validation_seed)
    for name in ("freedom", "tfg"):
        sweep = world.sweep_family(name)
        alone = [
            float(
                np.mean(
                    world.frechet(world.sample(name, None, g, labels, c.validation_seed), labels)
                )
            )
            for g in grid
        ]
        # per-sample gains against the strength itself: g·(Jᵀc) against Jᵀ(g c), grown over
        # the steps; a wrong gain or noise is off by orders of magnitude more
        np.testing.assert_allclose(sweep["frechet_mean"], alone, rtol=1e-9)
        assert sweep["chosen"] == grid[int(np.argmin(alone))]
        assert sweep["at_edge"] == (int(np.argmin(alone)) in (0, len(grid) - 1))


class _Rows:
    """Counts the rows entering the exact ε-model and the Bayes classifier (patched on their
    classes: whatever wrapper the demo puts around them), with and without a graph."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.eps = self.eps_grad = self.clf_grad = 0
        eps_call, clf_forward = ExactEpsModel.__call__, BayesClassifier.forward

        def eps(model: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
            self.eps += x.shape[0]
            self.eps_grad += x.shape[0] if x.requires_grad else 0
            return eps_call(model, x, *args)

        def clf(model: Any, x: torch.Tensor) -> torch.Tensor:
            # the guidance's classifier calls keep a graph; the recorders' run without one
            self.clf_grad += x.shape[0] if torch.is_grad_enabled() and x.requires_grad else 0
            return clf_forward(model, x)

        monkeypatch.setattr(ExactEpsModel, "__call__", eps)
        monkeypatch.setattr(BayesClassifier, "forward", clf)


def test_the_evaluation_columns_equal_an_independent_count(monkeypatch: pytest.MonkeyPatch) -> None:
    world = _world(2, eval_seeds=2)
    c = world.config
    samples = c.eval_seeds * c.num_classes * c.samples_per_class
    ts = [int(t) for t in world.process.timestep_map]
    in_window = sum(500 <= t <= 800 for t in ts)
    s = STEPS
    # (ε fwd, ε bwd, classifier fwd = bwd) per sample, from the methods' update rules
    expected = {
        "dps": (s, s, s),
        "mpgd": (s, 0, s),
        "ugd": (s, s, s),
        "ugd_k3m3": (3 * s, 3 * s, 3 * s * (1 + 3)),
        "freedom_k10": (s + 9 * in_window, s + 9 * in_window, s + 9 * in_window),
        "tfg": (s, s, s * (1 + 4)),
        "none": (s, 0, 0),
    }
    assert 0 < in_window < s
    for name, (e, eb, cb) in expected.items():
        rows = _Rows(monkeypatch)
        (res, _), *_ = world.evaluate([name], 0.1, {name: 0.01}).values()
        assert (rows.eps, rows.eps_grad, rows.clf_grad) == (e * samples, eb * samples, cb * samples)
        cost = res.cost
        assert (cost["eps_evals"], cost["eps_backward"]) == (e, eb), name
        assert (cost["classifier_evals"], cost["classifier_backward"]) == (cb, cb), name
        assert cost["nfe"] == e + cb and cost["cpu_s"] > 0
    # EluCD's objectives share one call a seed: each is charged the call's rows over its rows
    rows = _Rows(monkeypatch)
    out = world.evaluate(["elucd", "js", "tilted"], 0.1)
    assert (rows.eps, rows.clf_grad) == (3 * s * samples, 3 * s * samples)
    for res, _ in out.values():
        assert res.cost["eps_evals"] == s and res.cost["classifier_backward"] == s


@pytest.fixture(scope="module")
def selected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--quick", "--methods", "none", "ugd_k3m3", "exact", "--out", str(out)]
    assert main(argv) == 0
    return {"out": out, **json.loads((out / "results.json").read_text())}


def test_methods_selects_a_family_row(selected: dict[str, Any]) -> None:
    (world,) = selected["worlds"]
    assert list(world["methods"]) == ["none", "ugd_k3m3", "exact"]
    assert list(world["family_sweeps"]) == ["ugd_k3m3"]
    sweep = world["family_sweeps"]["ugd_k3m3"]
    assert world["methods"]["ugd_k3m3"]["strength"] == sweep["chosen"]
    assert sweep["grid"] == selected["settings"]["strength_grid"]
    assert world["methods"]["ugd_k3m3"]["cost"]["classifier_evals"] == 4 * 3 * 25
    report = (selected["out"] / "report.md").read_text()
    assert "| ugd_k3m3 |" in report and "| elucd |" not in report
    assert (selected["out"] / "quality_vs_cost.png").stat().st_size > 0


def test_every_family_row_is_a_demo_method() -> None:
    from fguide.worlds.demo import METHOD_NAMES

    assert set(demo_family.FAMILY) <= set(METHOD_NAMES)
    assert METHOD_NAMES[-1] == "exact" and METHOD_NAMES[0] == "none"


def test_the_results_do_not_depend_on_the_workers() -> None:
    """The jobs (per world: EluCD's sweep with its rows; each family row with its sweep) give
    the same results inline and on worker processes, merged in ``--methods`` order."""
    from fguide.worlds.demo import run_demo

    c = DemoConfig.quick(
        dims=(2, 3),
        steps=6,
        samples_per_class=3,
        sweep_samples_per_class=3,
        family_sweep_samples_per_class=3,
        methods=("tfg", "none", "mpgd", "elucd"),
    )
    inline, pooled = run_demo(c, workers=1), run_demo(c, workers=2)
    for a, b in zip(inline.worlds, pooled.worlds, strict=True):
        assert a["dim"] == b["dim"] and list(b["methods"]) == list(c.methods)
        assert a["family_sweeps"] == b["family_sweeps"] and a["scale_sweep"] == b["scale_sweep"]
        for name in c.methods:
            ra, rb = a["methods"][name], b["methods"][name]
            assert ra["per_seed"] == rb["per_seed"] and ra["curves"] == rb["curves"], name
            assert torch.equal(
                inline.samples[a["dim"]][name]["x"], pooled.samples[b["dim"]][name]["x"]
            )


@pytest.mark.parametrize("dim", [2, 16])
def test_frechet_between_is_the_gaussian_fits_distance(dim: int) -> None:
    """Against scipy's matrix square root of C_a C_b (the textbook form), and 0 for a set
    against itself."""
    import scipy.linalg

    from fguide.worlds.gmm import frechet_between

    g = torch.Generator().manual_seed(dim)
    a = torch.randn(300, dim, generator=g, dtype=torch.float64)
    b = (
        0.7
        * torch.randn(200, dim, generator=g, dtype=torch.float64)
        @ torch.randn(dim, dim, generator=g, dtype=torch.float64)
        + 0.3
    )
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    cross = np.trace(scipy.linalg.sqrtm(ca @ cb)).real
    mean2 = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    expected = mean2 + np.trace(ca) + np.trace(cb) - 2 * cross
    # covariances (300 terms), then eigen- and Schur decompositions of d × d matrices: depth
    # ~ 300 + d³, on the scale of the traces
    scale = float(np.trace(ca) + np.trace(cb))
    tolerances.assert_close(
        frechet_between(a, b), expected, torch.float64, 300 + dim**3, scale=scale
    )
    tolerances.assert_close(frechet_between(a, a), 0.0, torch.float64, 300 + dim**3, scale=scale)


def test_each_row_is_measured_against_the_exact_rows_samples() -> None:
    from fguide.worlds.demo import run_demo
    from fguide.worlds.gmm import frechet_between

    c = DemoConfig.quick(steps=6, samples_per_class=4, family_sweep_samples_per_class=3)
    c = dataclasses.replace(c, methods=("none", "mpgd", "exact"), sweep_samples_per_class=3)
    run = run_demo(c)
    (w,) = run.worlds
    xs = run.samples[2]
    y = xs["exact"]["labels"]
    first = [
        float(
            np.mean(
                [frechet_between(xs[m]["x"][y == k], xs["exact"]["x"][y == k]) for k in range(8)]
            )
        )
        for m in c.methods
    ]
    for m, fd in zip(c.methods, first, strict=True):
        r = w["methods"][m]
        assert len(r["per_seed"]["frechet_to_exact"]) == c.eval_seeds
        assert r["per_seed"]["frechet_to_exact"][0] == fd
        assert r["frechet_to_exact"] == float(np.mean(r["per_seed"]["frechet_to_exact"]))
    assert (
        w["methods"]["exact"]["frechet_to_exact"] < 1e-9 < w["methods"]["mpgd"]["frechet_to_exact"]
    )
