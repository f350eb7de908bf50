"""Stable Diffusion's sampling steps (:mod:`fguide.models.sd_schedules`) against diffusers'
schedulers: the timesteps of every spacing, and whole trajectories of fguide's DDIM / DDPM /
DPM-Solver++(2M) against ``DDIMScheduler`` / ``DDPMScheduler`` / ``DPMSolverMultistepScheduler``
stepping the same ε-model (float64 where the scheduler computes in the caller's dtype)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import Tensor

import fguide
from fguide.models.hf_diffusers import scheduler_betas
from fguide.models.sd_schedules import scheduler_settings, sd_schedule
from fguide.samplers_dpm import dpmpp_2m

diffusers = pytest.importorskip("diffusers")

# SD 1.5's scheduler file (no timestep_spacing: each scheduler class takes its own default)
SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}
BETAS = scheduler_betas(SD15)
CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
}


def _scheduler(sampler: str, config: dict) -> object:  # type: ignore[type-arg]
    return getattr(diffusers, CLASSES[sampler]).from_config(config)


@pytest.mark.parametrize("sampler", list(CLASSES))
def test_timesteps_are_the_schedulers(sampler: str) -> None:
    cases = itertools.product([None, "linspace", "leading", "trailing"], [1, 2, 3, 7, 50], [0, 1])
    for spacing, n, offset in cases:
        config = dict(SD15, steps_offset=offset)
        if spacing is not None:  # absent: the class default (leading / linspace)
            config["timestep_spacing"] = spacing
        ref = _scheduler(sampler, config)
        ref.set_timesteps(n)  # type: ignore[attr-defined]
        ours = sd_schedule(BETAS, config, sampler, n).timesteps
        np.testing.assert_array_equal(
            ours, ref.timesteps.numpy(), err_msg=f"{spacing} {n} {offset}"
        )  # type: ignore[attr-defined]


def _model(x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
    """A smooth nonlinear ε-model of (x, t) (its outputs depend on the step)."""
    w = (t.to(x.dtype) / 1000).reshape(-1, 1, 1, 1)
    return 0.6 * x.roll(1, dims=1) + 0.3 * torch.tanh(2 * x) * (1 + w) - 0.2 * w


def _float64(sched: object) -> None:
    """The schedulers keep ᾱ in float32; give them fguide's float64 ᾱ (as the DiT tests do)."""
    abar = torch.from_numpy(np.cumprod(1 - BETAS))
    sched.alphas_cumprod = abar  # type: ignore[attr-defined]
    if hasattr(sched, "final_alpha_cumprod") and not sched.config.set_alpha_to_one:  # type: ignore[attr-defined]
        sched.final_alpha_cumprod = abar[0]  # type: ignore[attr-defined]


def _run_scheduler(sched, z: Tensor, n: int, draws: list[Tensor], eta: float = 0.0) -> Tensor:  # type: ignore[no-untyped-def]
    import diffusers.schedulers.scheduling_ddim as ddim_mod
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    sched.set_timesteps(n)
    it = iter(draws)
    x = z

    def fake(*args, **kwargs):  # type: ignore[no-untyped-def]
        return next(it)

    orig = ddim_mod.randn_tensor, ddpm_mod.randn_tensor
    ddim_mod.randn_tensor = ddpm_mod.randn_tensor = fake  # type: ignore[assignment]
    try:
        for t in sched.timesteps:
            kw = {"eta": eta} if isinstance(sched, diffusers.DDIMScheduler) else {}
            x = sched.step(_model(x, t.expand(len(x))), t, x, **kw).prev_sample
    finally:
        ddim_mod.randn_tensor, ddpm_mod.randn_tensor = orig
    return x


class _Replay:
    def __init__(self, draws: list[Tensor]):
        self.draws, self.k = draws, 0

    def __call__(self, like: Tensor) -> Tensor:
        self.k += 1
        return self.draws[self.k - 1]


@pytest.mark.parametrize(
    "sampler,spacing,n,extra,eta",
    [
        ("ddim", None, 10, {}, 0.0),
        ("ddim", None, 10, {}, 0.8),  # the last step's noise: σ > 0 as ᾱ_0 < 1
        ("ddim", "trailing", 7, {}, 0.8),  # T//n = 142 ≠ the gaps: DDIM's prev_timestep
        ("ddim", "linspace", 4, {"set_alpha_to_one": True}, 0.5),
        ("ddpm", None, 6, {}, 0.0),
        ("ddpm", "trailing", 5, {"variance_type": "fixed_large"}, 0.0),
    ],
)
def test_ddim_and_ddpm_match_the_schedulers_in_float64(
    sampler: str,
    spacing: str | None,
    n: int,
    extra: dict,
    eta: float,  # type: ignore[type-arg]
) -> None:
    config = dict(SD15, **extra)
    if spacing is not None:
        config["timestep_spacing"] = spacing
    gen = torch.Generator().manual_seed(n)
    z = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    draws = [torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(n)]
    draws[-1] = torch.zeros_like(draws[-1])  # DDPMScheduler's last step adds √1e-20 · draw
    sched = _scheduler(sampler, config)
    _float64(sched)
    ref = _run_scheduler(sched, z, n, draws, eta)
    s = sd_schedule(BETAS, config, sampler, n)
    if sampler == "ddim":
        ours = fguide.ddim(_model, z, s.process, noise=_Replay(draws), clip_denoised=False, eta=eta)
    else:
        ours = fguide.ddpm(_model, z, s.process, noise=_Replay(draws), clip_denoised=False)
    # float64 throughout, n steps of a few operations each: agreement to rounding
    torch.testing.assert_close(ours, ref, atol=1e-12 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize(
    "spacing,n,extra",
    [
        (None, 10, {}),  # linspace, σ = 0 at the end: the last step first order
        ("linspace", 5, {"final_sigmas_type": "sigma_min"}),  # n < 15: the last first order
        ("leading", 16, {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
        ("trailing", 16, {"final_sigmas_type": "sigma_min"}),  # n ≥ 15: second order at the end
        ("trailing", 5, {"final_sigmas_type": "sigma_min", "euler_at_final": True}),
    ],
)
def test_dpm_solver_matches_the_scheduler(spacing: str | None, n: int, extra: dict) -> None:  # type: ignore[type-arg]
    """The scheduler holds its σ grid in float32 and steps in float32, so the comparison is in
    float32: n steps of ~10 float32 operations each, agreement ≤ 1e-5 · max|x| (~80 ulps)."""
    config = dict(SD15, **extra)
    if spacing is not None:
        config["timestep_spacing"] = spacing
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(n))
    ref = _run_scheduler(_scheduler("dpmpp-2m", config), z, n, [])
    s = sd_schedule(BETAS, config, "dpmpp-2m", n)
    ours = dpmpp_2m(_model, z, s.process, first_order_final=s.first_order_final)
    torch.testing.assert_close(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    if not s.first_order_final:  # the switch matters: the other choice is visibly different
        other = dpmpp_2m(_model, z, s.process, first_order_final=True)
        assert (other - ref).abs().max() > 1e-3 * ref.abs().max()


def test_settings_follow_the_folder_then_the_class_defaults() -> None:
    assert scheduler_settings(SD15, "ddim")["timestep_spacing"] == "leading"
    assert scheduler_settings(SD15, "dpmpp-2m")["timestep_spacing"] == "linspace"
    assert scheduler_settings(SD15, "ddim")["set_alpha_to_one"] is False
    assert scheduler_settings({}, "ddim")["clip_sample"] is True  # DDIMScheduler's default
    got = scheduler_settings(SD15, "dpmpp-2m", {"timestep_spacing": "trailing"})
    assert got["timestep_spacing"] == "trailing"


@pytest.mark.parametrize(
    "config,sampler,steps,overrides,match",
    [
        (SD15, "euler", 10, None, "--sampler 'euler'"),
        (SD15, "ddim", 1001, None, "--steps must lie in"),
        (dict(SD15, timestep_spacing="karras"), "ddim", 10, None, "timestep_spacing 'karras'"),
        (dict(SD15, use_karras_sigmas=True), "dpmpp-2m", 10, None, "use_karras_sigmas"),
        (SD15, "ddim", 10, {"solver_order": 3}, "not a setting of DDIMScheduler"),
        (dict(SD15, steps_offset=-1), "ddpm", 10, None, "steps_offset"),
        (dict(SD15, timestep_spacing="leading"), "dpmpp-2m", 999, None, "distinct timesteps"),
    ],
)
def test_bad_settings_are_refused(config, sampler, steps, overrides, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        sd_schedule(BETAS, config, sampler, steps, overrides)
