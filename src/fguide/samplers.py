"""Samplers: DDPM ancestral, DDIM and EDM Heun, as short free functions (METHODS.md §1, §5).

All three share one signature::

    sampler(model, z, schedule, *, labels=None, guide=None, noise=None, callback=None, ...)

``z`` is the standard-normal start (Heun scales it by σ_0), ``schedule`` a respaced
:class:`~fguide.schedules.Process` (DDPM, DDIM) or an EDM σ grid (Heun). Guidance enters each
sampler in exactly one line, marked ``# guidance``; the sampler never knows which objective runs.
``guide`` is EluCD's mean shift (a :class:`~fguide.guidance.Guide`) or, for ``ddpm`` and
``ddim``, a training-free method (:class:`~fguide.training_free.GuidanceMethod`: DPS, FreeDoM,
MPGD, UGD, TFG), which then takes the whole step at the sampler's guidance line from the
sampler's own unguided update. ``noise`` supplies each step's Gaussian draw;
:class:`SampleNoise` seeds it per sample so that sample i is the same whatever batch it runs in
(per-sample objectives; tilting couples a group).

The samplers run the diffusion model under ``torch.no_grad()`` (the guide turns gradients on
for its own classifier pass), so no graph is kept across steps. The hot loop never reads a
value back to the host: schedules are device tensors (:meth:`Process.tensors`), and the
non-finite checks of the model output and the guidance gradient accumulate on the device the
first bad step of each sample, read back once at the end of the batch (the error still names
the step and the samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from fguide import defaults
from fguide.denoisers import Denoiser, EpsModel, NoiseFn
from fguide.guidance import GuidanceResult, Guide
from fguide.rng import SampleNoise
from fguide.schedules import Process, ProcessTensors
from fguide.training_free import REFUSED_SAMPLERS
from fguide.training_free_step import GuidanceMethod, StepContext

__all__ = [
    "Callback",
    "Denoiser",
    "EpsModel",
    "NoiseFn",
    "NonFiniteGuidanceError",
    "NonFiniteModelOutputError",
    "NonFiniteUpdateError",
    "SampleNoise",
    "StepRecord",
    "ddim",
    "ddpm",
    "elucd_heun_scale",
    "elucd_sine_boost",
    "heun",
]


class NonFiniteGuidanceError(RuntimeError):
    """The guidance gradient (or state) became non-finite; names the step and the samples.

    The base class of the samplers' non-finite errors (:class:`NonFiniteModelOutputError`,
    :class:`NonFiniteUpdateError`);
    ``what`` says which tensor was non-finite.
    """

    def __init__(self, step: int, t: float, samples: list[int], what: str = "guidance gradient"):
        self.step, self.t, self.samples, self.what = step, t, samples, what
        super().__init__(
            f"non-finite {what} at sampling step {step} (t = {t:g}) for batch positions "
            f"{samples[:8]}{'…' if len(samples) > 8 else ''}"
        )


class NonFiniteModelOutputError(NonFiniteGuidanceError):
    """The diffusion model's output was non-finite (before any guidance at that step)."""

    def __init__(self, step: int, t: float, samples: list[int], model: str):
        self.model = model
        super().__init__(step, t, samples, f"output of the diffusion model {model}")


class NonFiniteUpdateError(NonFiniteGuidanceError):
    """The state became non-finite when a finite guidance gradient was applied (γ · g
    overflowed)."""

    def __init__(self, step: int, t: float, samples: list[int]):
        super().__init__(
            step, t, samples, "state after the guidance update (scale × gradient overflowed)"
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

_NEVER = torch.iinfo(torch.int64).max


class _FirstNonFinite:
    """Per sample, the first step at which the model output / guidance gradient was not finite.

    Kept on the device and updated without reading anything back; :meth:`raise_if_any` reads it
    once. At a step where both are bad the model output is blamed (the guidance was computed
    from it).
    """

    def __init__(self, batch: int, device: torch.device, model: object):
        self.model_step = torch.full((batch,), _NEVER, dtype=torch.long, device=device)
        self.guidance_step = torch.full((batch,), _NEVER, dtype=torch.long, device=device)
        self.update_step = torch.full((batch,), _NEVER, dtype=torch.long, device=device)
        self.model_name = _name(model)

    @staticmethod
    def _mark(first: Tensor, value: Tensor, step: int, given: Tensor | None = None) -> None:
        bad = ~torch.isfinite(value.flatten(1)).all(dim=1)
        if given is not None:  # a non-finite input is not the model's fault
            bad &= torch.isfinite(given.flatten(1)).all(dim=1)
        first.masked_fill_(bad & (first == _NEVER), step)

    def model(self, out: Tensor, step: int, given: Tensor | None = None) -> None:
        """Mark the model's non-finite outputs (only where its input ``given`` was finite)."""
        self._mark(self.model_step, out, step, given)

    def guidance(self, grad: Tensor, step: int) -> None:
        self._mark(self.guidance_step, grad, step)

    def update(self, state: Tensor, step: int) -> None:
        """The state after a finite guidance gradient was applied (γ · g can overflow)."""
        self._mark(self.update_step, state, step)

    def raise_if_any(self, t_of_step: Callable[[int], float]) -> None:
        firsts = torch.stack([self.model_step, self.guidance_step, self.update_step]).cpu()
        m, g, u = (int(v) for v in firsts.min(dim=1).values)  # the one read-back
        if min(m, g, u) == _NEVER:
            return
        if m <= g and m <= u:
            rows = (firsts[0] == m).nonzero().flatten().tolist()
            raise NonFiniteModelOutputError(m, t_of_step(m), rows, self.model_name)
        if g <= u:
            rows = (firsts[1] == g).nonzero().flatten().tolist()
            raise NonFiniteGuidanceError(g, t_of_step(g), rows)
        rows = (firsts[2] == u).nonzero().flatten().tolist()
        raise NonFiniteUpdateError(u, t_of_step(u), rows)


def _name(model: object) -> str:
    inner = getattr(model, "net", None)
    inner = getattr(model, "model", None) if inner is None else inner
    outer = getattr(model, "__name__", None) or type(model).__name__
    return f"{outer}({type(inner).__name__})" if inner is not None else outer


def _check_labels(sampler: str, guide: object, labels: Tensor | None, batch: int) -> None:
    """Shapes only (no device read): the guide validates their range once per batch."""
    if guide is not None and labels is None:
        raise ValueError(
            f"{sampler}: a guide was given without labels; pass labels=<target class per "
            "sample> (a LongTensor of shape [batch])"
        )
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != batch):
        raise ValueError(
            f"{sampler}: labels must have shape [{batch}] (one per sample); "
            f"got {tuple(labels.shape)}"
        )


def _guide(
    guide: Guide, x: Tensor, x0: Tensor, t: Tensor, labels: Tensor, progress: float
) -> GuidanceResult:
    with torch.enable_grad():  # the samplers run under no_grad; the guide may need autograd
        return guide(x, x0, t, labels, progress)


def _shift_score(
    guide: Guide,
    process: Process,
    sched: ProcessTensors,
    x: Tensor,
    x0: Tensor,
    eps: Tensor,
    t: int,
    t_model: Tensor,
    labels: Tensor,
    checks: _FirstNonFinite,
    step: int,
    n: int,
) -> tuple[Tensor, Tensor, GuidanceResult]:
    """The score-shift samplers' guidance (DDIM, DPM-Solver): ε' = ε − sqrt(1 − ᾱ_t) γ g and
    the x̂0 of ε' (not re-clipped, as ADM), with the gradient and update checked."""
    res = _guide(guide, x, x0, t_model, labels, step / max(n - 1, 1))
    checks.guidance(res.grad, step)
    eps = eps - sched.sqrt_one_minus_alphas_cumprod[t] * guide.scale * res.grad
    checks.update(eps, step)
    return eps, process.x0_from_eps(x, t, eps), res


def _default_noise(seed: int = 0) -> NoiseFn:
    gen = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=gen).to(like)


def _first_step(n: int, start_step: int | None) -> int:
    start = n - 1 if start_step is None else start_step
    if not 0 <= start < n:
        raise ValueError(f"start_step must lie in [0, {n}); got {start_step}")
    return start


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample [B] tensor shaped [B, 1, ..., 1] to broadcast against ``like``."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _checked_model(
    model: EpsModel, t_model: Tensor, labels: Tensor | None, checks: _FirstNonFinite, step: int,
    x: Tensor,
) -> Tensor:  # fmt: skip
    out = model(x, t_model, labels)
    checks.model(out, step)
    return out


def _ddpm_update(
    process: Process, noise: NoiseFn, t: int, x: Tensor, x0: Tensor, eps: Tensor, v: Tensor | None
) -> Tensor:
    """The unguided DDPM step from x̂0: posterior mean + [t > 0] exp(½ log Σ) z (ε unused)."""
    sched = process.tensors(x.device, x.dtype)
    _, log_var = process.variance(v, t, x)
    mean = sched.posterior_mean_coef1[t] * x0 + sched.posterior_mean_coef2[t] * x
    draw = noise(x)
    return mean + (0.0 if t == 0 else 1.0) * torch.exp(0.5 * log_var) * draw


def _ddim_update(
    process: Process, noise: NoiseFn, t: int, eta: float, x: Tensor, x0: Tensor, eps: Tensor,
    v: Tensor | None,
) -> Tensor:  # fmt: skip
    """The unguided DDIM(η) step from a (x̂0, ε) pair (:func:`ddim`'s update lines)."""
    sched = process.tensors(x.device, x.dtype)
    abar, abar_prev = sched.alphas_cumprod[t], sched.alphas_cumprod_prev[t]
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    draw = noise(x)
    x_prev = x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
    return x_prev + sigma * draw if _ddim_noise_at(process, t) else x_prev


def _split(guide: Guide | GuidanceMethod | None) -> tuple[GuidanceMethod | None, Guide | None]:
    """(a training-free method, None) or (None, EluCD's guide)."""
    return (guide, None) if isinstance(guide, GuidanceMethod) else (None, guide)


def _method_step(
    method: GuidanceMethod,
    ctx: StepContext,
    checks: _FirstNonFinite,
    callback: Callback | None,
) -> Tensor:
    """One step taken by a training-free method; the checks and the step record as EluCD's."""
    out = method.step(ctx)
    if out.guidance is not None:
        checks.guidance(out.guidance.grad, ctx.step)
    checks.update(out.x_prev, ctx.step)
    if callback is not None:
        callback(StepRecord(ctx.step, ctx.num_steps, ctx.t_model, ctx.x, out.x0, out.guidance))
    return out.x_prev


def elucd_sine_boost(t: int, n: int, sigma2_max: Tensor, sine_factor: float) -> Tensor:
    """EluCD's DDPM variance boost a_t = max(sin(π t/n) σ²_max γ_sine, 0), per sample.

    ``t`` is the respaced step (n − 1 … 0), ``sigma2_max`` the running maximum of the
    scalar variance Σ_t[b, 0, 0, 0] (METHODS.md §5).
    """
    return (math.sin(math.pi * t / n) * sigma2_max * sine_factor).clamp_min(0)


def elucd_heun_scale(i: int, n: int, scale: float, sine_factor: float) -> float:
    """EluCD's Heun guidance size c_i = max(G/(n+1)·(n+1−i), 1e−5) + sin(π i/n)·G·γ_sine."""
    c = max(scale / (n + 1) * (n + 1 - i), 1e-5)
    return c + math.sin(math.pi * i / n) * scale * sine_factor


def ddpm(
    model: EpsModel,
    z: Tensor,
    process: Process,
    *,
    labels: Tensor | None = None,
    guide: Guide | GuidanceMethod | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    clip_denoised: bool = True,
    sine_factor: float = defaults.SINE_FACTOR,
    variance_tracking: Literal["per_sample", "first_sample"] = "per_sample",
    max_variance: float = 0.0,
    start_step: int | None = None,
) -> Tensor:
    """DDPM ancestral sampling with EluCD's guided mean (METHODS.md §5).

    At respaced step t = n − 1 … 0: x̂0 = sqrt(1/ᾱ_t) x_t − sqrt(1/ᾱ_t − 1) ε (clipped to
    [−1, 1] when ``clip_denoised``), the posterior mean μ = c1_t x̂0 + c2_t x_t, and
    x_{t−1} = μ' + [t > 0] exp(½ log Σ) z with the guided mean
    μ' = μ + (Σ + a_t) ⊙ γ g, g the guidance gradient, γ = ``guide.scale`` and the sine boost
    a_t (:func:`elucd_sine_boost`), σ²_max the running maximum of the scalar variance
    Σ[b, 0, 0, 0] (per sample; ``"first_sample"`` reproduces EluCD's batch coupling).
    ``sine_factor=0`` gives ADM's ``condition_mean`` (classic classifier guidance).
    ``start_step`` and ``max_variance`` continue a trajectory part-way: the loop starts at
    respaced index ``start_step`` (default n − 1) with σ²_max = ``max_variance``.
    """
    b, n = z.shape[0], process.num_steps
    _check_labels("ddpm", guide, labels, b)
    method, guide = _split(guide)
    noise = noise or _default_noise()
    sched = process.tensors(z.device, z.dtype)
    checks = _FirstNonFinite(b, z.device, model)
    x = z
    sigma2_max = torch.full((b,), max_variance, dtype=z.dtype, device=z.device)
    with torch.no_grad():
        for t in range(_first_step(n, start_step), -1, -1):
            step = n - 1 - t  # 0 is the noisiest step
            t_model = sched.timesteps[t].expand(b)
            if method is not None and labels is not None:
                net = partial(_checked_model, model, t_model, labels, checks, step)
                update = partial(_ddpm_update, process, noise, t)
                ctx = StepContext(x, t, t_model, labels, process, clip_denoised, net, update, noise)
                x = _method_step(method, ctx, checks, callback)  # guidance
                continue
            out = model(x, t_model, labels)
            checks.model(out, step)
            eps, v = process.split_output(out, x)
            var, log_var = process.variance(v, t, x)
            x0 = sched.sqrt_recip_alphas_cumprod[t] * x - sched.sqrt_recipm1_alphas_cumprod[t] * eps
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            # μ: the mean of the posterior q(x_{t−1} | x_t, x̂0)
            mean = sched.posterior_mean_coef1[t] * x0 + sched.posterior_mean_coef2[t] * x
            res = None
            if guide is not None and labels is not None:
                res = _guide(guide, x, x0, t_model, labels, step / max(n - 1, 1))
                checks.guidance(res.grad, step)
                v0 = var.flatten(1)[:, 0]
                sigma2_max = torch.maximum(
                    sigma2_max, v0 if variance_tracking == "per_sample" else v0[:1]
                )
                a_t = _bcast(elucd_sine_boost(t, n, sigma2_max, sine_factor), x)
                mean = mean + (var + a_t) * guide.scale * res.grad  # guidance
                checks.update(mean, step)
            draw = noise(x)
            x_prev = mean + (0.0 if t == 0 else 1.0) * torch.exp(0.5 * log_var) * draw
            if callback is not None:
                callback(StepRecord(step, n, t_model, x, x0, res))
            x = x_prev
    checks.raise_if_any(lambda step: float(process.timestep_map[n - 1 - step]))
    return x


def ddim(
    model: EpsModel,
    z: Tensor,
    process: Process,
    *,
    labels: Tensor | None = None,
    guide: Guide | GuidanceMethod | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    clip_denoised: bool = True,
    eta: float = defaults.ETA,
    start_step: int | None = None,
) -> Tensor:
    """DDIM sampling; guidance shifts the score: ε' = ε − sqrt(1 − ᾱ_t) γ g (ADM's form).

    x̂0 is recomputed from ε' (not re-clipped, as ADM); then
    x_{t−1} = x̂0 sqrt(ᾱ_{t−1}) + sqrt(1 − ᾱ_{t−1} − σ²) ε' + σ z,
    σ = η sqrt((1 − ᾱ_{t−1})/(1 − ᾱ_t)) sqrt(1 − ᾱ_t/ᾱ_{t−1}).
    ``start_step`` starts the loop at that respaced index (default n − 1).
    """
    b, n = z.shape[0], process.num_steps
    _check_labels("ddim", guide, labels, b)
    method, guide = _split(guide)
    noise = noise or _default_noise()
    sched = process.tensors(z.device, z.dtype)
    checks = _FirstNonFinite(b, z.device, model)
    x = z
    with torch.no_grad():
        for t in range(_first_step(n, start_step), -1, -1):
            step = n - 1 - t
            t_model = sched.timesteps[t].expand(b)
            if method is not None and labels is not None:
                net = partial(_checked_model, model, t_model, labels, checks, step)
                update = partial(_ddim_update, process, noise, t, eta)
                ctx = StepContext(x, t, t_model, labels, process, clip_denoised, net, update, noise)
                x = _method_step(method, ctx, checks, callback)  # guidance
                continue
            out = model(x, t_model, labels)
            checks.model(out, step)
            eps, _ = process.split_output(out, x)
            x0 = process.x0_from_eps(x, t, eps)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            eps = process.eps_from_x0(x, t, x0)  # ε consistent with the clipped x̂0
            res = None
            if guide is not None and labels is not None:
                eps, x0, res = _shift_score(
                    guide, process, sched, x, x0, eps, t, t_model, labels, checks, step, n
                )  # guidance
            abar, abar_prev = sched.alphas_cumprod[t], sched.alphas_cumprod_prev[t]
            sigma = (
                eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            )
            draw = noise(x)
            x_prev = x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
            if _ddim_noise_at(process, t):
                x_prev = x_prev + sigma * draw
            if callback is not None:
                callback(StepRecord(step, n, t_model, x, x0, res))
            x = x_prev
    checks.raise_if_any(lambda step: float(process.timestep_map[n - 1 - step]))
    return x


def _ddim_noise_at(process: Process, t: int) -> bool:
    """Whether DDIM's step t adds σ z: every step but the last, and the last too when its ᾱ_prev
    is below 1 (diffusers' ``set_alpha_to_one=False``: DDIMScheduler adds that noise). Decided on
    the host, so that a draw that must not count (σ = 0) never enters the state."""
    return t > 0 or bool(process.alphas_cumprod_prev[0] < 1)


def _rms(v: Tensor) -> Tensor:
    """sqrt(mean over C, H, W of v²), per sample, shaped for broadcasting."""
    return _bcast(v.pow(2).flatten(1).mean(1).sqrt(), v)


def heun(
    model: Denoiser,
    z: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    labels: Tensor | None = None,
    guide: Guide | GuidanceMethod | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    sine_factor: float = defaults.SINE_FACTOR,
    guidance_input: Literal["x", "denoised"] = "x",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """EDM's Heun sampler (EDM Algorithm 2, ``edm_sampler``) with EluCD's guided displacement.

    Step i = 0 … n−1 from σ_i to σ_{i+1} (σ_n = 0), x_0 = z σ_0:

    1. churn: γ_i = min(S_churn/n, √2 − 1) if S_tmin ≤ σ_i ≤ S_tmax else 0; σ̂ = σ_i + γ_i σ_i
       and x̂ = x_i + sqrt(σ̂² − σ_i²) S_noise ε_i (σ̂ is not rounded: EDM's ``round_sigma`` is
       the identity for these float grids);
    2. guidance (EluCD Algorithm 2, EluCD's EDM ``generate.py``): x̂ ← x̂ + Δ with
       Δ = g/rms(g) · rms(x_i) · c_i (:func:`elucd_heun_scale`, G = ``guide.scale``) and g the
       guidance gradient at x_in = x_i / max(1, rms(x_i)) (``guidance_input="denoised"``: at
       D(x_i, σ_i)), the guide receiving σ_i: computed at x_i before the churn, added after it
       (without churn, x̂ = x_i);
    3. Euler: d = (x̂ − D(x̂, σ̂))/σ̂, x_{i+1} = x̂ + (σ_{i+1} − σ̂) d, and where σ_{i+1} > 0
       Heun's correction x_{i+1} = x̂ + (σ_{i+1} − σ̂)(d + d')/2, d' = (x_{i+1} −
       D(x_{i+1}, σ_{i+1}))/σ_{i+1}.

    Noise draws: when ``s_churn > 0`` one ε_i = ``noise(x)`` per step, at every step (also
    where γ_i = 0, and at the last), as the reference's ``randn_like`` schedule; when
    ``s_churn == 0`` (the default, deterministic) ``noise`` is never called and the sampler is
    EDM's deterministic Heun. The step record's ``x`` is the state the Heun step starts from
    (x̂ + Δ), its ``t`` σ̂.
    """
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0; got {s_churn}, {s_noise}")
    b = z.shape[0]
    _check_labels("heun", guide, labels, b)
    if isinstance(guide, GuidanceMethod):
        raise ValueError(
            f"heun: guidance method {guide.name!r} is refused: {REFUSED_SAMPLERS['heun']}"
        )
    sig_t = torch.as_tensor(sigmas, dtype=torch.float64)
    n = len(sig_t) - 1
    sig = sig_t.to(z)  # the arithmetic on the device, in the state's dtype
    sig_host = sig_t.tolist()  # control flow (churn window, last step) without device reads
    if s_churn > 0:
        noise = noise or _default_noise()
    checks = _FirstNonFinite(b, z.device, model)
    t_hat_host: list[float] = []
    x = z * sig[0]
    with torch.no_grad():
        for i in range(n):
            s, s_next = sig[i], sig[i + 1]
            res, delta = None, None
            if guide is not None and labels is not None:
                # EluCD Algorithm 2: the displacement is computed at x_i, before the churn
                s_i = s.expand(b)
                rms_x = _rms(x)
                if guidance_input == "x":
                    x_in = x / rms_x.clamp_min(1.0)
                else:
                    x_in = model(x, s_i, labels)
                    checks.model(x_in, i)
                res = _guide(guide, x, x_in, s_i, labels, i / max(n - 1, 1))
                checks.guidance(res.grad, i)
                c_i = elucd_heun_scale(i, n, guide.scale, sine_factor)
                delta = res.grad / _rms(res.grad) * rms_x * c_i
            gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sig_host[i] <= s_tmax else 0.0
            if s_churn > 0 and noise is not None:
                s_hat = s + gamma * s
                x = x + (s_hat**2 - s**2).sqrt() * s_noise * noise(x)
                s = s_hat
            t_hat_host.append(sig_host[i] * (1 + gamma))
            s_b = s.expand(b)
            if delta is not None:
                x = x + delta  # guidance
                checks.update(x, i)
            denoised = model(x, s_b, labels)
            checks.model(denoised, i, given=x)
            d = (x - denoised) / s
            x_next = x + (s_next - s) * d
            if sig_host[i + 1] > 0:
                second = model(x_next, s_next.expand(b), labels)
                checks.model(second, i, given=x_next)
                d_prime = (x_next - second) / s_next
                x_next = x + (s_next - s) * (0.5 * d + 0.5 * d_prime)
            if callback is not None:
                callback(StepRecord(i, n, s_b, x, denoised, res))
            x = x_next
    checks.raise_if_any(lambda step: t_hat_host[step])
    return x
