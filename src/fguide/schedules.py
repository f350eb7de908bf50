"""Noise schedules, ADM respacing, the respaced VP process, and EDM sigmas (METHODS.md §1).

Everything here is a pure function of its arguments; arrays are float64 numpy as in ADM, and
:meth:`Process.tensors` gives them as tensors of the caller's device and dtype, cached (ADM
casts to float32; fguide keeps the caller's precision so float64 runs reproduce the references
to ~1e-15; the samplers index them on the device, with no host copy per step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from fguide.params import ParamError

VarianceType = Literal["learned_range", "fixed_large", "fixed_small"]


def betas_for(schedule: str, num_steps: int = 1000) -> np.ndarray:
    """β_1..β_T of the ``linear`` (ADM, scaled by 1000/T) or ``cosine`` schedule, float64."""
    if num_steps < 1:
        raise ValueError(f"diffusion_steps must be >= 1; got {num_steps}")
    if schedule == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if schedule == "cosine":

        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [
                min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999)
                for i in range(num_steps)
            ],
            dtype=np.float64,
        )
    raise ParamError("{0} must be 'linear' or 'cosine'; got {v!r}", "noise_schedule", v=schedule)


_RESPACING = "timestep_respacing"  # the parameter's name in ADM's API (``--steps`` in the CLI)


def space_timesteps(num_steps: int, section_counts: str) -> list[int]:
    """ADM's ``space_timesteps``: the sorted original timesteps kept by a respacing string.

    ``""`` keeps all T steps; ``"250"`` or ``"10,10,5"`` cut T into sections with evenly
    spaced, banker's-rounded picks; ``"ddimN"`` keeps ``range(0, T, s)`` for the smallest
    stride s giving exactly N steps.
    """
    if section_counts == "":
        return list(range(num_steps))
    if section_counts.startswith("ddim"):
        try:
            desired = int(section_counts[len("ddim") :])
        except ValueError:
            raise ParamError("{0} {v!r}: expected 'ddimN'", _RESPACING, v=section_counts) from None
        for step in range(1, num_steps):
            if len(range(0, num_steps, step)) == desired:
                return list(range(0, num_steps, step))
        raise ParamError(
            "{0} {v!r}: cannot create exactly {desired} steps from {n} with an integer stride",
            _RESPACING,
            v=section_counts,
            desired=desired,
            n=num_steps,
        )
    try:
        counts = [int(x) for x in section_counts.split(",")]
    except ValueError:
        raise ParamError(
            "{0} {v!r}: expected '', 'N', 'N1,N2,...' or 'ddimN'", _RESPACING, v=section_counts
        ) from None
    size_per = num_steps // len(counts)
    extra = num_steps % len(counts)
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ParamError(
                "{0} {v!r}: cannot divide a section of {size} steps into {count}",
                _RESPACING,
                v=section_counts,
                size=size,
                count=count,
            )
        stride: float = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class ProcessTensors:
    """The arrays of a :class:`Process` as tensors on one device and dtype (METHODS.md §1).

    Index with the respaced step: ``sched.alphas_cumprod[i]`` is ᾱ_i (a 0-d tensor, broadcast
    against the state; no host copy per step). ``timesteps[i]`` is what the network receives,
    k_i (int64), or k_i · 1000/T (float64) when the process rescales timesteps.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    fixed_large_variance: Tensor
    fixed_large_log_variance: Tensor
    timesteps: Tensor


_ARRAYS = tuple(f.name for f in fields(ProcessTensors) if f.name != "timesteps")


@dataclass(eq=False)
class Process:
    """A (respaced) VP diffusion process with ADM's derived arrays, indexed by respaced step t.

    ``timestep_map[t]`` is the original training timestep k_t passed to the model. The derived
    arrays are float64 numpy attributes (``process.alphas_cumprod``; ``process["name"]`` still
    works); :meth:`tensors` gives them on a device, cached per (device, dtype).
    """

    betas: np.ndarray
    timestep_map: np.ndarray
    variance_type: VarianceType = "learned_range"
    num_train_steps: int = 1000
    rescale_timesteps: bool = False
    alphas_cumprod: np.ndarray = field(init=False, repr=False)
    alphas_cumprod_prev: np.ndarray = field(init=False, repr=False)
    sqrt_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_one_minus_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recip_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recipm1_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    posterior_variance: np.ndarray = field(init=False, repr=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef1: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef2: np.ndarray = field(init=False, repr=False)
    fixed_large_variance: np.ndarray = field(init=False, repr=False)
    fixed_large_log_variance: np.ndarray = field(init=False, repr=False)
    _cache: dict[tuple[torch.device, torch.dtype], ProcessTensors] = field(
        init=False, repr=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        b = self.betas = np.asarray(self.betas, dtype=np.float64)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        self.posterior_variance = post_var
        # log of the posterior variance with its t = 0 entry (zero) replaced by t = 1's
        self.posterior_log_variance_clipped = (
            np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.log(b)
        )
        self.posterior_mean_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)
        self.fixed_large_variance = np.append(post_var[1], b[1:]) if len(b) > 1 else b
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in _ARRAYS:
            raise KeyError(f"Process has no array {name!r}; it has {', '.join(_ARRAYS)}")
        arr: np.ndarray = getattr(self, name)
        return arr

    def tensors(
        self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
    ) -> ProcessTensors:
        """The arrays as ``dtype`` tensors on ``device`` (cast from float64), built once."""
        key = (torch.device(device), dtype)
        cached = self._cache.get(key)
        if cached is None:
            k = torch.from_numpy(self.timestep_map.astype(np.int64))
            steps = k.double() * (1000.0 / self.num_train_steps) if self.rescale_timesteps else k
            cached = ProcessTensors(
                **{
                    n: torch.from_numpy(getattr(self, n)).to(device=key[0], dtype=dtype)
                    for n in _ARRAYS
                },
                timesteps=steps.to(key[0]),
            )
            self._cache[key] = cached
        return cached

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The timestep the network receives: k_t (or k_t · 1000/T when rescaled)."""
        return self.tensors(t.device).timesteps[t]

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε."""
        s = self.tensors(x0.device, x0.dtype)
        return (
            _at(s.sqrt_alphas_cumprod, t, x0) * x0
            + _at(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def x0_from_eps(self, x_t: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """x̂0 = sqrt(1/ᾱ_t) x_t − sqrt(1/ᾱ_t − 1) ε."""
        s = self.tensors(x_t.device, x_t.dtype)
        return (
            _at(s.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _at(s.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def eps_from_x0(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        """ε = (sqrt(1/ᾱ_t) x_t − x̂0) / sqrt(1/ᾱ_t − 1)."""
        s = self.tensors(x_t.device, x_t.dtype)
        return (_at(s.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _at(
            s.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """μ = c1_t x̂0 + c2_t x_t (the mean of q(x_{t−1} | x_t, x̂0))."""
        s = self.tensors(x_t.device, x_t.dtype)
        return _at(s.posterior_mean_coef1, t, x_t) * x0 + _at(s.posterior_mean_coef2, t, x_t) * x_t

    def split_output(self, model_output: Tensor, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """(ε, v) from an ε-model's output: v is the learned-range interpolation input (the
        second C channels) or None for fixed variances."""
        c = like.shape[1]
        if self.variance_type == "learned_range":
            if model_output.shape[1] != 2 * c:
                raise ValueError(
                    f"learned-range variance needs a model output of {2 * c} channels "
                    f"(ε and v); got {model_output.shape[1]}"
                )
            return model_output[:, :c], model_output[:, c:]
        return model_output[:, :c], None

    def variance(self, v: Tensor | None, t: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(Σ, log Σ) of p(x_{t−1} | x_t): for ``learned_range`` log Σ = frac log β_t +
        (1 − frac) log β̃_t with frac = (v + 1)/2; else the fixed large (β_t, with β̃_1 at
        t = 0) or small (β̃_t) variance, broadcast to ``like``."""
        s = self.tensors(like.device, like.dtype)
        if v is not None:
            min_log = _at(s.posterior_log_variance_clipped, t, like)
            max_log = torch.log(_at(s.betas, t, like))
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_var), log_var
        if self.variance_type == "fixed_large":
            var_t, log_var_t = s.fixed_large_variance, s.fixed_large_log_variance
        else:
            var_t, log_var_t = s.posterior_variance, s.posterior_log_variance_clipped
        return _at(var_t, t, like).expand_as(like), _at(log_var_t, t, like).expand_as(like)

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor | int, clip_denoised: bool = True
    ) -> PMeanVariance:
        """ADM's ``p_mean_variance`` for an ε-prediction model output (C or 2C channels).

        ``t`` is the respaced step: an int (the whole batch) or a per-sample tensor.
        """
        eps, v = self.split_output(model_output, x_t)
        var, log_var = self.variance(v, t, x_t)
        x0 = self.x0_from_eps(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        return PMeanVariance(self.posterior_mean(x0, x_t, t), var, log_var, x0, eps)


def _at(arr: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
    """arr[t] shaped to broadcast against ``like``: a 0-d tensor for an int t, [B, 1, ...] for
    per-sample steps."""
    if isinstance(t, int):
        return arr[t]
    return arr[t.to(arr.device)].reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class PMeanVariance:
    """Output of :meth:`Process.p_mean_variance`: μ, Σ, log Σ, x̂0 and the model's ε."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_xstart: Tensor
    eps: Tensor


def make_process(
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    timestep_respacing: str = "",
    variance_type: VarianceType = "learned_range",
    rescale_timesteps: bool = False,
) -> Process:
    """The respaced process ADM's ``create_gaussian_diffusion`` builds.

    Respaced betas β'_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}}; derived arrays are rebuilt from them (even
    for the empty respacing, as ADM does).
    """
    if variance_type not in ("learned_range", "fixed_large", "fixed_small"):
        raise ValueError(
            "variance_type must be learned_range, fixed_large or fixed_small; "
            f"got {variance_type!r}"
        )
    return process_from_betas(
        betas_for(noise_schedule, diffusion_steps),
        timestep_respacing,
        variance_type,
        rescale_timesteps,
    )


def process_from_betas(
    betas: np.ndarray,
    respacing: str = "",
    variance_type: VarianceType = "learned_range",
    rescale_timesteps: bool = False,
) -> Process:
    """The ADM-respaced process of training betas (:func:`make_process` for named schedules).

    Kept steps k_i from :func:`space_timesteps`; β'_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}}.
    """
    betas = np.asarray(betas, dtype=np.float64)
    kept = space_timesteps(len(betas), respacing)
    return process_at_timesteps(betas, kept, variance_type, rescale_timesteps)


def process_at_timesteps(
    betas: np.ndarray,
    timesteps: Sequence[int] | np.ndarray,
    variance_type: VarianceType = "learned_range",
    rescale_timesteps: bool = False,
) -> Process:
    """The process of training betas kept at the given training timesteps k_i (any order;
    sorted and made unique): β'_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}} (ᾱ_{k_{−1}} = 1), as
    :func:`process_from_betas` does for a respacing string."""
    betas = np.asarray(betas, dtype=np.float64)
    kept = sorted({int(k) for k in timesteps})
    if not kept or kept[0] < 0 or kept[-1] >= len(betas):
        raise ValueError(f"timesteps must lie in [0, {len(betas)}); got {list(timesteps)[:8]}")
    ac = np.cumprod(1.0 - betas)
    prev = np.append(1.0, ac[kept][:-1])
    return Process(
        betas=1.0 - ac[kept] / prev,
        timestep_map=np.asarray(kept, dtype=np.int64),
        variance_type=variance_type,
        num_train_steps=len(betas),
        rescale_timesteps=rescale_timesteps,
    )


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """EDM sigmas σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then σ_n = 0."""
    if num_steps < 2:
        raise ValueError(f"EDM needs num_steps >= 2; got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
    i = torch.arange(num_steps, dtype=torch.float64)
    s = (
        sigma_max ** (1 / rho)
        + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])
