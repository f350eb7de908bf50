"""Sampler properties: per-sample seeding, batch invariance, errors naming the step."""

from __future__ import annotations

import pytest
import tolerances
import torch
from tolerances import assert_close, tol

import fguide
from fguide.guidance import GuidanceResult
from fguide.samplers import NonFiniteModelOutputError
from fguide.schedules import make_process
from fguide.worlds.gmm import BayesClassifier, ExactDenoiser, ExactEpsModel, GaussianMixture

MIX = GaussianMixture.circle()
ABAR = make_process("linear", 1000, "")["alphas_cumprod"]
F64 = torch.float64
# _run's samplers: ≤ 10 steps of ≤ 2 evaluations, each the mixture's posterior over its classes
# in 2 dimensions and the guidance gradient through it (forward and back), and the step's ~10
# operations; x̂0 = sqrt(1/ᾱ) x_t − sqrt(1/ᾱ − 1) ε cancels terms up to sqrt(1/ᾱ_min) |x|,
# |x| within 3 standard deviations of the mixture's circle.
SAMPLER_DEPTH = 10 * 2 * (3 * (MIX.num_classes + 2) + 10)
SAMPLER_SCALE = float(MIX.means.norm(dim=1).max() + 3 * MIX.s) / float(ABAR.min()) ** 0.5


def _run(
    sampler: str,
    indices: list[int],
    labels: torch.Tensor,
    objective: fguide.Objective,
    seed: int = 7,
) -> torch.Tensor:
    noise = fguide.SampleNoise(seed, indices)
    z = noise.initial((2,), dtype=torch.float64)
    guide = fguide.ClassifierGuide(BayesClassifier(MIX), objective, 0.05)
    if sampler == "heun":
        return fguide.heun(
            ExactDenoiser(MIX),
            z,
            fguide.karras_sigmas(8),
            labels=labels,
            guide=guide,
            guidance_input="denoised",
        )
    proc = make_process("linear", 1000, "10", "fixed_small")
    fn = fguide.ddpm if sampler == "ddpm" else fguide.ddim
    kw = {"eta": 1.0} if sampler == "ddim" else {}
    return fn(
        ExactEpsModel(MIX, ABAR),
        z,
        proc,
        labels=labels,
        guide=guide,
        noise=noise,
        clip_denoised=False,
        **kw,
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
def test_sample_i_is_independent_of_its_batch(sampler: str) -> None:
    labels = torch.tensor([3, 1, 4, 1, 5, 2])
    obj = fguide.objective("js", entropy=True)
    full = _run(sampler, list(range(6)), labels, obj)
    # the same samples in other batches (singles, a reordered subset): the same arithmetic up
    # to the batched kernels' summation order
    for i in range(6):
        one = _run(sampler, [i], labels[i : i + 1], obj)
        assert_close(one, full[i : i + 1], F64, SAMPLER_DEPTH, scale=SAMPLER_SCALE)
    sub = _run(sampler, [4, 0, 2], labels[[4, 0, 2]], obj)
    assert_close(sub, full[[4, 0, 2]], F64, SAMPLER_DEPTH, scale=SAMPLER_SCALE)
    # and different seeds give different samples
    other = _run(sampler, list(range(6)), labels, obj, seed=8)
    assert (other - full).abs().max() > tol(full, F64, SAMPLER_DEPTH, scale=SAMPLER_SCALE)


def test_tilting_couples_the_samples_of_a_group() -> None:
    labels = torch.tensor([3, 1, 4, 1])
    obj = fguide.objective("tilted", t_tilt=-0.5)
    full = _run("ddpm", [0, 1, 2, 3], labels, obj)
    alone = _run("ddpm", [0], labels[:1], obj)
    # documented: a tilted sample depends on its group
    assert (alone - full[:1]).abs().max() > tol(full, F64, SAMPLER_DEPTH, scale=SAMPLER_SCALE)


def test_sample_noise_streams_are_distinct_and_reproducible() -> None:
    a = fguide.SampleNoise(0, [0, 1]).initial((1000,))
    b = fguide.SampleNoise(0, [1]).initial((1000,))
    assert torch.equal(a[1], b[0])
    assert abs(float(torch.corrcoef(a)[0, 1])) < 0.1
    with pytest.raises(ValueError, match="noise source has 2 samples"):
        fguide.SampleNoise(0, [0, 1])(torch.zeros(3, 4))


class _Exploding:
    scale = 1.0

    def __call__(self, x_t, x0, t, labels, progress):  # type: ignore[no-untyped-def]
        g = torch.zeros_like(x0)
        if progress > 0.3:
            g[2] = float("nan")
        return GuidanceResult(grad=g, logits=torch.zeros(len(x0), 8), labels=labels)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_non_finite_guidance_names_the_step_and_sample(sampler: str) -> None:
    proc = make_process("linear", 1000, "10", "fixed_small")
    fn = fguide.ddpm if sampler == "ddpm" else fguide.ddim
    z = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(fguide.NonFiniteGuidanceError, match=r"step 3 .*positions \[2\]") as info:
        fn(
            ExactEpsModel(MIX, ABAR),
            z,
            proc,
            labels=torch.zeros(4, dtype=torch.long),
            guide=_Exploding(),
            clip_denoised=False,
        )
    assert info.value.step == 3 and info.value.samples == [2]


def test_start_step_is_validated() -> None:
    proc = make_process("linear", 1000, "10", "fixed_small")
    with pytest.raises(ValueError, match="start_step"):
        fguide.ddpm(ExactEpsModel(MIX, ABAR), torch.zeros(1, 2), proc, start_step=10)


def test_callback_records_every_step_with_guidance_diagnostics() -> None:
    records: list[fguide.StepRecord] = []
    proc = make_process("linear", 1000, "10", "fixed_small")
    labels = torch.tensor([0, 5])
    guide = fguide.ClassifierGuide(BayesClassifier(MIX), fguide.objective("base"), 0.05)
    fguide.ddpm(
        ExactEpsModel(MIX, ABAR),
        torch.randn(2, 2, dtype=torch.float64),
        proc,
        labels=labels,
        guide=guide,
        callback=records.append,
        clip_denoised=False,
    )
    assert [r.step for r in records] == list(range(10))
    assert [int(r.t[0]) for r in records] == list(reversed(proc.timestep_map.tolist()))
    for r in records:
        assert r.confidence is not None and r.confidence.shape == (2,)
        assert r.grad_norm is not None and (r.grad_norm > 0).all()
    assert records[0].progress == 0.0 and records[-1].progress == 1.0


# ---------------------------------------------------------------- errors, grad, host syncs


class _TinyEps(torch.nn.Module):
    """A small ε-network with parameters (so a sampler that kept autograd on would build a
    graph); optionally NaN for one sample from one timestep down."""

    def __init__(self, nan_below: int | None = None, nan_row: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1).double()
        self.nan_below, self.nan_row = nan_below, nan_row

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = 0.1 * torch.tanh(self.conv(x)) * (t.to(x) / 1000).reshape(-1, 1, 1, 1)
        if self.nan_below is not None:
            mask = torch.zeros_like(out)
            mask[self.nan_row] = float("nan")
            out = out + torch.where((t < self.nan_below).reshape(-1, 1, 1, 1), mask, 0.0)
        return out


def _tiny_guide(
    scale: float = 1.0, objective: fguide.Objective | None = None
) -> fguide.ClassifierGuide:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5)).double()
    obj = objective or fguide.objective("js", alpha=0.09, eps=0.1)
    return fguide.ClassifierGuide(net, obj, scale)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_guide_without_labels_is_an_error(sampler: str) -> None:
    proc = make_process("linear", 1000, "5", "fixed_small")
    fn = fguide.ddpm if sampler == "ddpm" else fguide.ddim
    with pytest.raises(ValueError, match="labels"):
        fn(_TinyEps(), torch.zeros(2, 3, 4, 4, dtype=torch.float64), proc, guide=_tiny_guide())
    with pytest.raises(ValueError, match="labels"):
        fguide.heun(
            ExactDenoiser(MIX), torch.zeros(2, 2), fguide.karras_sigmas(4), guide=_tiny_guide()
        )


def test_non_finite_model_output_names_the_model_and_step_not_the_classifier() -> None:
    proc = make_process("linear", 1000, "10", "fixed_small")
    # timesteps 999, 888, ..., 0: NaN from the model at model timestep < 500, i.e. step 5
    model = _TinyEps(nan_below=500, nan_row=2)
    with pytest.raises(fguide.NonFiniteGuidanceError) as info:
        fguide.ddpm(
            model,
            torch.randn(3, 3, 4, 4, dtype=torch.float64),
            proc,
            labels=torch.tensor([0, 1, 2]),
            guide=_tiny_guide(),
        )
    err = info.value
    assert isinstance(err, NonFiniteModelOutputError)
    step = next(k for k, t in enumerate(reversed(proc.timestep_map.tolist())) if t < 500)
    assert err.step == step and err.samples == [2]
    assert "_TinyEps" in str(err) and f"step {step}" in str(err) and "guidance" not in str(err)


def test_samplers_keep_no_graph_when_called_with_grad_enabled() -> None:
    proc = make_process("linear", 1000, "5", "fixed_small")
    model = _TinyEps()
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert torch.is_grad_enabled()
    for fn in (fguide.ddpm, fguide.ddim):
        out = fn(model, z, proc, labels=torch.tensor([0, 3]), guide=_tiny_guide())
        assert out.grad_fn is None and not out.requires_grad
    # the guide still differentiates its classifier: the guided run differs from the unguided
    unguided = fguide.ddim(model, z, proc)
    assert (out - unguided).abs().max() > tol(unguided, F64, depth=5 * 20)


_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _count_host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = dict.fromkeys(_SYNC_METHODS, 0)
    for name in _SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _orig=original, **kw):  # type: ignore[no-untyped-def]
            counts[_name] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
def test_the_hot_loop_reads_nothing_back_per_step(
    sampler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host reads (item, tolist, cpu, numpy, bool/float/int of a tensor) during a guided run
    with a trajectory recorder: a constant per batch, independent of the number of steps."""
    labels = torch.tensor([0, 3, 1])
    z = torch.randn(3, 3, 4, 4, dtype=torch.float64)

    def run(steps: int) -> int:
        guide = _tiny_guide(0.5)
        rec = fguide.TrajectoryRecorder()
        counts = _count_host_reads(monkeypatch)
        if sampler == "heun":
            fguide.heun(
                lambda x, s, y: torch.tanh(x / torch.sqrt(1 + s.reshape(-1, 1, 1, 1) ** 2)),
                z,
                fguide.karras_sigmas(steps),
                labels=labels,
                guide=guide,
                callback=rec,
                s_churn=1.0,
                noise=fguide.SampleNoise(0, [0, 1, 2]),
            )
        else:
            fn = fguide.ddpm if sampler == "ddpm" else fguide.ddim
            proc = make_process("linear", 1000, str(steps), "fixed_small")
            noise = fguide.SampleNoise(0, [0, 1, 2])
            fn(_TinyEps(), z, proc, labels=labels, guide=guide, callback=rec, noise=noise)
        rec.finalize()
        total = sum(counts.values())
        monkeypatch.undo()
        return total

    few, many = run(4), run(12)
    assert few == many, f"host reads grow with the number of steps: {few} vs {many}"
    assert many <= 8


def test_the_edm_network_reads_its_labels_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An NVlabs EDM network (its one-hot labels checked once per labels tensor, not per call)
    keeps the Heun loop's host reads independent of the number of steps."""
    from pathlib import Path

    from fguide.models.nvlabs import load_edm_denoiser

    den, _ = load_edm_denoiser(Path(__file__).parent / "reference" / "edm_tiny_bare.pkl")
    z = torch.randn(2, 3, 8, 8) * 80

    def run(steps: int) -> int:
        torch.manual_seed(0)
        clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))
        guide = fguide.ClassifierGuide(clf, fguide.objective("base"), 0.1)
        labels = torch.tensor([0, 3])  # a new batch: checked once
        counts = _count_host_reads(monkeypatch)
        with torch.no_grad():
            fguide.heun(den, z, fguide.karras_sigmas(steps), labels=labels, guide=guide)
        total = sum(counts.values())
        monkeypatch.undo()
        return total

    few, many = run(3), run(9)
    assert few == many, f"host reads grow with the number of steps: {few} vs {many}"
    with pytest.raises(ValueError, match="labels must lie in"):
        den(z, torch.full((2,), 1.0), torch.tensor([0, 4]))


# ---------------------------------------------------------------- EDM stochastic churn


def _edm_denoiser(
    x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    s = sigma.to(x).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x / torch.sqrt(1 + s**2))


def _edm_algorithm2(
    z: torch.Tensor,
    sigmas: list[float],
    draws: torch.Tensor,
    churn: float,
    tmin: float,
    tmax: float,
) -> torch.Tensor:
    """EDM (Karras et al. 2022) Algorithm 2, written out from the paper with Python floats for
    the σ arithmetic; ``draws[i]`` is ε_i ~ N(0, I) of step i (S_noise = 1.007)."""
    n, s_noise = len(sigmas) - 1, 1.007
    x = z * sigmas[0]
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn / n, 2**0.5 - 1) if tmin <= s <= tmax else 0.0
        s_hat = s * (1 + gamma)
        x_hat = x + (s_hat**2 - s**2) ** 0.5 * s_noise * draws[i]
        d = (x_hat - _edm_denoiser(x_hat, torch.tensor([s_hat], dtype=torch.float64), None)) / s_hat
        x = x_hat + (s_next - s_hat) * d
        if s_next != 0:
            d2 = (x - _edm_denoiser(x, torch.tensor([s_next], dtype=torch.float64), None)) / s_next
            x = x_hat + (s_next - s_hat) * (d + d2) / 2
    return x


def test_heun_churn_matches_edm_algorithm_2_and_draws_once_per_step() -> None:
    sig = fguide.karras_sigmas(8, 0.002, 80.0)
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    draws = torch.randn(8, 2, 3, 4, 4, dtype=torch.float64)
    replay, calls = _Replay(draws), []
    out = fguide.heun(
        _edm_denoiser,
        z,
        sig,
        noise=lambda like: calls.append(1) or replay(like),
        s_churn=40.0,
        s_tmin=0.05,
        s_tmax=10.0,
        s_noise=1.007,
    )
    assert len(calls) == 8  # one ε per step, also outside the churn window (as EDM draws)
    expected = _edm_algorithm2(z, sig.tolist(), draws, 40.0, 0.05, 10.0)
    # 8 Heun steps of two tanh evaluations and ~10 operations each, on the scale σ_max·|x|
    heun_depth, heun_scale = 8 * 12, 80.0 * tolerances.magnitude(z)
    assert_close(out, expected, F64, heun_depth, scale=heun_scale)
    # the churn noise only enters inside [S_tmin, S_tmax]: other draws do not change the result
    inside = [(0.05 <= s <= 10.0) for s in sig[:-1].tolist()]
    assert any(inside) and not all(inside)

    def churned(draws: torch.Tensor) -> torch.Tensor:
        churn = dict(s_churn=40.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.007)
        return fguide.heun(_edm_denoiser, z, sig, noise=_Replay(draws), **churn)

    changed = draws.clone()
    changed[[i for i, ins in enumerate(inside) if not ins]] = 7.0
    torch.testing.assert_close(churned(changed), out, atol=0, rtol=0)
    changed[[i for i, ins in enumerate(inside) if ins][0]] += 1.0
    assert (churned(changed) - out).abs().max() > tol(out, F64, heun_depth, scale=heun_scale)


def test_heun_without_churn_never_draws_and_equals_the_deterministic_sampler() -> None:
    sig = fguide.karras_sigmas(6)
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)

    def no_draw(like: torch.Tensor) -> torch.Tensor:
        raise AssertionError("s_churn = 0 must not draw noise")

    out = fguide.heun(_edm_denoiser, z, sig, noise=no_draw, s_tmin=0.0, s_tmax=1e9)
    zeros = torch.zeros(6, 2, 3, 4, 4, dtype=torch.float64)
    expected = _edm_algorithm2(z, sig.tolist(), zeros, 0.0, 0, 1e9)
    assert_close(out, expected, F64, 6 * 12, scale=80.0 * tolerances.magnitude(z))
    with pytest.raises(ValueError, match="s_churn"):
        fguide.heun(_edm_denoiser, z, sig, s_churn=-1.0)


class _Replay:
    def __init__(self, draws: torch.Tensor):
        self.draws, self.k = draws, 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        self.k += 1
        return self.draws[self.k - 1]


@pytest.mark.parametrize("method", ["base", "entropy", "rkl", "fkl", "hellinger", "tilted"])
def test_every_objective_is_free_of_host_reads_per_step(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    z = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    kw = {"t_tilt": -0.5} if method == "tilted" else {}

    def run(steps: int) -> int:
        guide = _tiny_guide(0.5, fguide.objective(method, **kw))
        counts = _count_host_reads(monkeypatch)
        proc = make_process("linear", 1000, str(steps), "fixed_small")
        fguide.ddpm(_TinyEps(), z, proc, labels=torch.tensor([0, 3, 1]), guide=guide)
        monkeypatch.undo()
        return sum(counts.values())

    assert run(3) == run(9)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
def test_overflowing_guidance_update_is_blamed_on_the_scale(sampler: str) -> None:
    # A finite gradient times an enormous scale overflows the state: the error says so at the
    # step of the update, before the model sees the state (issue 10: --scale 1e30).
    model = _TinyEps().float()
    z = torch.randn(2, 3, 4, 4)
    base = _tiny_guide()
    net = base.classifier.float()  # type: ignore[attr-defined]
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1e4)  # a steep classifier: gradients ≫ 1, so scale · g overflows float32
    guide = fguide.ClassifierGuide(net, base.objective, 3e38)
    labels = torch.tensor([0, 1])
    with pytest.raises(fguide.NonFiniteGuidanceError) as info:
        if sampler == "heun":
            den = fguide.denoisers.VPAsEDM(model, ABAR)
            fguide.heun(den, z, fguide.karras_sigmas(4, 0.01, 10.0), labels=labels, guide=guide)
        else:
            fn = fguide.ddpm if sampler == "ddpm" else fguide.ddim
            fn(
                model,
                z,
                make_process("linear", 1000, "5", "fixed_small"),
                labels=labels,
                guide=guide,
            )
    err = info.value
    assert not isinstance(err, NonFiniteModelOutputError), str(err)
    assert "state after the guidance update" in str(err) and err.step == 0, str(err)
