"""The training-free family in a sampling run's configuration (``--guidance-method``).

:func:`resolve_guidance_method` runs before the objective is resolved: it refuses a method
where it is not defined (Heun, a noise-aware x_t classifier; :func:`fguide.training_free.
check_supported` says why), without an objective (``--method none``), and every family flag
that does not apply to the chosen method (one line naming the flag and the methods it applies
to), then fills the method's defaults from :mod:`fguide.defaults`. :func:`finish_guidance_method`
runs after EluCD's strength defaults: EluCD's own settings (the sine boost, the variance
tracking) do not apply to a method and resolve to None, and the method is built once on a
placeholder classifier so that its own checks (a tilted objective with Monte-Carlo smoothing)
fail here, before anything loads.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fguide import defaults
from fguide.config import METHOD_FIELDS, SampleConfig, build_guidance_method, recurrence_window
from fguide.guides import GuideKind
from fguide.params import ParamError
from fguide.training_free import check_supported

__all__ = ["finish_guidance_method", "resolve_guidance_method"]

SCALES: dict[str, float] = {
    "dps": defaults.DPS_SCALE,
    "freedom": defaults.FREEDOM_SCALE,
    "mpgd": defaults.MPGD_SCALE,
    "ugd": defaults.UGD_SCALE,
    "tfg": defaults.TFG_SCALE,  # a gain on TFG's (ρ̄, μ̄)
}
"""The default ``--scale`` of each method (TFG's ``guidance_strength`` default, 1)."""

_DEFAULTS: dict[str, dict[str, Any]] = {
    "recurrence": {
        "freedom": defaults.FREEDOM_RECURRENCE,
        "ugd": defaults.UGD_RECURRENCE,
        "tfg": defaults.TFG_RECURRENCE,
    },
    "backward_steps": {"ugd": defaults.UGD_BACKWARD_STEPS},
    "rho": {"tfg": defaults.TFG_RHO},
    "mu": {"tfg": defaults.TFG_MU},
    "gamma": {"tfg": defaults.TFG_GAMMA},
    "mc_samples": {"tfg": defaults.TFG_MC_SAMPLES},
    "iterations": {"tfg": defaults.TFG_ITERATIONS},
    "rho_schedule": {"freedom": defaults.FREEDOM_SCHEDULE, "tfg": defaults.TFG_RHO_SCHEDULE},
    "mu_schedule": {"tfg": defaults.TFG_MU_SCHEDULE},
    "gamma_schedule": {"tfg": defaults.TFG_GAMMA_SCHEDULE},
}
"""The default of each family field per method it applies to (None: stays unset)."""

ELUCD_ONLY = ("sine_factor", "variance_tracking", "guidance_input")
"""EluCD's sampler settings: they shape its mean shift, which a training-free method replaces."""


def _classifier_input(kind: GuideKind | None) -> str:
    """``xt`` for ADM's noise-aware classifiers (known from the spec), else ``x0`` (an import
    spec's time-awareness is checked when it loads)."""
    return "xt" if kind is not None and kind.name == "adm" else "x0"


def resolve_guidance_method(c: SampleConfig, kind: GuideKind | None) -> None:
    """Check ``guidance_method`` against the sampler, the guide and the objective, refuse the
    family flags that do not apply to it, and fill the method's defaults (in place)."""
    name = c.guidance_method
    check_supported(name, c.sampler or "ddpm", _classifier_input(kind))
    _refuse_fields_of_other_methods(c)
    if name == "elucd":
        return
    if c.method == "none":
        raise ParamError(
            "{0} {v!r} needs an objective to follow: {1} 'none' is unguided",
            "guidance_method",
            "method",
            v=name,
        )
    for field in ELUCD_ONLY:
        if getattr(c, field) is not None:
            raise ParamError(
                "{0} applies to {1} elucd (EluCD's mean shift), not {v!r}",
                field,
                "guidance_method",
                v=name,
            )
    if c.scale is None:
        c.scale = SCALES[name]
    for field, per_method in _DEFAULTS.items():
        if getattr(c, field) is None and name in per_method:
            setattr(c, field, per_method[name])
    window = recurrence_window(c.recurrence_window)
    c.recurrence_window = None if window is None else f"{window[0]}:{window[1]}"


def _refuse_fields_of_other_methods(c: SampleConfig) -> None:
    """One line naming the first family flag given that does not apply to the chosen method."""
    for field, methods in METHOD_FIELDS.items():
        value = getattr(c, field)
        if value is None or value is False or c.guidance_method in methods:
            continue
        listed = ", ".join(methods[:-1]) + " or " + methods[-1] if len(methods) > 1 else methods[0]
        raise ParamError(
            "{0} applies to {1} {m}, not {v!r}",
            field,
            "guidance_method",
            m=listed,
            v=c.guidance_method,
        )


def _placeholder(x: Tensor) -> Tensor:
    raise AssertionError("the placeholder classifier of the configuration check is never called")


def finish_guidance_method(c: SampleConfig) -> None:
    """After EluCD's strength defaults: its sine boost and variance tracking resolve to None
    for a training-free method, and the method's own checks run (on a placeholder
    classifier)."""
    if c.guidance_method == "elucd" or c.method == "none":
        return
    for field in ELUCD_ONLY:
        setattr(c, field, None)
    build_guidance_method(c, _placeholder)
