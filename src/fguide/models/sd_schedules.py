"""Stable Diffusion's sampling steps: the timesteps and the fguide process of each sampler, as
diffusers' ``DDIMScheduler``, ``DDPMScheduler`` and ``DPMSolverMultistepScheduler`` step them.

A sampler runs with the settings ``XScheduler.from_config(folder_config, **overrides)`` would
have: a key in the folder's ``scheduler_config.json`` is used, an absent key takes that
scheduler class's default (DDIM and DDPM: ``timestep_spacing="leading"``; DPM-Solver:
``"linspace"``; ``steps_offset=0``, ...), and ``overrides`` (a named configuration's choices)
win over both. With n steps over T training steps the timesteps k (model inputs, noisiest
first) are:

- ``linspace``: round(linspace(0, T − 1, n)) (DPM-Solver: n + 1 points, the last dropped);
- ``leading``: arange(n) · ⌊T/n⌋ + steps_offset (DPM-Solver: ⌊T/(n+1)⌋, n + 1 points, the
  last dropped);
- ``trailing``: round(arange(T, 0, −T/n)) − 1.

Where each step moves to (ᾱ_to, METHODS.md notation) is each scheduler's own rule:

- **DDIM** from ᾱ_k to ᾱ_{k − ⌊T/n⌋} (the scheduler's ``prev_timestep``, which is the next
  timestep for ``leading`` spacing and whenever n divides T), and to the final ᾱ when that is
  negative: 1 with ``set_alpha_to_one``, else ᾱ_0 (SD's configs);
- **DDPM** to the next timestep's ᾱ, and to 1 at the last step;
- **DPM-Solver++(2M)** to the next timestep's ᾱ, and at the last step to σ = 0
  (``final_sigmas_type="zero"``, ᾱ = 1) or σ_min (``"sigma_min"``, ᾱ_0); the last step is
  first order when ``euler_at_final``, or ``lower_order_final`` with n < 15, or σ = 0.

fguide steps these with its own samplers (:func:`fguide.ddim`, :func:`fguide.ddpm`,
:func:`fguide.samplers_dpm.dpmpp_2m`) on a :class:`TargetProcess`, whose ``alphas_cumprod_prev``
holds ᾱ_to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fguide.schedules import Process, VarianceType, process_at_timesteps

__all__ = [
    "SD_SAMPLERS",
    "SDSampler",
    "SDSchedule",
    "TargetProcess",
    "inference_timesteps",
    "scheduler_settings",
    "sd_schedule",
]

SDSampler = Literal["ddim", "ddpm", "dpmpp-2m"]
SD_SAMPLERS: tuple[SDSampler, ...] = ("ddim", "ddpm", "dpmpp-2m")
_SCHEDULER = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
}
# The keys each scheduler reads, with the class defaults (diffusers 0.3x–0.4x).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": {
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "set_alpha_to_one": True,
        "clip_sample": True,
    },
    "ddpm": {
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "clip_sample": True,
        "variance_type": "fixed_small",
    },
    "dpmpp-2m": {
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "lower_order_final": True,
        "euler_at_final": False,
    },
}
# DPM-Solver settings fguide's dpmpp-2m does not compute: refused when the folder turns them on.
_DPM_REFUSED = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
)
_SPACINGS = ("linspace", "leading", "trailing")


def check_sampler(sampler: str) -> SDSampler:
    """``sampler`` when it is one of :data:`SD_SAMPLERS`; else a ValueError naming ``--sampler``."""
    if sampler not in SD_SAMPLERS:
        raise ValueError(
            f"--sampler {sampler!r} is not a Stable Diffusion sampler; choose one of "
            f"{', '.join(SD_SAMPLERS)}"
        )
    return sampler


def scheduler_settings(
    config: Mapping[str, Any],
    sampler: str,
    overrides: Mapping[str, Any] | None = None,
    where: str = "scheduler config",
) -> dict[str, Any]:
    """The settings ``sampler`` runs with: the folder's ``config`` keys the scheduler reads, the
    class defaults for absent ones, then ``overrides`` (keys of the same set only)."""
    name = check_sampler(sampler)
    out = dict(_DEFAULTS[name])
    out.update({k: config[k] for k in out if k in config})
    for key, value in (overrides or {}).items():
        if key not in out:
            raise ValueError(
                f"{key!r} is not a setting of {_SCHEDULER[name]} ({', '.join(sorted(out))})"
            )
        out[key] = value
    if out["timestep_spacing"] not in _SPACINGS:
        raise ValueError(
            f"{where}: timestep_spacing {out['timestep_spacing']!r} is not one of "
            f"{', '.join(_SPACINGS)}"
        )
    offset = out["steps_offset"]
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{where}: steps_offset must be an integer >= 0; got {offset!r}")
    if name == "dpmpp-2m":
        _check_dpm(config, out, where)
    return out


def _check_dpm(config: Mapping[str, Any], settings: Mapping[str, Any], where: str) -> None:
    on = [k for k in _DPM_REFUSED if config.get(k)]
    if on:
        raise ValueError(
            f"{where}: {on[0]}=true is not supported by fguide's dpmpp-2m (it steps the "
            "scheduler's discrete timesteps)"
        )
    lam = config.get("lambda_min_clipped", float("-inf"))
    if lam is not None and float(lam) != float("-inf"):
        raise ValueError(f"{where}: a finite lambda_min_clipped ({lam}) is not supported")
    if settings["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ValueError(
            f"{where}: final_sigmas_type {settings['final_sigmas_type']!r} is not 'zero' or "
            "'sigma_min'"
        )


def inference_timesteps(
    num_train_steps: int,
    num_steps: int,
    spacing: str,
    steps_offset: int = 0,
    sampler: str = "ddim",
) -> np.ndarray:
    """The n model timesteps, noisiest first, by the scheduler's ``set_timesteps`` rule for
    ``spacing`` (see the module docstring); a ValueError names ``--steps`` when they do not
    fit in [0, T) as n distinct steps."""
    t, n = num_train_steps, num_steps
    if not 1 <= n <= t:
        raise ValueError(f"--steps must lie in [1, {t}] for {t} training steps; got {n}")
    dpm = check_sampler(sampler) == "dpmpp-2m"
    if spacing == "linspace":
        points = np.linspace(0, t - 1, n + 1 if dpm else n).round()[::-1]
        ks = points[:-1] if dpm else points
    elif spacing == "leading":
        ratio = t // (n + 1) if dpm else t // n
        ks = (np.arange(0, n + 1 if dpm else n) * ratio).round()[::-1]
        ks = (ks[:-1] if dpm else ks) + steps_offset
    elif spacing == "trailing":
        ks = np.round(np.arange(t, 0, -t / n)) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not one of {', '.join(_SPACINGS)}")
    ks = np.asarray(ks, dtype=np.int64)
    if len(ks) != n or ks.min() < 0 or ks.max() >= t or np.any(np.diff(ks) >= 0):
        raise ValueError(
            f"--steps {n}: {spacing!r} spacing with steps_offset {steps_offset} does not give "
            f"{n} distinct timesteps in [0, {t}) (got {ks.tolist()[:6]}…)"
        )
    return ks


@dataclass(eq=False)
class TargetProcess(Process):
    """A :class:`~fguide.schedules.Process` whose steps move to given ᾱ targets.

    ``alphas_cumprod_to[i]`` (respaced index i, as every Process array) replaces
    ``alphas_cumprod_prev``, which the DDIM and DPM-Solver updates read; the posterior arrays
    (DDPM's) keep the chain's values.
    """

    alphas_cumprod_to: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alphas_cumprod_to is not None:
            to = np.asarray(self.alphas_cumprod_to, dtype=np.float64)
            if to.shape != self.alphas_cumprod_prev.shape or not np.all((to > 0) & (to <= 1)):
                raise ValueError(f"alphas_cumprod_to must be {self.num_steps} values in (0, 1]")
            self.alphas_cumprod_prev = to


@dataclass(frozen=True)
class SDSchedule:
    """What one SD sampler needs: the process over its timesteps and its switches."""

    sampler: SDSampler
    process: Process
    clip_denoised: bool
    """DDIM/DDPM: the scheduler's ``clip_sample`` (x̂0 clipped to [−1, 1]); DPM-Solver: False."""
    first_order_final: bool
    """DPM-Solver: whether the last step is first order (see the module docstring)."""
    settings: dict[str, Any]

    @property
    def timesteps(self) -> np.ndarray:
        """The model timesteps, noisiest first."""
        return self.process.timestep_map[::-1].copy()


def sd_schedule(
    betas: np.ndarray,
    config: Mapping[str, Any],
    sampler: str,
    num_steps: int,
    overrides: Mapping[str, Any] | None = None,
    where: str = "scheduler config",
) -> SDSchedule:
    """The :class:`SDSchedule` of ``sampler`` with ``num_steps`` steps over the training
    ``betas``, configured by the folder's scheduler ``config`` and ``overrides``."""
    name = check_sampler(sampler)
    s = scheduler_settings(config, name, overrides, where)
    t = len(betas)
    ks = inference_timesteps(t, num_steps, s["timestep_spacing"], s["steps_offset"], name)
    ac = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    if name == "ddpm":
        variance = _ddpm_variance(s["variance_type"], where)
        proc: Process = process_at_timesteps(betas, ks, variance)
        return SDSchedule(name, proc, bool(s["clip_sample"]), False, s)
    asc = ks[::-1]  # respaced index order: the least noisy first
    if name == "ddim":
        final = 1.0 if s["set_alpha_to_one"] else float(ac[0])
        prev = asc - t // num_steps
        to = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    else:
        final = 1.0 if s["final_sigmas_type"] == "zero" else float(ac[0])
        to = np.append(final, ac[asc[:-1]])
    base = process_at_timesteps(betas, ks, "fixed_small")
    proc = TargetProcess(
        betas=base.betas,
        timestep_map=base.timestep_map,
        variance_type="fixed_small",
        num_train_steps=t,
        alphas_cumprod_to=to,
    )
    first_order_final = bool(
        s.get("euler_at_final")
        or (s.get("lower_order_final") and num_steps < 15)
        or s.get("final_sigmas_type") == "zero"
    )
    clip = bool(s["clip_sample"]) if name == "ddim" else False
    return SDSchedule(name, proc, clip, name == "dpmpp-2m" and first_order_final, s)


def _ddpm_variance(kind: Any, where: str) -> VarianceType:
    mapping: dict[str, VarianceType] = {
        "fixed_small": "fixed_small",
        "fixed_small_log": "fixed_small",
        "fixed_large": "fixed_large",
        "fixed_large_log": "fixed_large",
    }
    if kind not in mapping:
        raise ValueError(
            f"{where}: variance_type {kind!r} is not supported for DDPM sampling of a Stable "
            "Diffusion UNet (fixed_small, fixed_small_log, fixed_large, fixed_large_log)"
        )
    return mapping[kind]
