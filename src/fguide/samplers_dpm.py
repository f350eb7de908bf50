"""DPM-Solver++(2M): the multistep second-order solver of the diffusion ODE in data prediction,
as a short free function with the signature of :mod:`fguide.samplers` (METHODS.md notation).

On a (respaced) process with ᾱ_s at the step's timestep and ᾱ_t the ᾱ it moves to
(``process.alphas_cumprod_prev``: the next step's ᾱ, or the final one), α = √ᾱ, σ = √(1 − ᾱ),
λ = log α − log σ, h = λ_t − λ_s and D0 = x̂0 = (x − σ_s ε)/α_s:

- first order (the first step, and the last when ``first_order_final``):
  x_t = (σ_t/σ_s) x − α_t (e^{−h} − 1) D0;
- second order (midpoint), with the previous step's x̂0 m1 and h_0 = λ_s − λ_{s1}, r0 = h_0/h,
  D1 = (D0 − m1)/r0: x_t = (σ_t/σ_s) x − α_t (e^{−h} − 1) (D0 + D1/2).

A final σ_t = 0 (ᾱ_t = 1) makes the first-order step return D0. This is diffusers'
``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
solver_type="midpoint")`` step; the coefficients are computed once per run in float64
(e^{−h} − 1 as ``expm1``).

Guidance enters as the guided ε (the score shift of :func:`fguide.ddim`):
ε̃ = ε − √(1 − ᾱ_s) γ g with g the guidance gradient at x̂0(ε) and γ = ``guide.scale``; D0 is
x̂0(ε̃).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fguide.denoisers import EpsModel, NoiseFn
from fguide.guidance import Guide
from fguide.samplers import (
    Callback,
    StepRecord,
    _check_labels,
    _FirstNonFinite,
    _shift_score,
)
from fguide.schedules import Process

__all__ = ["dpm_coefficients", "dpmpp_2m"]


def dpm_coefficients(process: Process) -> dict[str, np.ndarray]:
    """Per respaced index i (float64): ``ratio`` σ_t/σ_s, ``phi`` −α_t (e^{−h} − 1) and ``r0``
    h_0/h (h_0 from index i + 1, the step before; 1 where there is none)."""
    abar_s = np.asarray(process.alphas_cumprod, dtype=np.float64)
    abar_t = np.asarray(process.alphas_cumprod_prev, dtype=np.float64)
    alpha_s, sigma_s = np.sqrt(abar_s), np.sqrt(1.0 - abar_s)
    alpha_t, sigma_t = np.sqrt(abar_t), np.sqrt(1.0 - abar_t)
    lam_s = np.log(alpha_s) - np.log(sigma_s)
    final = sigma_t == 0  # σ_t = 0: λ_t = ∞, e^{−h} = 0
    with np.errstate(divide="ignore"):
        lam_t = np.where(final, np.inf, np.log(alpha_t) - np.log(np.where(final, 1.0, sigma_t)))
    h = lam_t - lam_s
    phi = np.where(final, alpha_t, -alpha_t * np.expm1(-np.where(final, 0.0, h)))
    h0 = np.append(lam_s[:-1] - lam_s[1:], 1.0)  # λ_s − λ_{s1}, s1 the noisier index i + 1
    r0 = np.where(final, 1.0, h0 / np.where(final, 1.0, h))
    r0[-1] = 1.0  # the first step (index n − 1) has no previous one
    return {"ratio": sigma_t / sigma_s, "phi": phi, "r0": r0}


def dpmpp_2m(
    model: EpsModel,
    z: Tensor,
    process: Process,
    *,
    labels: Tensor | None = None,
    guide: Guide | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    first_order_final: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) from z (standard normal, at the process's noisiest step) to x̂ (module
    docstring). ``noise`` is never called (the solver is deterministic); it is accepted for the
    samplers' common signature. ``first_order_final`` makes the last step first order (needed,
    and enforced, when it ends at σ = 0)."""
    b, n = z.shape[0], process.num_steps
    _check_labels("dpmpp_2m", guide, labels, b)
    coef = dpm_coefficients(process)
    if not first_order_final and n > 1 and process.alphas_cumprod_prev[0] == 1.0:
        raise ValueError("dpmpp_2m: a last step that ends at sigma = 0 must be first order")
    c = {k: torch.from_numpy(v).to(device=z.device, dtype=z.dtype) for k, v in coef.items()}
    sched = process.tensors(z.device, z.dtype)
    checks = _FirstNonFinite(b, z.device, model)
    x, prev_x0 = z, None
    with torch.no_grad():
        for t in range(n - 1, -1, -1):
            step = n - 1 - t  # 0 is the noisiest step
            t_model = sched.timesteps[t].expand(b)
            out = model(x, t_model, labels)
            checks.model(out, step)
            eps, _ = process.split_output(out, x)
            x0 = process.x0_from_eps(x, t, eps)
            res = None
            if guide is not None and labels is not None:
                eps, x0, res = _shift_score(
                    guide, process, sched, x, x0, eps, t, t_model, labels, checks, step, n
                )  # guidance
            if prev_x0 is None or (t == 0 and first_order_final):
                x_next = c["ratio"][t] * x + c["phi"][t] * x0
            else:
                d1 = (x0 - prev_x0) / c["r0"][t]
                x_next = c["ratio"][t] * x + c["phi"][t] * (x0 + 0.5 * d1)
            if callback is not None:
                callback(StepRecord(step, n, t_model, x, x0, res))
            x, prev_x0 = x_next, x0
    checks.raise_if_any(lambda step: float(process.timestep_map[n - 1 - step]))
    return x
