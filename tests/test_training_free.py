"""Properties of the training-free methods (fguide.training_free): zero strength is the unguided
sampler bit for bit; one repeat is no recurrence; every gradient is float64 autograd through an
independent path; every objective (tilted, divergences, entropy) reaches the step; in the exact
Gaussian-mixture world every method moves samples toward the target class.

The independent implementations below (``_ref_*``) are written from the update rules of the
module docstring of :mod:`fguide.training_free` with plain autograd of the objective's score
(``Objective.tilted_score``: its gradient is the tilted guidance gradient), not with fguide's
coefficient-VJP code. Tolerances follow :mod:`tolerances`: scale max|x_T| · sqrt(1/ᾱ_t) at the
noisiest step (x̂0's cancellation), depth the rounding stages of every network evaluation
(forward and backward) plus the step formulas.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import tfg_tiny
import tolerances
import torch
from torch import Tensor

import fguide
from fguide import defaults
from fguide import training_free as tf
from fguide.params import ParamError
from fguide.samplers import NonFiniteGuidanceError
from fguide.schedules import Process, make_process

F64 = torch.float64
EPS = tfg_tiny.eps_net(1)
CLS = tfg_tiny.classifier(2)
STEPS = 4
PROC = make_process("linear", 1000, str(STEPS), "fixed_small")
LABELS = torch.tensor([3, 0, 3, 1])
DEPTH_PER_EVAL = 2 * (tolerances.network_depth(EPS) + tolerances.network_depth(CLS)) + 20


def _z(seed: int = 5) -> Tensor:
    return tfg_tiny.noise_draws(seed, 1, len(LABELS))[0]


def _noise(seed: int = 11) -> fguide.SampleNoise:
    return fguide.SampleNoise(seed, range(len(LABELS)))


class _LearnedRange:
    """TinyEps with a learned-range variance channel block v = tanh(x)/2 (ADM's [ε, v])."""

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        return torch.cat([EPS(x, t, labels), torch.tanh(x) / 2], dim=1)


SAMPLERS: dict[str, tuple[Callable[..., Tensor], Any, Process, dict[str, Any]]] = {
    "ddim_eta0": (fguide.ddim, EPS, PROC, {"eta": 0.0}),
    "ddim_eta1": (fguide.ddim, EPS, PROC, {"eta": 1.0}),
    "ddpm": (fguide.ddpm, EPS, PROC, {}),
    "ddpm_learned": (fguide.ddpm, _LearnedRange(), make_process("linear", 1000, str(STEPS)), {}),
}


def _zero(name: str, objective: fguide.Objective) -> tf.GuidanceMethod:
    """Each method at strength zero, with its repeats and inner steps switched on where that
    still leaves the step unguided (UGD's backward steps, TFG's iterations)."""
    return {
        "dps": lambda: tf.DPS(CLS, objective, scale=0.0),
        "freedom": lambda: tf.FreeDoM(CLS, objective, scale=0.0),
        "mpgd": lambda: tf.MPGD(CLS, objective, scale=0.0),
        "ugd": lambda: tf.UGD(CLS, objective, scale=0.0, backward_steps=2),
        "tfg": lambda: tf.TFG(CLS, objective, rho=0.0, mu=0.0, gamma=0.0, iterations=3),
    }[name]()


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("name", list(tf.METHODS))
def test_zero_strength_is_the_unguided_sampler_bit_for_bit(
    name: str, sampler: str, clip: bool
) -> None:
    fn, model, proc, kw = SAMPLERS[sampler]
    common = dict(labels=LABELS, clip_denoised=clip, **kw)
    plain = fn(model, _z(), proc, noise=_noise(), **common)
    guided = fn(model, _z(), proc, noise=_noise(), guide=_zero(name, fguide.objective()), **common)
    assert torch.equal(guided, plain)
    # and a guided run is not the unguided one (the comparison can fail)
    if name != "tfg":
        method = dataclasses.replace(_zero(name, fguide.objective()), scale=0.5)
        moved = fn(model, _z(), proc, noise=_noise(), guide=method, **common)
        assert (moved - plain).abs().max() > 1e-6


# -- independent implementations (plain autograd of the objective's score) -----------------------


def _step_arrays(t: int) -> tuple[Tensor, Tensor, Tensor]:
    s = PROC.tensors("cpu", F64)
    return s.alphas_cumprod[t], s.alphas_cumprod_prev[t], s.timesteps[t]


def _x0_eps(x: Tensor, t: int, clip: bool) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̃) at x, differentiable: x̂0 = (x − sqrt(1−ᾱ) ε)/sqrt(ᾱ), clipped, ε̃ from it."""
    abar, _, tm = _step_arrays(t)
    eps = EPS(x, tm.expand(x.shape[0]))
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
    return x0, (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def _score(obj: fguide.Objective, v: Tensor, progress: float, mc: Tensor | None = None) -> Tensor:
    """Σ_b L_b: the tilted score of the classifier at v (L = log mean_j exp S(v + δ_j) with
    Monte-Carlo offsets)."""
    if mc is None or len(mc) == 1:
        return obj.tilted_score(CLS(v if mc is None else v + mc[0]), LABELS, progress).sum()
    s = torch.stack([obj.score(CLS(v + d), LABELS, progress) for d in mc])
    return (torch.logsumexp(s, dim=0) - math.log(len(mc))).sum()


def _grad_x(obj: fguide.Objective, x: Tensor, t: int, clip: bool, progress: float) -> Tensor:
    """g_x = ∇_{x_t} Σ S(f(x̂0(x_t))) by autograd through the ε-network."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(_score(obj, _x0_eps(x, t, clip)[0], progress), x)
    return g


def _grad_0(obj: fguide.Objective, v: Tensor, progress: float) -> Tensor:
    v = v.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(_score(obj, v, progress), v)
    return g


def _ddim(x: Tensor, x0: Tensor, eps: Tensor, t: int, z: Tensor) -> Tensor:
    """DDIM(η = 1) from a (x̂0, ε) pair (METHODS.md §1)."""
    abar, prev, _ = _step_arrays(t)
    sigma = ((1 - prev) / (1 - abar) * (1 - abar / prev)).sqrt()
    out = prev.sqrt() * x0 + (1 - prev - sigma**2).sqrt() * eps
    return out + sigma * z if t > 0 else out


def _w(t: int) -> float:
    """TFG's ``increase`` weight α_t · n / Σ α."""
    alphas = torch.from_numpy(PROC.alphas_cumprod / PROC.alphas_cumprod_prev)
    return float(alphas[t] * len(alphas) / alphas.sum())


def _ref_step(name: str, m: Any, obj: fguide.Objective, x: Tensor, t: int, z: Tensor) -> Tensor:
    """One step of method ``name`` (one repeat, no Monte-Carlo) from the update rules."""
    clip, u_ = True, (STEPS - 1 - t) / (STEPS - 1)
    abar, prev, _ = _step_arrays(t)
    with torch.no_grad():
        x0, eps = _x0_eps(x, t, clip)
    if name == "dps":
        logits = CLS(x0)
        nll = -torch.log_softmax(logits, -1).gather(-1, LABELS[:, None]).reshape(-1, 1, 1, 1)
        return _ddim(x, x0, eps, t, z) + m.scale * _grad_x(obj, x, t, clip, u_) / nll
    if name == "freedom":
        return _ddim(x, x0, eps, t, z) + m.scale * _w(t) * _grad_x(obj, x, t, clip, u_)
    if name == "mpgd":
        moved = x0 + m.scale * _grad_0(obj, x0, u_)
        return _ddim(x, x0, eps, t, z) + prev.sqrt() * (moved - x0)
    if name == "ugd":
        s, g = m.scale, _grad_x(obj, x, t, clip, u_)
        u = x0
        for _ in range(m.backward_steps):
            u = u + s * _grad_0(obj, u, u_)
        eps_hat = eps - s * (1 - abar).sqrt() * g - (abar / (1 - abar)).sqrt() * (u - x0)
        return _ddim(x, (x - (1 - abar).sqrt() * eps_hat) / abar.sqrt(), eps_hat, t, z)
    assert name == "tfg"
    u = x0
    for _ in range(m.iterations):
        u = u + m.mu * _w(t) * _grad_0(obj, u, u_)
    delta = m.rho * _w(t) * _grad_x(obj, x, t, clip, u_)
    return _ddim(x, x0, eps, t, z) + delta / (abar / prev).sqrt() + prev.sqrt() * (u - x0)


def _method(name: str, obj: fguide.Objective) -> tf.GuidanceMethod:
    return {
        "dps": lambda: tf.DPS(CLS, obj, scale=0.7),
        "freedom": lambda: tf.FreeDoM(CLS, obj, scale=0.4, recurrence=1),
        "mpgd": lambda: tf.MPGD(CLS, obj, scale=0.2),
        "ugd": lambda: tf.UGD(CLS, obj, scale=0.2, recurrence=1, backward_steps=2),
        "tfg": lambda: tf.TFG(
            CLS, obj, rho=0.5, mu=0.3, gamma=0.0, mc_samples=1, recurrence=1, iterations=2
        ),
    }[name]()


OBJECTIVES = {
    "tilted": fguide.objective("tilted", t_tilt=-0.7, group_size=2),
    "js_entropy": fguide.objective("js", entropy=True, lam_max=0.5, lam_min=0.1),
    "hellinger": fguide.objective("hellinger", alpha=0.5),
}


class _Draws:
    """A fixed list of draws served in order (the sampler's and the reference's)."""

    def __init__(self, count: int, seed: int = 3):
        self.z = tfg_tiny.noise_draws(seed, count, len(LABELS))
        self.used = 0

    def __call__(self, like: Tensor) -> Tensor:
        self.used += 1
        return self.z[self.used - 1].clone()


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("name", list(tf.METHODS))
def test_a_run_with_one_repeat_equals_the_independent_steps(name: str, objective: str) -> None:
    # The whole DDIM(η = 1) run, one draw per step (no time-travel draw: one repeat is no
    # recurrence), against the update rules with autograd gradients of the tilted/regularised
    # score: the objective's coefficients (tilt weights, divergence, entropy λ(u)) reach the step.
    obj = OBJECTIVES[objective]
    method = _method(name, obj)
    draws = _Draws(STEPS)
    out = fguide.ddim(EPS, _z(), PROC, labels=LABELS, guide=method, noise=draws, eta=1.0)
    assert draws.used == STEPS
    x = _z()
    for t in range(STEPS - 1, -1, -1):
        x = _ref_step(name, method, obj, x, t, draws.z[STEPS - 1 - t]).detach()
    scale = float(_z().abs().max() / PROC.alphas_cumprod.min() ** 0.5)
    evals = STEPS * (2 + getattr(method, "backward_steps", 0) + getattr(method, "iterations", 0))
    tolerances.assert_close(out, x, F64, depth=evals * DEPTH_PER_EVAL, scale=scale)


def test_the_objective_changes_the_step() -> None:
    # the comparison above could not pass with the objective ignored: the objectives' runs differ
    runs = {
        k: fguide.ddim(EPS, _z(), PROC, labels=LABELS, guide=_method("ugd", o), noise=_Draws(STEPS))
        for k, o in OBJECTIVES.items()
    }
    assert (runs["tilted"] - runs["js_entropy"]).abs().max() > 1e-4
    assert (runs["hellinger"] - runs["js_entropy"]).abs().max() > 1e-4


# -- the gradients themselves ------------------------------------------------------------------


def _context(x: Tensor, t: int, clip: bool, model: Any = EPS) -> tf.StepContext:
    tm = PROC.tensors("cpu", F64).timesteps[t].expand(x.shape[0])

    def update(*_: Any) -> Tensor:
        raise AssertionError("not called")

    return tf.StepContext(
        x, t, tm, LABELS, PROC, clip, lambda v: model(v, tm, LABELS), update, _Draws(1)
    )


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize(
    ("objective", "mc"),  # tilting with M > 1 Monte-Carlo draws is refused (test_validation...)
    [(o, m) for o in ("logsoftmax", "js_entropy", "tilted") for m in (0, 1, 3)][:-1],
)
def test_gradients_equal_autograd_through_an_independent_path(
    objective: str, mc: int, clip: bool
) -> None:
    obj = OBJECTIVES.get(objective) or fguide.objective(objective)
    t = 2
    x = _z(9) * 1.3
    u_ = (STEPS - 1 - t) / (STEPS - 1)
    offsets = None if mc == 0 else 0.05 * tfg_tiny.noise_draws(4, mc, len(LABELS))
    method = tf.TFG(CLS, obj)
    ctx = _context(x, t, clip)
    # g_x: through the ε-network (the methods' "through the denoiser" gradient)
    est, res = method.through_denoiser(ctx, x, mc=offsets)
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(_score(obj, _x0_eps(xr, t, clip)[0], u_, offsets), xr)
    depth = (1 + mc) * DEPTH_PER_EVAL
    # the chain rule through x̂0 = sqrt(1/ᾱ) x − ...: intermediates sqrt(1/ᾱ) times the result
    scale = float(expected.abs().max()) / float(PROC.alphas_cumprod[t]) ** 0.5
    tolerances.assert_close(res.grad, expected, F64, depth=depth, scale=scale, msg="g_x")
    assert expected.abs().max() > 1e-3
    # the raw x̂0 (TFG's clip handling): the gradient passes where the clip would stop it
    _, raw = method.through_denoiser(ctx, x, raw=True, mc=offsets)
    (expected_raw,) = torch.autograd.grad(_score(obj, _x0_eps(xr, t, False)[0], u_, offsets), xr)
    scale = float(expected_raw.abs().max()) / float(PROC.alphas_cumprod[t]) ** 0.5
    tolerances.assert_close(raw.grad, expected_raw, F64, depth=depth, scale=scale, msg="g_x raw")
    # g_0: on x̂0 only (MPGD, UGD's backward and TFG's μ steps)
    v = est.x0
    got = method.on_x0(ctx, v, offsets).grad
    vr = v.clone().requires_grad_(True)
    (expected_0,) = torch.autograd.grad(_score(obj, vr, u_, offsets), vr)
    tolerances.assert_close(got, expected_0, F64, depth=depth, msg="g_0")


def test_latent_guides_differentiate_the_network_then_the_decoder() -> None:
    from fguide.models.hf_diffusers import DecodedClassifier

    torch.manual_seed(0)
    decoder = torch.nn.Sequential(
        torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(3, 3, 3, padding=1)
    ).double()
    decoder.requires_grad_(False)
    clf = DecodedClassifier(decoder, CLS, clip="none")  # type: ignore[arg-type]
    obj = fguide.objective("js")
    z = _z(2)[:, :, :4, :4]  # latents 3×4×4, decoded to 3×8×8
    t = 1
    method = tf.DPS(clf, obj)
    _, res = method.through_denoiser(_context(z, t, False), z)
    zr = z.clone().requires_grad_(True)
    x0 = _x0_eps(zr, t, False)[0]
    (expected,) = torch.autograd.grad(obj.score(CLS(decoder(x0)), LABELS).sum(), zr)
    depth = DEPTH_PER_EVAL + 2 * tolerances.network_depth(decoder)
    scale = float(expected.abs().max()) / float(PROC.alphas_cumprod[t]) ** 0.5  # as g_x's
    tolerances.assert_close(res.grad, expected, F64, depth=depth, scale=scale)


# -- recurrence --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["freedom", "ugd", "tfg"])
def test_repeats_draw_time_travel_noise_between_repeats_only(name: str) -> None:
    method = _method(name, fguide.objective())
    for k in (1, 3):
        m = dataclasses.replace(method, recurrence=k)
        draws = _Draws(STEPS * (2 * k - 1))
        fguide.ddim(EPS, _z(), PROC, labels=LABELS, guide=m, noise=draws, eta=1.0)
        assert draws.used == STEPS * (2 * k - 1)  # K updates and K − 1 time-travels per step


@pytest.mark.parametrize("name", ["freedom", "ugd"])
def test_the_window_limits_the_repeats_to_its_timesteps(name: str) -> None:
    base = _method(name, fguide.objective())
    one = fguide.ddim(EPS, _z(), PROC, labels=LABELS, guide=base, noise=_noise(), eta=1.0)
    outside = dataclasses.replace(base, recurrence=3, window=(1000, 2000))
    assert torch.equal(
        fguide.ddim(EPS, _z(), PROC, labels=LABELS, guide=outside, noise=_noise(), eta=1.0), one
    )
    # ts = [999, 666, 333, 0]: the window is inclusive: 333:333 repeats that step (2 more updates, 2
    # time-travels: 4 more draws)
    inside = dataclasses.replace(base, recurrence=3, window=(333, 333))
    draws = _Draws(STEPS + 4)
    fguide.ddim(EPS, _z(), PROC, labels=LABELS, guide=inside, noise=draws, eta=1.0)
    assert draws.used == STEPS + 4


# -- the exact Gaussian-mixture world ----------------------------------------------------------


def test_every_method_moves_gmm_samples_toward_the_target() -> None:
    from fguide.worlds.gmm import BayesClassifier, ExactEpsModel, GaussianMixture

    mix = GaussianMixture.circle()
    proc = make_process("linear", 1000, "20", "fixed_small")
    model = ExactEpsModel(mix, make_process("linear", 1000, "")["alphas_cumprod"])
    n = 200
    labels = torch.arange(n) % mix.num_classes
    clf = BayesClassifier(mix)
    obj = fguide.objective("logsoftmax")

    def accuracy(guide: Any) -> float:
        noise = fguide.SampleNoise(0, range(n))
        z = noise.initial((mix.dim,), dtype=F64)
        x = fguide.ddpm(
            model, z, proc, labels=labels, guide=guide, noise=noise, clip_denoised=False
        )
        return float((mix.bayes_labels(x) == labels).double().mean())

    base = accuracy(None)
    # a margin of 4 binomial standard deviations of the difference of two proportions of n
    # samples (at most sqrt(2 · 0.25 / n)): chance would cross it with probability < 1e-4
    margin = 4 * math.sqrt(2 * 0.25 / n)
    methods = {  # strengths at which each method guides (not tuned further)
        "dps": tf.DPS(clf, obj, scale=10.0),
        "freedom": tf.FreeDoM(clf, obj, scale=0.005, recurrence=2),
        "mpgd": tf.MPGD(clf, obj, scale=0.01),
        "ugd": tf.UGD(clf, obj, scale=0.005, recurrence=2, backward_steps=1),
        "tfg": tf.TFG(clf, obj, rho=0.002, mu=0.002, gamma=0.01, mc_samples=2, iterations=1),
    }
    for name, method in methods.items():
        acc = accuracy(method)
        assert acc > base + margin, f"{name}: accuracy {acc:.3f} vs unguided {base:.3f}"


# -- boundaries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "param"),
    [
        (lambda: tf.FreeDoM(CLS, fguide.objective(), recurrence=0), "recurrence"),
        (lambda: tf.UGD(CLS, fguide.objective(), backward_steps=-1), "backward_steps"),
        (lambda: tf.DPS(CLS, fguide.objective(), scale=math.nan), "scale"),
        (lambda: tf.TFG(CLS, fguide.objective(), gamma=-0.1), "gamma"),
        (lambda: tf.TFG(CLS, fguide.objective(), mc_samples=0), "mc_samples"),
        (lambda: tf.TFG(CLS, fguide.objective(), rho_schedule="linear"), "rho_schedule"),
        (lambda: tf.FreeDoM(CLS, fguide.objective(), window=(800, 500)), "recurrence_window"),
        (
            lambda: tf.TFG(CLS, fguide.objective("tilted"), mc_samples=2, gamma=0.1),
            "mc_samples",
        ),
    ],
)
def test_validation_names_the_parameter(build: Callable[[], Any], param: str) -> None:
    with pytest.raises(ParamError) as err:
        build()
    assert param in err.value.params


def test_heun_and_noise_aware_classifiers_are_refused_with_the_reason() -> None:
    with pytest.raises(ParamError, match="heun sampler: no paper") as err:
        tf.check_supported("ugd", "heun")
    assert err.value.params == ("guidance_method",)
    with pytest.raises(ParamError, match="classifier of x0"):
        tf.check_supported("dps", "ddpm", classifier_input="xt")
    with pytest.raises(ParamError, match="one of elucd, dps"):
        tf.check_supported("lgd", "ddim")
    for name in ("elucd", *tf.METHODS):
        tf.check_supported(name, "ddim")
    tf.check_supported("elucd", "heun")
    with pytest.raises(ValueError, match="'mpgd' is refused: no paper"):
        fguide.heun(
            lambda x, s, y: x,
            _z(),
            fguide.karras_sigmas(3),
            labels=LABELS,
            guide=tf.MPGD(CLS, fguide.objective()),
        )


def test_non_finite_method_gradients_name_the_step() -> None:
    def CLS_NAN(x: Tensor) -> Tensor:  # noqa: N802
        return CLS(x) * math.nan

    with pytest.raises(NonFiniteGuidanceError, match="guidance gradient at sampling step") as err:
        fguide.ddim(EPS, _z(), PROC, labels=LABELS, guide=tf.MPGD(CLS_NAN, fguide.objective()))
    assert err.value.step == 0 and err.value.samples == [0, 1, 2, 3]


def test_step_records_carry_the_methods_guidance() -> None:
    records: list[fguide.StepRecord] = []
    fguide.ddpm(
        EPS, _z(), PROC, labels=LABELS, guide=_method("ugd", fguide.objective()),
        callback=records.append, noise=_noise(),
    )  # fmt: skip
    assert [r.step for r in records] == list(range(STEPS))
    for r in records:
        assert r.guidance is not None and r.confidence is not None
        assert r.confidence.shape == LABELS.shape and r.x0.shape == r.x.shape


def test_defaults_are_the_sources_values() -> None:
    # TFG's ``utils/configs.py`` and ``scripts/cifar10_label.sh`` (defaults.py cites them)
    m = tf.TFG(CLS, fguide.objective())
    assert (m.rho, m.mu, m.gamma, m.mc_samples, m.iterations, m.recurrence) == (
        1.0, 0.25, 0.001, 1, 4, 1,
    )  # fmt: skip
    assert (m.rho_schedule, m.mu_schedule, m.gamma_schedule) == ("increase",) * 2 + ("decrease",)
    u = tf.UGD(CLS, fguide.objective())
    assert (u.scale, u.recurrence, u.backward_steps) == (1.0, 1, 0)
    assert defaults.FREEDOM_RECURRENCE == 1 and defaults.FREEDOM_SCHEDULE == "increase"


@pytest.mark.parametrize("name", list(tf.METHODS))
def test_the_hot_loop_reads_nothing_back_per_step_and_keeps_no_graph(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_sampler_properties import _count_host_reads

    method = _method(name, fguide.objective("js", entropy=True))
    extra = {"tfg": {"gamma": 0.1}, "freedom": {"window": (0, 999)}, "ugd": {"window": (0, 999)}}
    method = dataclasses.replace(method, **extra.get(name, {}))

    def run(steps: int) -> int:
        counts = _count_host_reads(monkeypatch)
        proc = make_process("linear", 1000, str(steps), "fixed_small")
        rec = fguide.TrajectoryRecorder()
        fresh = dataclasses.replace(method)  # a new method checks its labels once more
        out = fguide.ddim(
            EPS, _z(), proc, labels=LABELS, guide=fresh, noise=_noise(), callback=rec, eta=1.0
        )
        rec.finalize()
        monkeypatch.undo()
        assert out.grad_fn is None and not out.requires_grad
        return sum(counts.values())

    few, many = run(3), run(7)
    assert few == many, f"host reads grow with the number of steps: {few} vs {many}"
    assert many <= 8


def test_a_float32_classifier_guides_a_float64_state() -> None:
    # the classifier sees its own dtype; the gradient (through the float64 ε-network) comes back
    # in the state's dtype, equal to the float64 classifier's up to float32 rounding
    t, x = 2, _z(9)
    ctx = _context(x, t, True)
    obj = fguide.objective("logsoftmax")
    _, ref = tf.DPS(CLS, obj).through_denoiser(ctx, x)
    _, low = tf.DPS(tfg_tiny.classifier(2).float(), obj).through_denoiser(ctx, x)
    assert low.grad.dtype == F64
    scale = float(ref.grad.abs().max()) / float(PROC.alphas_cumprod[t]) ** 0.5
    tolerances.assert_close(low.grad, ref.grad, torch.float32, depth=DEPTH_PER_EVAL, scale=scale)


def _scaled(m: tf.GuidanceMethod, g: float) -> tf.GuidanceMethod:
    if isinstance(m, tf.TFG):
        return dataclasses.replace(m, rho=m.rho * g, mu=m.mu * g)
    return dataclasses.replace(m, scale=m.scale * g)  # type: ignore[call-arg]


@pytest.mark.parametrize("name", list(tf.METHODS))
def test_gains_are_per_sample_strengths_for_a_sweep_in_one_batch(name: str) -> None:
    n, g = 2, 2.5
    base = dataclasses.replace(_method(name, fguide.objective("js")), recurrence=2) if name in (
        "freedom", "ugd", "tfg"
    ) else _method(name, fguide.objective("js"))  # fmt: skip
    base = dataclasses.replace(base, gamma=0.05, mc_samples=2) if name == "tfg" else base

    def tiled(blocks: int) -> Callable[[Tensor], Tensor]:
        gen = torch.Generator().manual_seed(4)
        return lambda like: torch.randn((n, *like.shape[1:]), generator=gen, dtype=F64).repeat(
            blocks, 1, 1, 1
        )

    z, y = _z()[:n], LABELS[:n]
    gains = torch.tensor([1.0] * n + [g] * n, dtype=F64)
    both = fguide.ddim(
        EPS, z.repeat(2, 1, 1, 1), PROC, labels=y.repeat(2), eta=1.0, noise=tiled(2),
        guide=dataclasses.replace(base, gains=gains),
    )  # fmt: skip
    for block, method in ((0, base), (1, _scaled(base, g))):
        alone = fguide.ddim(EPS, z, PROC, labels=y, eta=1.0, noise=tiled(1), guide=method)
        scale = float(z.abs().max() / PROC.alphas_cumprod.min() ** 0.5)
        depth = STEPS * 2 * 8 * DEPTH_PER_EVAL
        tolerances.assert_close(both[block * n : (block + 1) * n], alone, F64, depth, scale=scale)
    assert (both[:n] - both[n:]).abs().max() > 1e-4
