"""The one table of defaults: every method's and every sampler's (METHODS.md §2, §3, §5, §7).

The Python API (:func:`fguide.objective`, the samplers), the sampling configuration, the
command-line help and the named configurations all read these values, so a default is written
once. A default that depends on the sampler (τ2, Softplus β, the guidance scale of Heun) is a
function of it here.
"""

from __future__ import annotations

import math
from typing import Any, Final, Literal

from fguide.params import ParamError

# -- objectives (METHODS.md §2, §3) -----------------------------------------------------------

TAU1: Final = 1.0
"""Joint temperature τ1 (EluCD)."""
TAU2_RATIO: Final = 0.5
"""EluCD's marginal temperature for DDPM/DDIM: τ2 = 0.5 τ1 (``--margin_temperature_discount``)."""
ALPHA: Final[dict[str, float]] = {"rkl": 0.1, "fkl": 0.09, "js": 0.09, "hellinger": 0.09, "f": 0.09}
"""Divergence weight α per method (the paper's values)."""
EPS: Final = 0.1
"""Smoothing ε of the target distribution q_y."""
LAM_MAX: Final = 0.2
LAM_MIN: Final = 0.05
LAM_SCHEDULE: Final[Literal["linear"]] = "linear"
"""Entropy weight λ from ``LAM_MAX`` (first step) to ``LAM_MIN`` (last), linearly."""
T_TILT: Final = -0.2
"""Tilt temperature of the ``tilted`` method (the paper's best)."""
TILT_GROUP: Final = 16
"""Samples per tilt group in ``fguide sample`` (fixed blocks of sample indices)."""

# -- samplers (METHODS.md §1, §5) --------------------------------------------------------------

SAMPLERS: Final = ("ddpm", "ddim", "heun", "dpmpp-2m")
STEPS: Final = "250"
"""Default respacing (DDPM, DDIM: ADM's ``"250"``) or number of steps (Heun)."""
SINE_FACTOR: Final = 0.3
"""EluCD's sine-boost factor γ_sine (DDPM and Heun; DDIM has none)."""
ETA: Final = 0.0
"""DDIM's η."""
SCALE: Final = 1.0
"""Classifier scale γ for x̂0 classifiers on DDPM/DDIM (EluCD's ResNets at 128×128)."""
SOFTPLUS_BETA: Final[dict[str, float]] = {"ddpm": 3.0, "ddim": 3.0, "heun": 5.0, "dpmpp-2m": 3.0}
"""EluCD's Softplus β for ResNet guides: 3 for DDPM (and DDIM, DPM-Solver++), 5 for EDM/Heun.
0 = ReLU."""
RELU: Final = 0.0
"""The Softplus β that keeps ReLU (``--softplus-beta relu``)."""

# -- Stable Diffusion (issue 20; diffusers' pipeline defaults) --------------------------------

SD_SAMPLER: Final = "dpmpp-2m"
"""Stable Diffusion's default sampler: DPM-Solver++(2M), diffusers' recommended fast solver."""
SD_STEPS: Final = "50"
"""Stable Diffusion's default number of inference steps (the pipelines' ``num_inference_steps``)."""
SD_CFG_SCALE: Final[dict[str, float]] = {"sd": 7.5, "sdxl": 5.0}
"""Classifier-free guidance scale per pipeline kind (StableDiffusionPipeline's 7.5,
StableDiffusionXLPipeline's 5.0)."""

# -- training-free guidance family (fguide.training_free; issue 21) ----------------------------
# Sources: TFG = YWolfeee/Training-Free-Guidance @ f8d17f3 (Ye et al., NeurIPS 2024):
# ``utils/configs.py`` (``Arguments``) and ``scripts/cifar10_label.sh`` (label guidance with a
# ResNet guide, the task closest to fguide's). TFG searched each baseline's strength per task
# on the grid 0.25·2^j ≤ 8 (``searching.py``); its ``Arguments.guidance_strength`` default is 1.

DPS_SCALE: Final = 1.0
"""DPS step ζ (TFG ``guidance_strength`` default; DPS's own ζ 0.3–1.0 is for ‖y − A x̂0‖)."""
FREEDOM_SCALE: Final = 1.0
"""FreeDoM ρ̄ (TFG ``guidance_strength`` default, with TFG's mean-one ``increase`` schedule)."""
FREEDOM_RECURRENCE: Final = 1
"""FreeDoM time-travel repeats K (TFG ``recur_steps`` default; FreeDoM's ImageNet code: 10 for
original timesteps 500…800, ``Face-GD/functions/denoising.py``)."""
FREEDOM_SCHEDULE: Final = "increase"
"""FreeDoM ρ schedule (TFG ``rho_schedule`` default: w_k ∝ α_t)."""
MPGD_SCALE: Final = 1.0
"""MPGD step on x̂0 (TFG ``guidance_strength`` default)."""
UGD_SCALE: Final = 1.0
"""UGD strength s of forward and backward guidance (TFG ``guidance_strength`` default)."""
UGD_RECURRENCE: Final = 1
"""UGD self-recurrence K (TFG ``recur_steps`` default; UGD's README runs use 2–10)."""
UGD_BACKWARD_STEPS: Final = 0
"""UGD backward steps m (TFG ``iter_steps`` 1 − 1; UGD's ``optim_backward_guidance_max_iters``
default 0)."""
TFG_SCALE: Final = 1.0
"""``fguide sample --scale`` with ``--guidance-method tfg``: a gain on (ρ̄, μ̄); 1 keeps TFG's."""
TFG_RHO: Final = 1.0
"""TFG ρ̄ (``scripts/cifar10_label.sh``)."""
TFG_MU: Final = 0.25
"""TFG μ̄ (``scripts/cifar10_label.sh``)."""
TFG_GAMMA: Final = 0.001
"""TFG γ̄, its ``sigma`` (``scripts/cifar10_label.sh``)."""
TFG_MC_SAMPLES: Final = 1
"""TFG Monte-Carlo draws M, its ``eps_bsz`` (``scripts/cifar10_label.sh``)."""
TFG_RECURRENCE: Final = 1
"""TFG repeats N_recur (``utils/configs.py``; every script keeps 1)."""
TFG_ITERATIONS: Final = 4
"""TFG x̂0 ascent steps N_iter, its ``iter_steps`` (``scripts/cifar10_label.sh``)."""
TFG_RHO_SCHEDULE: Final = "increase"
TFG_MU_SCHEDULE: Final = "increase"
TFG_GAMMA_SCHEDULE: Final = "decrease"
"""TFG schedules (``utils/configs.py``): ρ and μ ∝ α_t with mean one, γ_k = γ̄ sqrt(1 − ᾱ_t)."""


def tau2(method: str, sampler: str = "ddpm", tau1: float = TAU1) -> float:
    """τ2: τ1 for ``logsoftmax``; 0 for Heun (EluCD's EDM setting); else 0.5 τ1."""
    if method == "logsoftmax":
        return tau1
    return 0.0 if sampler == "heun" else TAU2_RATIO * tau1


def alpha(method: str) -> float:
    """α of a divergence method (``rkl`` 0.1, the others 0.09)."""
    return ALPHA[method]


def softplus_beta(sampler: str = "ddpm") -> float:
    """Softplus β of a ResNet guide for ``sampler`` (3 for DDPM/DDIM, 5 for Heun)."""
    return SOFTPLUS_BETA[sampler]


def heun_scale(steps: int) -> float:
    """EluCD's maximum guidance G for Heun: 0.004 up to 18 steps, 0.0018 up to 36, else 0.001."""
    return 0.004 if steps <= 18 else 0.0018 if steps <= 36 else 0.001


def parse_softplus_beta(value: Any) -> float:
    """A Softplus β from user input: a finite number ≥ 0, or ``relu`` (= 0, plain ReLU)."""
    if isinstance(value, str) and value.strip().lower() in ("relu", "none"):
        return RELU
    try:
        beta = float(value)
    except (TypeError, ValueError):
        beta = math.nan
    if not 0 <= beta < math.inf:
        raise ParamError(
            "{0} must be a finite number >= 0 or 'relu' (0 or 'relu' keeps ReLU); got {v!r}",
            "softplus_beta",
            v=value,
        )
    return beta
