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

SAMPLERS: Final = ("ddpm", "ddim", "heun")
STEPS: Final = "250"
"""Default respacing (DDPM, DDIM: ADM's ``"250"``) or number of steps (Heun)."""
SINE_FACTOR: Final = 0.3
"""EluCD's sine-boost factor γ_sine (DDPM and Heun; DDIM has none)."""
ETA: Final = 0.0
"""DDIM's η."""
SCALE: Final = 1.0
"""Classifier scale γ for x̂0 classifiers on DDPM/DDIM (EluCD's ResNets at 128×128)."""
SOFTPLUS_BETA: Final[dict[str, float]] = {"ddpm": 3.0, "ddim": 3.0, "heun": 5.0}
"""EluCD's Softplus β for ResNet guides: 3 for DDPM (and DDIM), 5 for EDM/Heun. 0 = ReLU."""
RELU: Final = 0.0
"""The Softplus β that keeps ReLU (``--softplus-beta relu``)."""


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
