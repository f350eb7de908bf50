"""What a sampler hands a training-free method, and the pieces the methods share.

:class:`StepContext` (the sampler's state, network, update and noise at one step),
:class:`Estimate` (one ε-network evaluation: raw and clipped x̂0, ε and the consistent ε̃),
:class:`GuidanceMethod` (the base: the guide's gradients through the denoiser or on x̂0, with
optional Monte-Carlo smoothing), TFG's step-size schedules and the time-travel recurrence. The
methods themselves and their update rules are in :mod:`fguide.training_free`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from fguide.denoisers import NoiseFn
from fguide.guidance import (
    ClassifierFn,
    GuidanceResult,
    LabelsCheck,
    classifier_dtype,
    coefficient_vjp,
)
from fguide.objectives import Objective, check_labels
from fguide.schedules import Process, ProcessTensors

__all__ = [
    "SCHEDULES",
    "Estimate",
    "GuidanceMethod",
    "Schedule",
    "StepContext",
    "StepOutput",
    "mc_noise_level",
    "recur",
    "renoise",
    "schedule_weight",
]

Schedule = Literal["increase", "decrease", "constant"]
SCHEDULES: tuple[Schedule, ...] = ("increase", "decrease", "constant")
Update = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]
"""The sampler's unguided update (x_t, x̂0, ε, v) → x_{t−1}; it draws the step's noise once."""


@dataclass(frozen=True)
class StepContext:
    """What a sampler hands a method at its guidance line, for respaced step ``t``."""

    x: Tensor
    """x_t entering the step (no graph)."""
    t: int
    """Respaced index (n − 1 the noisiest, 0 the last)."""
    t_model: Tensor
    """The timestep the network receives, per sample."""
    labels: Tensor
    process: Process
    clip: bool
    """The sampler's ``clip_denoised``."""
    model: Callable[[Tensor], Tensor]
    """x ↦ the ε-network's output at this step (ε, or [ε, v] for a learned variance)."""
    update: Update
    noise: NoiseFn

    @property
    def num_steps(self) -> int:
        return self.process.num_steps

    @property
    def step(self) -> int:
        """Loop index k (0 the noisiest)."""
        return self.num_steps - 1 - self.t

    @property
    def progress(self) -> float:
        """u = k/(n − 1) ∈ [0, 1], the objectives' sampling progress."""
        return self.step / max(self.num_steps - 1, 1)

    @property
    def sched(self) -> ProcessTensors:
        return self.process.tensors(self.x.device, self.x.dtype)

    @property
    def model_timestep(self) -> int:
        """The original training timestep of this step."""
        return int(self.process.timestep_map[self.t])


@dataclass(frozen=True)
class StepOutput:
    """A method's step: x_{t−1}, the x̂0 it stepped from and its last guidance evaluation."""

    x_prev: Tensor
    x0: Tensor
    guidance: GuidanceResult | None


@dataclass(frozen=True)
class Estimate:
    """The network at x: raw ε and x̂0, the (clipped) x̂0 and its ε̃, the variance input v."""

    eps_raw: Tensor
    x0_raw: Tensor
    x0: Tensor
    eps: Tensor
    v: Tensor | None

    @classmethod
    def of(cls, ctx: StepContext, x: Tensor) -> Estimate:
        """One ε-network evaluation at x (with the graph when x requires grad)."""
        eps_raw, v = ctx.process.split_output(ctx.model(x), x)
        x0_raw = ctx.process.x0_from_eps(x, ctx.t, eps_raw)
        x0 = x0_raw.clamp(-1, 1) if ctx.clip else x0_raw
        return cls(eps_raw, x0_raw, x0, ctx.process.eps_from_x0(x, ctx.t, x0), v)

    def detach(self) -> Estimate:
        v = None if self.v is None else self.v.detach()
        return Estimate(
            self.eps_raw.detach(), self.x0_raw.detach(), self.x0.detach(), self.eps.detach(), v
        )

    def pair(self, raw: bool) -> tuple[Tensor, Tensor]:
        """The (x̂0, ε) pair the update starts from: the raw one (TFG's clip handling) or the
        clipped x̂0 with its ε̃."""
        return (self.x0_raw, self.eps_raw) if raw else (self.x0, self.eps)


def schedule_weight(process: Process, t: int, schedule: Schedule) -> float:
    """TFG's step-size weight w_k = s_t · n / Σ s (mean one over the n steps) with s = α_t
    (``increase``), 1 − α_t (``decrease``) or 1 (``constant``); α_t = 1 − β_t of the respaced
    chain."""
    alphas = 1.0 - process.betas
    s = {"increase": alphas, "decrease": 1.0 - alphas, "constant": np.ones_like(alphas)}[schedule]
    return float(s[t] * len(s) / s.sum())


def mc_noise_level(process: Process, t: int, gamma: float, schedule: Schedule) -> float:
    """TFG's Monte-Carlo noise level γ_k: γ̄ sqrt(1 − ᾱ_t) (``decrease``) or γ̄ (``constant``)."""
    if schedule == "decrease":
        return gamma * math.sqrt(1.0 - float(process.alphas_cumprod[t]))
    return gamma


def renoise(ctx: StepContext, x_prev: Tensor) -> Tensor:
    """Time-travel: a draw of q(x_t | x_{t−1}) = N(sqrt(α_t) x_{t−1}, (1 − α_t) I)."""
    beta = ctx.sched.betas[ctx.t]
    return torch.sqrt(1 - beta) * x_prev + torch.sqrt(beta) * ctx.noise(x_prev)


def recur(ctx: StepContext, times: int, inner: Callable[[Tensor], StepOutput]) -> StepOutput:
    """``inner`` from x_t, then ``times − 1`` times from a time-travelled x_t; the last result."""
    out = inner(ctx.x)
    for _ in range(times - 1):
        out = inner(renoise(ctx, out.x_prev))
    return out


@dataclass(frozen=True)
class GuidanceMethod:
    """A training-free guidance method: a classifier of the clean sample, an objective, and
    the method's hyper-parameters (subclasses). Pass it as a sampler's ``guide=``.

    ``gains`` (keyword, [B] or None): per-sample multipliers of the objective's coefficients,
    hence of every gradient the method takes; every strength of every method multiplies a
    gradient, so a gain g is the method at g times its strengths (to round-off; the recorded
    gradients carry it): a sweep over strengths in one batch.
    """

    classifier: ClassifierFn
    objective: Objective
    gains: Tensor | None = field(default=None, kw_only=True, repr=False, compare=False)
    name: ClassVar[str] = ""
    _labels: LabelsCheck = field(default_factory=LabelsCheck, init=False, repr=False, compare=False)

    def step(self, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    def score_gradient(
        self, ctx: StepContext, x0: Tensor, wrt: Tensor, mc: Tensor | None = None
    ) -> GuidanceResult:
        """∇_wrt Σ_b L_b, L = S(f(x̂0), y) or, with Monte-Carlo offsets ``mc`` [M, B, ...],
        log mean_j exp S(f(x̂0 + δ_j), y): coefficients c = ∂S/∂f (times softmax_j(S) for M > 1)
        and one backward. ``x0`` is ``wrt`` or a function of it in the current graph."""
        b = x0.shape[0]
        rows = x0 if mc is None else (x0[None] + mc).flatten(0, 1)
        ys = ctx.labels if mc is None else ctx.labels.repeat(mc.shape[0])
        logits = self.classifier(rows.to(classifier_dtype(self.classifier) or rows.dtype))
        if self._labels.mode(ctx.labels):
            check_labels(logits.detach()[:b], ctx.labels)
            self._labels.passed(ctx.labels)
        with torch.no_grad():
            f = logits.detach()
            coeff, weights = self.objective.coefficients_and_weights(f, ys, ctx.progress)
            if mc is not None and mc.shape[0] > 1:
                s = self.objective.score(f, ys, ctx.progress).reshape(mc.shape[0], b)
                coeff = coeff * torch.softmax(s, dim=0).reshape(-1, 1)
            if self.gains is not None:
                gains = self.gains.to(coeff).repeat(1 if mc is None else mc.shape[0])
                coeff = coeff * gains[:, None]
        grad = coefficient_vjp(logits, wrt, coeff).to(wrt.dtype)
        return GuidanceResult(
            grad=grad, logits=logits.detach()[:b], labels=ctx.labels, weights=weights
        )

    def through_denoiser(
        self, ctx: StepContext, x: Tensor, raw: bool = False, mc: Tensor | None = None
    ) -> tuple[Estimate, GuidanceResult]:
        """The network at x and g_x = ∇_x L(x̂0(x)) through it (the raw x̂0 when ``raw``)."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            est = Estimate.of(ctx, x_in)
            res = self.score_gradient(ctx, est.x0_raw if raw else est.x0, x_in, mc)
        return est.detach(), res

    def on_x0(self, ctx: StepContext, v: Tensor, mc: Tensor | None = None) -> GuidanceResult:
        """g_0(v) = ∇_v L(v): on x̂0 itself, no denoiser Jacobian."""
        with torch.enable_grad():
            v_in = v.detach().requires_grad_(True)
            return self.score_gradient(ctx, v_in, v_in, mc)
