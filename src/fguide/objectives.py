"""Guidance objectives: scores S(f, y) on classifier logits and their closed-form dS/df.

Every guidance method of the paper is a score on the logits f ∈ R^{B×N} (METHODS.md §2–3):

    S = S_base + λ(u) H(p) − α D_f(q_y ‖ p),     S_base = τ1 f_y − log Σ_i exp(τ2 f_i),

optionally tilted over a group of samples. An :class:`Objective` is a small frozen config that
returns the coefficients c = ∂S/∂f in closed form; the guidance gradient is then one
vector-Jacobian product Jᵀc through the classifier (see :mod:`fguide.guidance`). ``score``
evaluates S itself, for tests and diagnostics.

All logs of p come from ``log_softmax``: near-one-hot rows, the very rows where guidance
vanishes, underflow in ``log(softmax(f))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fguide import defaults
from fguide.params import ParamError

Generator = Callable[[Tensor], Tensor]
"""A convex f-divergence generator f(t), elementwise on a tensor, with f(1) = 0."""

LambdaSchedule = Literal["linear", "cosine", "constant"]
DIVERGENCES = ("rkl", "fkl", "js", "hellinger")
METHODS = ("base", "logsoftmax", "entropy", "rkl", "fkl", "js", "hellinger", "f", "tilted")


def _check_finite_logits(logits: Tensor) -> None:
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(dim=-1).nonzero().flatten().tolist()
        raise ValueError(
            f"classifier logits are not finite (samples {bad[:8]}{'…' if len(bad) > 8 else ''}); "
            "guidance needs finite logits"
        )


def check_labels(logits: Tensor, labels: Tensor) -> None:
    """Raise a ValueError naming ``labels`` unless they are [B] integers in [0, N) for logits
    [B, N] (reads the label range back from the device once)."""
    if logits.ndim != 2:
        raise ValueError(
            f"classifier must return logits of shape [B, N]; got {tuple(logits.shape)}"
        )
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must have shape [{logits.shape[0]}] to match the logits; "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}")
    if labels.numel():
        lo_i, hi_i = torch.stack(list(torch.aminmax(labels))).tolist()
        if lo_i < 0 or hi_i >= logits.shape[-1]:
            raise ValueError(
                f"labels must lie in [0, {logits.shape[-1]}) for a classifier with "
                f"{logits.shape[-1]} classes; got range [{lo_i}, {hi_i}]"
            )


def base_score(logits: Tensor, labels: Tensor, tau1: float, tau2: float) -> Tensor:
    """S_base = τ1 f_y − log Σ_i exp(τ2 f_i) per sample (EluCD's log p_{τ1,τ2}(y|x))."""
    f_y = logits.gather(-1, labels[:, None]).squeeze(-1)
    return tau1 * f_y - torch.logsumexp(tau2 * logits, dim=-1)


def base_coefficients(logits: Tensor, labels: Tensor, tau1: float, tau2: float) -> Tensor:
    """∂S_base/∂f_k = τ1 1[k=y] − τ2 softmax(τ2 f)_k."""
    c = -tau2 * torch.softmax(tau2 * logits, dim=-1)
    return c.scatter_add(-1, labels[:, None], torch.full_like(c[:, :1], tau1))


def entropy(logits: Tensor) -> Tensor:
    """H(p) = −Σ p_i log p_i with p = softmax(f)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_coefficients(logits: Tensor) -> Tensor:
    """∂H/∂f_k = −p_k (log p_k + H)."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    h = -(p * logp).sum(-1, keepdim=True)
    return -p * (logp + h)


def target_distribution(labels: Tensor, num_classes: int, eps: float, like: Tensor) -> Tensor:
    """q_y(i) = (1 − ε)/N + ε 1[i = y]."""
    q = torch.full(
        (labels.shape[0], num_classes),
        (1.0 - eps) / num_classes,
        dtype=like.dtype,
        device=like.device,
    )
    return q.scatter_add(-1, labels[:, None], torch.full_like(q[:, :1], eps))


def _xlogy(x: Tensor, log_y: Tensor) -> Tensor:
    """x · log y with 0 · log 0 = 0 (log y given)."""
    return torch.where(x == 0, torch.zeros_like(x), x * log_y)


def divergence(name: str, logits: Tensor, q: Tensor, generator: Generator | None = None) -> Tensor:
    """D_f(q ‖ p) = Σ_i q_i f(p_i/q_i) per sample, for a named or user generator."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    logq = torch.log(q)
    if name == "rkl":
        return (_xlogy(q, logq) - _xlogy(q, logp)).sum(-1)
    if name == "fkl":
        return (p * (logp - logq)).sum(-1)
    if name == "js":
        log_m = torch.logaddexp(logp, logq) - math.log(2.0)
        return (_xlogy(p, logp) + _xlogy(q, logq) - _xlogy(p + q, log_m)).sum(-1)
    if name == "hellinger":
        return ((p.sqrt() - q.sqrt()) ** 2).sum(-1)
    if generator is None:
        raise ValueError(
            f"unknown divergence {name!r}; choose one of {DIVERGENCES} or pass a generator"
        )
    return (q * generator((logp - logq).exp())).sum(-1)


def divergence_coefficients(
    name: str, logits: Tensor, q: Tensor, generator: Generator | None = None
) -> Tensor:
    """∂D_f(q‖p)/∂f_k = w_k − p_k Σ_i w_i with w_i = p_i f'(p_i/q_i) (paper Prop. 2)."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    if name == "rkl":
        w = -q
    elif name == "fkl":
        w = p * (logp - torch.log(q) + 1.0)
    elif name == "js":
        # f'(t) = log(2t/(t+1)), so w_i = p_i (log 2 + log p_i − log(p_i + q_i)).
        w = p * (math.log(2.0) + logp - torch.logaddexp(logp, torch.log(q)))
    elif name == "hellinger":
        w = p - torch.exp(0.5 * (logp + torch.log(q)))
    else:
        if generator is None:
            raise ValueError(f"unknown divergence {name!r}; choose one of {DIVERGENCES}")
        w = p * _generator_derivative(generator, logp - torch.log(q))
    return w - p * w.sum(-1, keepdim=True)


def _generator_derivative(generator: Generator, log_t: Tensor) -> Tensor:
    """f'(t) by autograd on the scalar generator, in float64.

    t is floored at the smallest normal float64 so that p · f'(p/q) stays finite (and ≈ 0) for
    classes whose probability underflowed, e.g. f'(t) = −1/t at t = 0.
    """
    with torch.enable_grad():
        t = log_t.detach().double().exp().clamp_min(torch.finfo(torch.float64).tiny)
        t.requires_grad_(True)
        (d,) = torch.autograd.grad(generator(t).sum(), t)
    return d.to(log_t.dtype)


@dataclass(frozen=True)
class EntropyRegularizer:
    """λ(u) H(p), with λ decreasing over sampling progress u ∈ [0, 1] (METHODS.md §3)."""

    lam_max: float = defaults.LAM_MAX
    lam_min: float = defaults.LAM_MIN
    schedule: LambdaSchedule = defaults.LAM_SCHEDULE

    def lam(self, progress: float) -> float:
        """λ at progress u (u = 0 the first, noisiest step; u = 1 the last)."""
        u = min(max(progress, 0.0), 1.0)
        if self.schedule == "linear":
            return self.lam_max + (self.lam_min - self.lam_max) * u
        if self.schedule == "cosine":
            return self.lam_min + (self.lam_max - self.lam_min) * (1.0 + math.cos(math.pi * u)) / 2
        return self.lam_max


@dataclass(frozen=True)
class DivergenceRegularizer:
    """−α D_f(q_y ‖ p), with q_y the ε-smoothed one-hot target."""

    name: str = "rkl"
    alpha: float = defaults.ALPHA["rkl"]
    eps: float = defaults.EPS
    generator: Generator | None = None


@dataclass(frozen=True)
class Tilt:
    """Tilted batch weights w_i = G softmax(t_tilt s)_i within groups of G (mean one).

    ``group_size=None`` makes the whole batch one group. t_tilt < 0 up-weights samples whose
    base score s_i is low (the paper's best: −0.2). Tilting couples the samples of a group.
    """

    t_tilt: float = defaults.T_TILT
    group_size: int | None = None

    def weights(self, base_scores: Tensor) -> Tensor:
        """Mean-one weights per group, from the per-sample base scores s_i (no gradient)."""
        s = base_scores.detach()
        if self.t_tilt == 0.0:
            return torch.ones_like(s)  # exactly the base method (G · 1/G need not round to 1)
        n = s.shape[0]
        g = self.group_size or n
        whole = n - n % g
        out = torch.empty_like(s)
        # the whole groups as rows of one [n // g, g] softmax (a loop over groups cost the
        # demo's 250 groups per step 250 kernel calls); a short last group on its own
        groups = s[:whole].reshape(-1, g)
        out[:whole] = (g * torch.softmax(self.t_tilt * groups, dim=1)).reshape(-1)
        if whole < n:
            out[whole:] = (n - whole) * torch.softmax(self.t_tilt * s[whole:], dim=0)
        return out


@dataclass(frozen=True)
class Objective:
    """A guidance objective: base score + optional entropy + optional divergence + optional tilt.

    ``coefficients(logits, labels, progress)`` returns c = ∂S/∂f per sample, already multiplied
    by the tilt weight w_i when tilted, so that the guidance gradient is Jᵀc in one backward pass.
    """

    tau1: float = defaults.TAU1
    tau2: float = None  # type: ignore[assignment]  # None: 0.5 τ1 (set in __post_init__)
    entropy: EntropyRegularizer | None = None
    divergence: DivergenceRegularizer | None = None
    tilt: Tilt | None = None
    name: str = "base"

    def __post_init__(self) -> None:
        if self.tau2 is None:  # EluCD's marginal temperature follows the joint one
            object.__setattr__(self, "tau2", defaults.TAU2_RATIO * self.tau1)
        _validate(self)

    def score(self, logits: Tensor, labels: Tensor, progress: float = 0.0) -> Tensor:
        """Per-sample S (untilted) at sampling progress u."""
        s = base_score(logits, labels, self.tau1, self.tau2)
        if self.entropy is not None:
            s = s + self.entropy.lam(progress) * entropy(logits)
        if self.divergence is not None:
            d = self.divergence
            q = target_distribution(labels, logits.shape[-1], d.eps, logits)
            s = s - d.alpha * divergence(d.name, logits, q, d.generator)
        return s

    def tilted_score(self, logits: Tensor, labels: Tensor, progress: float = 0.0) -> Tensor:
        """Per-sample S scaled by the detached mean-one tilt weights (S itself when untilted).

        Its gradient is the tilted guidance gradient: Σ_i w_i ∇S_i.
        """
        s = self.score(logits, labels, progress)
        w = self.weights(logits, labels)
        return s if w is None else w * s

    def weights(self, logits: Tensor, labels: Tensor) -> Tensor | None:
        """Tilt weights w_i from the base scores, or None when untilted."""
        if self.tilt is None:
            return None
        return self.tilt.weights(base_score(logits, labels, self.tau1, self.tau2))

    def coefficients(self, logits: Tensor, labels: Tensor, progress: float = 0.0) -> Tensor:
        """c = ∂S/∂f (times the tilt weight w_i per row when tilted)."""
        return self.coefficients_and_weights(logits, labels, progress)[0]

    def coefficients_and_weights(
        self, logits: Tensor, labels: Tensor, progress: float = 0.0
    ) -> tuple[Tensor, Tensor | None]:
        """(c, w): the coefficients of :meth:`coefficients` and the tilt weights they include."""
        logits = logits.detach()
        c = base_coefficients(logits, labels, self.tau1, self.tau2)
        if self.entropy is not None:
            c = c + self.entropy.lam(progress) * entropy_coefficients(logits)
        if self.divergence is not None:
            d = self.divergence
            q = target_distribution(labels, logits.shape[-1], d.eps, logits)
            c = c - d.alpha * divergence_coefficients(d.name, logits, q, d.generator)
        w = self.weights(logits, labels)
        return (c if w is None else c * w[:, None]), w

    def check_inputs(self, logits: Tensor, labels: Tensor) -> None:
        """Raise a clear error for labels that do not fit the logits (:func:`check_labels`) or
        non-finite logits."""
        check_labels(logits, labels)
        _check_finite_logits(logits)


def _validate(obj: Objective) -> None:
    if not (0 < obj.tau1 < math.inf):
        raise ParamError(
            "{0} (joint temperature) must be finite and > 0; got {v}", "tau1", v=obj.tau1
        )
    if not (0 <= obj.tau2 < math.inf):
        raise ParamError(
            "{0} (marginal temperature) must be finite and >= 0; got {v}", "tau2", v=obj.tau2
        )
    if obj.entropy is not None:
        e = obj.entropy
        if e.schedule not in ("linear", "cosine", "constant"):
            raise ParamError(
                "{0} must be linear, cosine or constant; got {v!r}", "lam_schedule", v=e.schedule
            )
        if not (0 <= e.lam_max < math.inf and 0 <= e.lam_min < math.inf):
            raise ParamError(
                "{0} and {1} must be finite and >= 0; got {a}, {b}",
                *("lam_max", "lam_min"),
                a=e.lam_max,
                b=e.lam_min,
            )
    if obj.divergence is not None:
        d = obj.divergence
        if d.name not in DIVERGENCES and d.generator is None:
            raise ValueError(
                f"unknown divergence {d.name!r}; choose one of {DIVERGENCES} or pass generator="
            )
        if not (0 <= d.alpha < math.inf):
            raise ParamError("{0} must be finite and >= 0; got {v}", "alpha", v=d.alpha)
        if not (0.0 <= d.eps <= 1.0):
            raise ParamError("{0} must lie in [0, 1]; got {v}", "eps", v=d.eps)
        if d.eps == 1.0 and (d.name == "fkl" or d.generator is not None):
            raise ParamError(
                "{0} = 1 makes q_y one-hot, and {name!r} needs q_y > 0 everywhere: use {0} < 1",
                "eps",
                name=d.name,
            )
        if d.generator is not None:
            one = d.generator(torch.ones(1, dtype=torch.float64))
            if not torch.allclose(one, torch.zeros_like(one), atol=1e-9):
                raise ValueError(f"generator must satisfy f(1) = 0; got f(1) = {float(one):.3g}")
    if obj.tilt is not None:
        t = obj.tilt
        if not math.isfinite(t.t_tilt):
            raise ParamError("{0} must be finite; got {v}", "t_tilt", v=t.t_tilt)
        if t.group_size is not None and t.group_size < 1:
            raise ParamError("{0} must be >= 1; got {v}", "group_size", v=t.group_size)


def objective(
    name: str = "base",
    *,
    tau1: float = defaults.TAU1,
    tau2: float | None = None,
    alpha: float | None = None,
    eps: float = defaults.EPS,
    generator: Generator | None = None,
    lam_max: float = defaults.LAM_MAX,
    lam_min: float = defaults.LAM_MIN,
    lam_schedule: LambdaSchedule = defaults.LAM_SCHEDULE,
    entropy: bool = False,
    t_tilt: float | None = None,
    group_size: int | None = None,
    sampler: str = "ddpm",
) -> Objective:
    """Build a guidance objective by method name with the paper's defaults (METHODS.md §3, §7).

    Names: ``base`` (EluCD, τ2 = 0.5 τ1 by default), ``logsoftmax`` (plain guidance,
    τ2 = τ1), ``entropy`` (λ from ``lam_max`` to ``lam_min``), ``rkl`` (α 0.1), ``fkl``, ``js``,
    ``hellinger`` (α 0.09), ``f`` with a user ``generator`` (α 0.09), and ``tilted`` (base with
    t_tilt = −0.2). Components compose: ``entropy=True`` adds the entropy term to any method and
    ``t_tilt=`` tilts any method.

    >>> objective("js", alpha=0.09, eps=0.1)  # doctest: +ELLIPSIS
    Objective(tau1=1.0, tau2=0.5, entropy=None, divergence=DivergenceRegularizer(name='js', ...
    """
    if name not in METHODS:
        raise ValueError(f"unknown guidance method {name!r}; choose one of {', '.join(METHODS)}")
    if generator is not None and name != "f":
        raise ValueError(f"generator= is for method 'f'; method {name!r} has its own generator")
    if sampler not in defaults.SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(defaults.SAMPLERS)}; got {sampler!r}")
    if tau2 is None:
        tau2 = defaults.tau2(name, sampler, tau1)
    ent = (
        EntropyRegularizer(lam_max, lam_min, lam_schedule)
        if (entropy or name == "entropy")
        else None
    )
    div = None
    if name in DIVERGENCES or name == "f":
        if name == "f" and generator is None:
            raise ValueError("method 'f' needs generator=, a function f(t) with f(1) = 0")
        div = DivergenceRegularizer(
            name=name,
            alpha=defaults.alpha(name) if alpha is None else alpha,
            eps=eps,
            generator=generator if name == "f" else None,
        )
    elif alpha is not None:
        raise ParamError(
            "{0} is a divergence weight; {1} {name!r} has no divergence term",
            *("alpha", "method"),
            name=name,
        )
    if name == "tilted" and t_tilt is None:
        t_tilt = defaults.T_TILT
    tilt = Tilt(t_tilt, group_size) if t_tilt is not None else None
    return Objective(tau1=tau1, tau2=tau2, entropy=ent, divergence=div, tilt=tilt, name=name)
