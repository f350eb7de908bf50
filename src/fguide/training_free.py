"""The training-free guidance family beside EluCD's mean shift: DPS, FreeDoM, MPGD, UGD and TFG.

Each method is a small frozen config (the guide: a classifier of the clean sample and an
:class:`~fguide.objectives.Objective`; its hyper-parameters, defaults in :mod:`fguide.defaults`)
with a :meth:`GuidanceMethod.step` that a sampler (:func:`fguide.ddpm`, :func:`fguide.ddim`)
calls at its guidance line with a :class:`StepContext`: the state x_t, the ε-network at this
step, the process, the sampler's own unguided update x_{t−1} = update(x_t, x̂0, ε) and its noise
source. A method takes the whole step, so that it can differentiate the denoiser and repeat
the step; pass it as the sampler's ``guide=``.

Notation (METHODS.md §1; TFG's code, Ye et al. 2024, is the reference): x̂0(x) =
sqrt(1/ᾱ_t) x − sqrt(1/ᾱ_t − 1) ε_θ(x), clipped to [−1, 1] when the sampler clips, ε̃ the ε
re-derived from the clipped x̂0 (the sampler's consistent pair), S the objective's score of the
classifier's logits, g_x = ∇_{x_t} S(f(x̂0(x_t))) (through the denoiser: one ε-network forward
and backward), g_0(v) = ∇_v S(f(v)) (on x̂0 only). Per step (k the loop index, n the steps):

- DPS(ζ): x_{t−1} = update(x_t, x̂0, ε̃) + ζ g_x / (−log p_y(x̂0)).
- FreeDoM(ρ̄, K): x_{t−1} = update(...) + ρ_k g_x, then K − 1 times: time-travel
  x_t ~ q(x_t | x_{t−1}) and redo the step (only within ``window``).
- MPGD(s): v' = x̂0 + s g_0(x̂0); x_{t−1} = update(...) + sqrt(ᾱ_{t−1}) (v' − x̂0).
- UGD(s, K, m): u = x̂0 + m ascent steps u ← u + s g_0(u); x̂0' = x̂0 + s (1−ᾱ_t)/sqrt(ᾱ_t) g_x
  + (u − x̂0) and ε' = ε̃ − s sqrt(1−ᾱ_t) g_x − sqrt(ᾱ_t/(1−ᾱ_t)) (u − x̂0) (a consistent pair);
  x_{t−1} = update(x_t, x̂0', ε'); recurrence K as FreeDoM's.
- TFG(ρ̄, μ̄, γ̄, M, K, N): Δ = ρ_k ∇_{x_t} L(x̂0(x_t)), u = x̂0 + N steps u ← u + μ_k ∇L(u),
  x_{t−1} = update(...) + Δ/sqrt(α_t) + sqrt(ᾱ_{t−1}) (u − x̂0), with L(v) = log mean_j
  exp S(f(v + γ_k z_j)) (M draws; L = S when γ_k = 0); recurrence K.

ρ_k = ρ̄ w_k, μ_k = μ̄ w_k with TFG's mean-one schedules w_k (:func:`schedule_weight`), γ_k =
γ̄ sqrt(1 − ᾱ_t) (``decrease``) or γ̄. Every method builds on the sampler's own update with its
clipping applied consistently (clipped x̂0, ε̃, gradients through the clipped x̂0): at zero
strength and K = 1 a method is the unguided sampler bit for bit. ``tfg_clip=True`` (DPS,
FreeDoM, MPGD, UGD) reproduces TFG's code instead, where the clip reaches only MPGD's and UGD's
x̂0 steps: the step's pair is the raw (x̂0, ε) and g_x goes through the unclipped x̂0.

Noise draws per step and repeat: TFG's M Monte-Carlo draws (when γ_k > 0), the update's one
draw, a time-travel draw between repeats (none after the last, so K = 1 is no recurrence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from fguide import defaults
from fguide.params import ParamError, Range
from fguide.training_free_step import (
    SCHEDULES,
    Estimate,
    GuidanceMethod,
    Schedule,
    StepContext,
    StepOutput,
    mc_noise_level,
    recur,
    schedule_weight,
)

__all__ = [
    "DPS",
    "METHODS",
    "MPGD",
    "TFG",
    "UGD",
    "Estimate",
    "FreeDoM",
    "GuidanceMethod",
    "StepContext",
    "StepOutput",
    "check_supported",
    "mc_noise_level",
    "schedule_weight",
]


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


_FINITE = Range(float)
_COUNT = Range(int, 1)


def _check_common(floats: dict[str, float], ints: dict[str, int]) -> None:
    """Finite floats and integers >= 1, each named."""
    for name, value in floats.items():
        _FINITE.check(name, value)
    for name, value in ints.items():
        _COUNT.check(name, value)


def _check_schedule(name: str, value: str, allowed: tuple[str, ...] = SCHEDULES) -> None:
    if value not in allowed:
        raise ParamError("{0} must be one of {a}; got {v!r}", name, a=", ".join(allowed), v=value)


@dataclass(frozen=True)
class DPS(GuidanceMethod):
    """DPS (Chung et al. 2023) in TFG's classifier form: x_{t−1} = update(x_t, x̂0, ε̃) +
    ζ g_x / (−log p_y(x̂0)), p = softmax(f(x̂0)), the normaliser floored at the dtype's ε.

    TFG divides by |log p_y| (= |S| for ``logsoftmax``); fguide's normaliser is the target's
    negative log-likelihood whatever the objective (S may vanish or change sign), so that the
    objective sets the direction and the normaliser the DPS step length.
    """

    scale: float = defaults.DPS_SCALE
    tfg_clip: bool = False
    name: ClassVar[str] = "dps"

    def __post_init__(self) -> None:
        _check_common({"scale": self.scale}, {})

    def step(self, ctx: StepContext) -> StepOutput:
        est, res = self.through_denoiser(ctx, ctx.x, raw=self.tfg_clip)
        x0, eps = est.pair(self.tfg_clip)
        logp = torch.log_softmax(res.logits, dim=-1).gather(-1, ctx.labels[:, None])
        nll = (-logp).clamp_min(torch.finfo(logp.dtype).eps).to(ctx.x.dtype)
        x_prev = ctx.update(ctx.x, x0, eps, est.v) + self.scale * res.grad / _bcast(nll, ctx.x)
        return StepOutput(x_prev, x0, res)


def _window_check(window: tuple[int, int] | None) -> None:
    if window is None:
        return
    lo, hi = window
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
        raise ParamError(
            "{0} must be two timesteps LO:HI with 0 <= LO <= HI; got {v!r}",
            "recurrence_window",
            v=window,
        )


def _repeats(ctx: StepContext, times: int, window: tuple[int, int] | None) -> int:
    """K inside the window of original timesteps (inclusive; None: every step), else 1."""
    if window is None or window[0] <= ctx.model_timestep <= window[1]:
        return times
    return 1


@dataclass(frozen=True)
class FreeDoM(GuidanceMethod):
    """FreeDoM (Yu et al. 2023) as TFG runs it: x_{t−1} = update(x_t, x̂0, ε̃) + ρ_k g_x with
    ρ_k = ρ̄ w_k (``schedule``), and time-travel: ``recurrence`` K repeats of the step from
    x_t ~ q(x_t | x_{t−1}) at the original timesteps in ``window`` (inclusive; None = all;
    FreeDoM's ImageNet code: K = 10 within (500, 800))."""

    scale: float = defaults.FREEDOM_SCALE
    recurrence: int = defaults.FREEDOM_RECURRENCE
    schedule: Schedule = defaults.FREEDOM_SCHEDULE
    window: tuple[int, int] | None = None
    tfg_clip: bool = False
    name: ClassVar[str] = "freedom"

    def __post_init__(self) -> None:
        _check_common({"scale": self.scale}, {"recurrence": self.recurrence})
        _check_schedule("rho_schedule", self.schedule)
        _window_check(self.window)

    def step(self, ctx: StepContext) -> StepOutput:
        rho = self.scale * schedule_weight(ctx.process, ctx.t, self.schedule)

        def inner(x: Tensor) -> StepOutput:
            est, res = self.through_denoiser(ctx, x, raw=self.tfg_clip)
            x0, eps = est.pair(self.tfg_clip)
            return StepOutput(ctx.update(x, x0, eps, est.v) + rho * res.grad, x0, res)

        return recur(ctx, _repeats(ctx, self.recurrence, self.window), inner)


@dataclass(frozen=True)
class MPGD(GuidanceMethod):
    """MPGD (He et al. 2024) as TFG runs it: v' = x̂0 + s g_0(x̂0) on x̂0 (no denoiser
    Jacobian), x_{t−1} = update(x_t, x̂0, ε̃) + sqrt(ᾱ_{t−1}) (v' − x̂0): DDIM with x̂0 → v' and
    ε kept (the same shift on DDPM). MPGD's code scales the step by 1/sqrt(ᾱ_{t−1}); TFG's,
    followed here, does not."""

    scale: float = defaults.MPGD_SCALE
    tfg_clip: bool = False
    name: ClassVar[str] = "mpgd"

    def __post_init__(self) -> None:
        _check_common({"scale": self.scale}, {})

    def step(self, ctx: StepContext) -> StepOutput:
        est = Estimate.of(ctx, ctx.x)
        x0, eps = est.pair(self.tfg_clip)
        res = self.on_x0(ctx, est.x0)
        moved = est.x0 + self.scale * res.grad
        shift = ctx.sched.alphas_cumprod_prev[ctx.t].sqrt() * (moved - x0)
        return StepOutput(ctx.update(ctx.x, x0, eps, est.v) + shift, x0, res)


@dataclass(frozen=True)
class UGD(GuidanceMethod):
    """Universal guidance (Bansal et al. 2023) as TFG runs it: forward guidance ε' = ε̃ −
    s sqrt(1−ᾱ_t) g_x, backward guidance by ``backward_steps`` m ascent steps u ← u + s g_0(u)
    from x̂0 (TFG's ``iter_steps − 1``; UGD's code uses Adam), the DDIM step of the shifted
    consistent pair, and ``recurrence`` K self-recurrence repeats (``window`` as FreeDoM's)."""

    scale: float = defaults.UGD_SCALE
    recurrence: int = defaults.UGD_RECURRENCE
    backward_steps: int = defaults.UGD_BACKWARD_STEPS
    window: tuple[int, int] | None = None
    tfg_clip: bool = False
    name: ClassVar[str] = "ugd"

    def __post_init__(self) -> None:
        _check_common({"scale": self.scale}, {"recurrence": self.recurrence})
        Range(int, 0).check("backward_steps", self.backward_steps)
        _window_check(self.window)

    def step(self, ctx: StepContext) -> StepOutput:
        s, sched = self.scale, ctx.sched
        abar = sched.alphas_cumprod[ctx.t]

        def inner(x: Tensor) -> StepOutput:
            est, res = self.through_denoiser(ctx, x, raw=self.tfg_clip)
            x0, eps = est.pair(self.tfg_clip)
            u = est.x0
            for _ in range(self.backward_steps):
                u = u + s * self.on_x0(ctx, u).grad
            delta = u - est.x0
            x0_new = x0 + (s * (1 - abar) / abar.sqrt()) * res.grad + delta
            eps_new = eps - (s * (1 - abar).sqrt()) * res.grad - (abar / (1 - abar)).sqrt() * delta
            return StepOutput(ctx.update(x, x0_new, eps_new, est.v), x0, res)

        return recur(ctx, _repeats(ctx, self.recurrence, self.window), inner)


@dataclass(frozen=True)
class TFG(GuidanceMethod):
    """TFG's unified step (Ye et al. 2024): the ρ part through the denoiser (and the clip), the
    μ part as ``iterations`` ascent steps on x̂0, both on the Monte-Carlo-smoothed score
    L(v) = log mean_j exp S(f(v + γ_k z_j)) (``mc_samples`` M draws shared by the ρ part and
    every μ step of a repeat; none when γ_k = 0), and ``recurrence`` K repeats:
    x_{t−1} = update(x_t, x̂0, ε̃) + ρ_k ∇_{x_t}L / sqrt(α_t) + sqrt(ᾱ_{t−1}) (u − x̂0)."""

    rho: float = defaults.TFG_RHO
    mu: float = defaults.TFG_MU
    gamma: float = defaults.TFG_GAMMA
    mc_samples: int = defaults.TFG_MC_SAMPLES
    recurrence: int = defaults.TFG_RECURRENCE
    iterations: int = defaults.TFG_ITERATIONS
    rho_schedule: Schedule = defaults.TFG_RHO_SCHEDULE
    mu_schedule: Schedule = defaults.TFG_MU_SCHEDULE
    gamma_schedule: Literal["decrease", "constant"] = defaults.TFG_GAMMA_SCHEDULE
    name: ClassVar[str] = "tfg"

    def __post_init__(self) -> None:
        _check_common(
            {"rho": self.rho, "mu": self.mu},
            {k: getattr(self, k) for k in ("mc_samples", "recurrence", "iterations")},
        )
        Range(float, 0).check("gamma", self.gamma)
        _check_schedule("rho_schedule", self.rho_schedule)
        _check_schedule("mu_schedule", self.mu_schedule)
        _check_schedule("gamma_schedule", self.gamma_schedule, ("decrease", "constant"))
        if self.objective.tilt is not None and self.mc_samples > 1 and self.gamma > 0:
            raise ParamError(
                "tilting mixes samples, Monte-Carlo smoothing mixes draws: use {0} 1 or {1} 0 "
                "with a tilted objective",
                *("mc_samples", "gamma"),
            )

    def step(self, ctx: StepContext) -> StepOutput:
        rho = self.rho * schedule_weight(ctx.process, ctx.t, self.rho_schedule)
        mu = self.mu * schedule_weight(ctx.process, ctx.t, self.mu_schedule)
        gamma = mc_noise_level(ctx.process, ctx.t, self.gamma, self.gamma_schedule)
        sched = ctx.sched

        def inner(x: Tensor) -> StepOutput:
            mc = None
            if gamma > 0:
                mc = gamma * torch.stack([ctx.noise(x) for _ in range(self.mc_samples)])
            res = None
            if rho != 0:
                est, res = self.through_denoiser(ctx, x, mc=mc)
            else:
                est = Estimate.of(ctx, x)
            x_prev = ctx.update(x, est.x0, est.eps, est.v)
            if res is not None:
                x_prev = x_prev + rho * res.grad / (1 - sched.betas[ctx.t]).sqrt()
            if mu != 0:
                u = est.x0
                for _ in range(self.iterations):
                    res = self.on_x0(ctx, u, mc)
                    u = u + mu * res.grad
                x_prev = x_prev + sched.alphas_cumprod_prev[ctx.t].sqrt() * (u - est.x0)
            return StepOutput(x_prev, est.x0, res)

        return recur(ctx, self.recurrence, inner)


METHODS: dict[str, type[GuidanceMethod]] = {m.name: m for m in (DPS, FreeDoM, MPGD, UGD, TFG)}
"""The training-free methods by name (EluCD's mean shift, ``elucd``, is the samplers' default
guide and not a :class:`GuidanceMethod`)."""

REFUSED_SAMPLERS = {
    "heun": (
        "no paper nor TFG's code defines these methods for EDM's second-order ODE step: where "
        "the update enters relative to Heun's second denoiser evaluation, and what time-travel "
        "(q(x_t | x_{t-1})) and the DDIM x0-slot shift mean on a sigma grid, would be fguide's "
        "inventions; use ddpm or ddim"
    ),
}
REFUSED_CLASSIFIER_INPUT = (
    "the family guides a classifier of the clean sample through x0 (DPS, FreeDoM, UGD and "
    "TFG differentiate x0(x_t) into it, MPGD steps on x0); a noise-aware classifier of x_t has "
    "no x0 input (its gradient at x_t is classic classifier guidance: the default method)"
)


def check_supported(method: str, sampler: str, classifier_input: str = "x0") -> None:
    """Raise a :class:`ParamError` naming ``guidance_method`` where ``method`` is not defined:
    on the Heun (EDM) sampler and with a noise-aware x_t classifier (the reasons, in words)."""
    if method == "elucd":
        return
    if method not in METHODS:
        raise ParamError(
            "{0} must be one of elucd, {m}; got {v!r}",
            "guidance_method",
            m=", ".join(METHODS),
            v=method,
        )
    if sampler in REFUSED_SAMPLERS:
        raise ParamError(
            "{0} {v!r} is not defined on the {s} sampler: {why}",
            "guidance_method",
            v=method,
            s=sampler,
            why=REFUSED_SAMPLERS[sampler],
        )
    if classifier_input != "x0":
        raise ParamError(
            "{0} {v!r} needs a classifier of x0: {why}",
            "guidance_method",
            v=method,
            why=REFUSED_CLASSIFIER_INPUT,
        )
