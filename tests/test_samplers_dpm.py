"""DPM-Solver++(2M) (:func:`fguide.samplers_dpm.dpmpp_2m`): against the DPM-Solver++ paper's
multistep update written out here in float64, its accuracy on Gaussian data (whose probability
flow is known: z ↦ s·z), guidance as a score shift, and its refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

import fguide
from fguide.guidance import GuidanceResult
from fguide.samplers import NonFiniteModelOutputError
from fguide.samplers_dpm import dpmpp_2m
from fguide.schedules import process_at_timesteps

T = 1000
S_DATA = 0.5  # the data's standard deviation


def _betas() -> np.ndarray:
    return np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2  # SD's scaled_linear


def _abar() -> np.ndarray:
    return np.cumprod(1 - _betas())


def _gauss_eps(x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
    """The exact ε of data ~ N(0, S_DATA² I): E[ε | x_t] = √(1−ᾱ) x_t / (ᾱ s² + 1 − ᾱ)."""
    a = torch.from_numpy(_abar()).to(x)[t.long()].reshape(-1, 1, 1, 1)
    return (1 - a).sqrt() * x / (a * S_DATA**2 + 1 - a)


def _paper_2m(model, z: Tensor, ks: list[int], final_abar: float) -> Tensor:  # type: ignore[no-untyped-def]
    """DPM-Solver++(2M) as the paper's Algorithm 2 writes it: x̃_i = (σ_i/σ_{i−1}) x̃_{i−1}
    − α_i (e^{−h_i} − 1) D_i with D_i = (1 + 1/(2 r_i)) x̂_{i−1} − 1/(2 r_i) x̂_{i−2}, first
    order at the first step and (σ = 0 at the end) at the last."""
    abar = _abar()
    seq = [float(abar[k]) for k in ks] + [final_abar]  # noisiest first
    alpha = [math.sqrt(a) for a in seq]
    sigma = [math.sqrt(1 - a) for a in seq]
    lam = [
        math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alpha, sigma, strict=True)
    ]
    x, x0_prev = z, None
    for i, k in enumerate(ks):
        eps = model(x, torch.full((len(z),), k), None)
        x0 = (x - sigma[i] * eps) / alpha[i]
        h = lam[i + 1] - lam[i]
        if math.isinf(h):
            x = x0  # σ_{i+1} = 0: the first-order step lands on x̂0
        elif x0_prev is None:
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (math.exp(-h) - 1) * x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (math.exp(-h) - 1) * d
        x0_prev = x0
    return x


def _process(ks: list[int], final_abar: float = 1.0) -> fguide.Process:
    from fguide.models.sd_schedules import TargetProcess

    base = process_at_timesteps(_betas(), ks)
    to = np.append(final_abar, _abar()[sorted(ks)[:-1]])
    return TargetProcess(
        betas=base.betas,
        timestep_map=base.timestep_map,
        variance_type="fixed_small",
        num_train_steps=T,
        alphas_cumprod_to=to,
    )


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpmpp_2m_is_the_papers_multistep_update(final: str) -> None:
    ks = [999, 800, 550, 301, 120, 40]
    final_abar = 1.0 if final == "zero" else float(_abar()[0])
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def model(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _gauss_eps(x, t) + 0.05 * torch.sin(3 * x)  # not exact: D1 matters

    ref = _paper_2m(model, z, ks, final_abar)
    if final == "sigma_min":  # the paper's last step is second order when it ends at σ_min > 0
        ours = dpmpp_2m(model, z, _process(ks, final_abar), first_order_final=False)
    else:
        ours = dpmpp_2m(model, z, _process(ks, final_abar))
    # float64 throughout; the two arrangements differ by rounding only (a few ulps per step)
    torch.testing.assert_close(ours, ref, atol=1e-13, rtol=1e-13)


def _flow_error(sampler, n: int) -> float:  # type: ignore[no-untyped-def]
    """Max relative error after n steps uniform in λ from k = 999 to k = 10 (rounded to
    training steps), against the exact flow of N(0, s²) data: x_t / sqrt(ᾱ_t s² + 1 − ᾱ_t) is
    constant along it."""
    abar = _abar()
    lam = 0.5 * np.log(abar / (1 - abar))
    ks = [int(np.argmin(abs(lam - v))) for v in np.linspace(lam[999], lam[10], n + 1)]
    end = float(abar[ks[-1]])
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = float(abar[999])
    exact = z / math.sqrt(a * S_DATA**2 + 1 - a) * math.sqrt(end * S_DATA**2 + 1 - end)
    x = sampler(_gauss_eps, z, _process(ks[:-1], end))
    return float((x - exact).abs().max() / exact.abs().max())


def test_dpmpp_2m_solves_the_probability_flow_of_gaussian_data() -> None:
    """With the exact ε of Gaussian data the solver converges to the exact flow at second order
    (DDIM, the first-order solver, at first order)."""

    def dpm(m, z, p):  # type: ignore[no-untyped-def]
        return dpmpp_2m(m, z, p, first_order_final=False)

    def first(m, z, p):  # type: ignore[no-untyped-def]
        return fguide.ddim(m, z, p, clip_denoised=False)

    e10, e40 = _flow_error(dpm, 10), _flow_error(dpm, 40)
    assert e40 < 1e-3
    assert e10 / e40 > 6  # second order: 16 with exact λ spacing, ~8.5 with rounded steps
    assert _flow_error(first, 40) > 10 * e40


class _ConstantGuide:
    """Returns a fixed gradient and records the x̂0 it was shown."""

    def __init__(self, g: Tensor, scale: float):
        self.g, self.scale = g, scale
        self.seen: list[Tensor] = []

    def __call__(self, x_t, x0, t, labels, progress):  # type: ignore[no-untyped-def]
        self.seen.append(x0.clone())
        logits = torch.zeros(len(x0), 2, dtype=x0.dtype)
        return GuidanceResult(grad=self.g, logits=logits, labels=labels)


def test_guidance_enters_as_the_guided_eps() -> None:
    """With g fixed: guided sampling = unguided sampling of ε̃ = ε − √(1 − ᾱ_t) γ g, and the
    guide sees x̂0 of the unguided ε."""
    ks = [999, 700, 400, 150, 20]
    proc = _process(ks)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    guide = _ConstantGuide(g, scale=0.7)
    labels = torch.tensor([0, 1])
    ours = dpmpp_2m(_gauss_eps, z, proc, labels=labels, guide=guide)  # type: ignore[arg-type]

    abar = torch.from_numpy(_abar())

    def shifted(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _gauss_eps(x, t) - (1 - abar[t.long()]).sqrt().reshape(-1, 1, 1, 1) * 0.7 * g

    ref = dpmpp_2m(shifted, z, proc)
    torch.testing.assert_close(ours, ref, atol=1e-14, rtol=1e-13)
    assert (ours - dpmpp_2m(_gauss_eps, z, proc)).abs().max() > 1e-2  # the guidance acted
    a = float(_abar()[999])
    torch.testing.assert_close(
        guide.seen[0], (z - math.sqrt(1 - a) * _gauss_eps(z, torch.full((2,), 999))) / math.sqrt(a)
    )


def test_refusals_and_non_finite_outputs() -> None:
    proc = _process([999, 500, 10])
    z = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="first order"):
        dpmpp_2m(_gauss_eps, z, proc, first_order_final=False)
    with pytest.raises(ValueError, match="labels"):
        dpmpp_2m(_gauss_eps, z, proc, guide=_ConstantGuide(z, 1.0))  # type: ignore[arg-type]

    def bad(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        out = _gauss_eps(x, t)
        return out * float("nan") if int(t[0]) == 500 else out

    with pytest.raises(NonFiniteModelOutputError, match="step 1 .t = 500"):
        dpmpp_2m(bad, z, proc)
