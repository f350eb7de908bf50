"""Samplers: DDPM ancestral, DDIM and EDM Heun, as short free functions (METHODS.md §1, §5).

All three share one signature::

    sampler(model, z, schedule, *, labels=None, guide=None, noise=None, callback=None, ...)

``z`` is the standard-normal start (Heun scales it by σ_0), ``schedule`` a respaced
:class:`~fguide.schedules.Process` (DDPM, DDIM) or an EDM σ grid (Heun). Guidance enters each
sampler in exactly one line, marked ``# guidance``; the sampler never knows which objective runs.
``noise`` supplies each step's Gaussian draw; :class:`SampleNoise` seeds it per sample so that
sample i is the same whatever batch it runs in (per-sample objectives; tilting couples a group).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fguide.guidance import GuidanceResult, Guide
from fguide.rng import SampleNoise
from fguide.schedules import Process

EpsModel = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""ADM-style network: (x_t, model timestep, labels) → ε (C channels) or [ε, v] (2C channels)."""
Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""EDM-style denoiser: (x, σ per sample, labels) → D(x, σ), the estimate of the clean sample."""
NoiseFn = Callable[[Tensor], Tensor]
"""Returns a standard-normal draw shaped like its argument."""


class NonFiniteGuidanceError(RuntimeError):
    """The guidance gradient (or state) became non-finite; names the step and the samples."""

    def __init__(self, step: int, t: float, samples: list[int], what: str = "guidance gradient"):
        self.step, self.t, self.samples = step, t, samples
        super().__init__(
            f"non-finite {what} at sampling step {step} (t = {t:g}) for batch positions "
            f"{samples[:8]}{'…' if len(samples) > 8 else ''}"
        )


@dataclass
class StepRecord:
    """What a sampler reports after each step (the paper's Figure 1 comes from these)."""

    step: int
    """Loop index k: 0 is the first, noisiest step."""
    num_steps: int
    t: Tensor
    """Timestep the networks received (DDPM/DDIM) or σ_i (Heun), per sample."""
    x: Tensor
    """State entering the step (x_t)."""
    x0: Tensor
    """Estimate of the clean sample at this step (ADM's pred_xstart or D(x, σ))."""
    guidance: GuidanceResult | None = None

    @property
    def progress(self) -> float:
        return self.step / max(self.num_steps - 1, 1)

    @property
    def confidence(self) -> Tensor | None:
        """Classifier confidence in the target, softmax(f)_y, per sample (None if unguided)."""
        return None if self.guidance is None else self.guidance.confidence()

    @property
    def grad_norm(self) -> Tensor | None:
        """‖∇S‖ per sample (unscaled; None if unguided)."""
        return None if self.guidance is None else self.guidance.grad_norm()


Callback = Callable[[StepRecord], None]


def _check_finite(res: GuidanceResult, step: int, t: Tensor) -> None:
    bad = ~torch.isfinite(res.grad.flatten(1)).all(dim=1)
    if bad.any():
        raise NonFiniteGuidanceError(step, float(t[0]), bad.nonzero().flatten().tolist())


def _default_noise(seed: int = 0) -> NoiseFn:
    gen = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=gen).to(like)


def _indices(n: int, start_step: int | None) -> range:
    start = n - 1 if start_step is None else start_step
    if not 0 <= start < n:
        raise ValueError(f"start_step must lie in [0, {n}); got {start_step}")
    return range(start, -1, -1)


def ddpm(
    model: EpsModel,
    z: Tensor,
    process: Process,
    *,
    labels: Tensor | None = None,
    guide: Guide | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    clip_denoised: bool = True,
    sine_factor: float = 0.3,
    variance_tracking: Literal["per_sample", "first_sample"] = "per_sample",
    max_variance: float = 0.0,
    start_step: int | None = None,
) -> Tensor:
    """DDPM ancestral sampling with EluCD's guided mean (METHODS.md §5).

    μ' = μ + (Σ + a_t) ⊙ γ g with g the guidance gradient, γ = ``guide.scale`` and the sine
    boost a_t = max(sin(π i/n) σ²_max γ_sine, 0), σ²_max the running maximum of the scalar
    variance Σ[b, 0, 0, 0] (per sample; ``"first_sample"`` reproduces EluCD's batch coupling).
    ``sine_factor=0`` gives ADM's ``condition_mean`` (classic classifier guidance).
    ``start_step`` and ``max_variance`` continue a trajectory part-way: the loop starts at
    respaced index ``start_step`` (default n − 1) with σ²_max = ``max_variance``.
    """
    noise = noise or _default_noise()
    x, n = z, process.num_steps
    max_var = torch.full((x.shape[0],), max_variance, dtype=x.dtype, device=x.device)
    for i in _indices(n, start_step):
        k = n - 1 - i
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        tm = process.model_timesteps(t)
        out = process.p_mean_variance(model(x, tm, labels), x, t, clip_denoised)
        mean, res = out.mean, None
        if guide is not None and labels is not None:
            res = guide(x, out.pred_xstart.detach(), tm, labels, k / max(n - 1, 1))
            _check_finite(res, k, tm)
            v = out.variance.flatten(1)[:, 0]
            max_var = torch.maximum(max_var, v if variance_tracking == "per_sample" else v[:1])
            a_t = (math.sin(math.pi * i / n) * max_var * sine_factor).clamp_min(0)
            a_t = a_t.reshape(-1, *([1] * (x.ndim - 1)))
            mean = mean + (out.variance + a_t) * guide.scale * res.grad  # guidance
        draw = noise(x)
        x_prev = mean + (0.0 if i == 0 else 1.0) * torch.exp(0.5 * out.log_variance) * draw
        if callback is not None:
            callback(StepRecord(k, n, tm, x, out.pred_xstart, res))
        x = x_prev
    return x


def ddim(
    model: EpsModel,
    z: Tensor,
    process: Process,
    *,
    labels: Tensor | None = None,
    guide: Guide | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    clip_denoised: bool = True,
    eta: float = 0.0,
    start_step: int | None = None,
) -> Tensor:
    """DDIM sampling; guidance shifts the score: ε' = ε − sqrt(1 − ᾱ_t) γ g (ADM's form).

    x̂0 is recomputed from ε' (not re-clipped, as ADM); then
    x_{t−1} = x̂0 sqrt(ᾱ_{t−1}) + sqrt(1 − ᾱ_{t−1} − σ²) ε' + σ z,
    σ = η sqrt((1 − ᾱ_{t−1})/(1 − ᾱ_t)) sqrt(1 − ᾱ_t/ᾱ_{t−1}).
    ``start_step`` starts the loop at that respaced index (default n − 1).
    """
    noise = noise or _default_noise()
    x, n = z, process.num_steps
    for i in _indices(n, start_step):
        k = n - 1 - i
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        tm = process.model_timesteps(t)
        out = process.p_mean_variance(model(x, tm, labels), x, t, clip_denoised)
        x0 = out.pred_xstart
        eps = process.eps_from_x0(x, t, x0)
        res = None
        if guide is not None and labels is not None:
            res = guide(x, x0.detach(), tm, labels, k / max(n - 1, 1))
            _check_finite(res, k, tm)
            sqrt_1m_abar = process.extract("sqrt_one_minus_alphas_cumprod", t, x)
            eps = eps - sqrt_1m_abar * guide.scale * res.grad  # guidance
            x0 = process.x0_from_eps(x, t, eps)
        abar = process.extract("alphas_cumprod", t, x)
        abar_prev = process.extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        draw = noise(x)
        x_prev = x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        if i > 0:
            x_prev = x_prev + sigma * draw
        if callback is not None:
            callback(StepRecord(k, n, tm, x, x0, res))
        x = x_prev
    return x


def _rms(v: Tensor) -> Tensor:
    """sqrt(mean over C, H, W of v²), per sample, shaped for broadcasting."""
    return v.pow(2).flatten(1).mean(1).sqrt().reshape(-1, *([1] * (v.ndim - 1)))


def heun(
    model: Denoiser,
    z: Tensor,
    sigmas: Tensor,
    *,
    labels: Tensor | None = None,
    guide: Guide | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    sine_factor: float = 0.3,
    guidance_input: Literal["x", "denoised"] = "x",
) -> Tensor:
    """EDM Heun sampling (no churn) with EluCD's guided displacement (EluCD Algorithm 2).

    Before step i the state moves by Δ_i = g/rms(g) · rms(x_i) · c_i with
    c_i = max(G/(n+1)·(n+1−i), 1e−5) + sin(π i/n)·G·γ_sine, G = ``guide.scale`` (EluCD's
    maximum guidance) and g the guidance gradient at x_in = x_i / max(1, rms(x_i))
    (``guidance_input="denoised"``: at D(x_i, σ_i) instead). ``noise`` is unused (no churn).
    The step record's ``x`` is the displaced state x_i + Δ_i the Heun step starts from.
    """
    del noise  # deterministic sampler: kept for the shared signature
    n = len(sigmas) - 1
    x = z * sigmas[0].to(z)
    for i in range(n):
        s, s_next = sigmas[i].to(x), sigmas[i + 1].to(x)
        s_b = s.expand(x.shape[0])
        res = None
        if guide is not None and labels is not None:
            if guidance_input == "x":
                x_in = (x / _rms(x).clamp_min(1.0)).detach()
            else:
                x_in = model(x, s_b, labels).detach()
            res = guide(x, x_in, s_b, labels, i / max(n - 1, 1))
            _check_finite(res, i, s_b)
            c_i = max(guide.scale / (n + 1) * (n + 1 - i), 1e-5)
            c_i += math.sin(math.pi * i / n) * guide.scale * sine_factor
            x = x + res.grad / _rms(res.grad) * _rms(x) * c_i  # guidance
        denoised = model(x, s_b, labels)
        d = (x - denoised) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_prime = (x_next - model(x_next, s_next.expand(x.shape[0]), labels)) / s_next
            x_next = x + (s_next - s) * (0.5 * d + 0.5 * d_prime)
        if callback is not None:
            callback(StepRecord(i, n, s_b, x, denoised, res))
        x = x_next
    return x


