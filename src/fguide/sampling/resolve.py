"""The validation of a sampling run's configuration: :func:`resolve_config`.

It checks :class:`~fguide.config.SampleConfig` and fills the defaults that depend on other
fields (the sampler, the classifier, the method) from :mod:`fguide.defaults`, so that the API,
``fguide sample`` and the named configurations agree. Parameters that do not apply to a
configuration resolve to None (so they never make two runs differ). Errors are
:class:`~fguide.params.ParamError` naming the field (the CLI names its flag).

The parts that depend on the model and on the guide are asked of their registries: the model
family (:func:`fguide.families.find_family`) and the guide kind
(:func:`fguide.guides.find_guide_kind`) each check and fill their own fields, and every field
another family or kind owns is refused in one generic message naming the flag and its owner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fguide import defaults
from fguide.accel import PRECISIONS
from fguide.config import (
    PARAM_RANGES,
    SAMPLER_SETTINGS,
    SampleConfig,
    build_objective,
    parse_flags,
)
from fguide.families import FAMILIES, ModelFamily, find_family
from fguide.guides import GUIDE_KINDS, GuideKind, find_guide_kind, unknown_guide
from fguide.models.resnet import INPUT_MODES
from fguide.objectives import METHODS
from fguide.params import ParamError, check_choice, check_ranges
from fguide.sampling.guidance_method import finish_guidance_method, resolve_guidance_method

__all__ = ["resolve_config"]


def resolve_config(config: SampleConfig) -> SampleConfig:
    """Validate ``config`` and fill its derived defaults; parameters that do not apply are None.

    Errors are :class:`~fguide.params.ParamError` naming the field (the CLI names its flag).
    """
    c = _checked_fields(config)
    family, kind = find_family(c.model), find_guide_kind(c.classifier)
    # a field both own (none yet), or a kind's field the family reads too, is not refused
    allowed = _owned(family) | set(family.reads) | _owned(kind)
    _resolve_family(c, family, allowed)
    _resolve_steps_and_labels(c)
    _resolve_guide(c, kind, allowed)
    _resolve_sampler_settings(c)
    resolve_guidance_method(c, kind)  # the training-free family (issue 21)
    if c.method == "none":
        for name in ("tau1", "tau2", "alpha", "eps", "lam_max", "lam_min", "lam_schedule"):
            setattr(c, name, None)
        c.entropy, c.t_tilt, c.tilt_group = False, None, None
        c.scale = c.sine_factor = c.variance_tracking = c.guidance_input = None
        return c
    _resolve_objective(c)
    _resolve_guidance_strength(c, kind)
    finish_guidance_method(c)
    objective = build_objective(c)  # validates what is left with the objective's own messages
    if kind is not None:
        try:
            kind.objective(objective)
        except ValueError as err:
            raise ParamError("{0}: {why}", "method", why=str(err)) from None
    return c


def _checked_fields(config: SampleConfig) -> SampleConfig:
    """A copy with every field of its type (paths, flag mappings, a tuple of prompts), in its
    range and among its choices."""
    if not str(config.out).strip():
        raise ParamError("{0}: the output folder path is empty", "out")
    if not str(config.model).strip():
        raise ParamError("{0}: the diffusion checkpoint path is empty", "model")
    weights, prompts = config.classifier_weights, config.prompts
    c = dataclasses.replace(
        config,
        out=Path(config.out),
        model=Path(config.model),
        classifier_weights=None if weights is None else Path(weights),
        model_flags=_flags("model_flags", config.model_flags),
        classifier_flags=_flags("classifier_flags", config.classifier_flags),
        prompts=None
        if prompts is None
        else tuple(str(p) for p in ([prompts] if isinstance(prompts, str) else prompts)),
    )
    check_ranges(c, PARAM_RANGES)
    check_choice("precision", c.precision, list(PRECISIONS))
    check_choice("classifier_precision", c.classifier_precision, list(PRECISIONS))
    check_choice("classifier_input_mode", c.classifier_input_mode, INPUT_MODES)
    return c


def _owned(owner: ModelFamily | GuideKind | None) -> set[str]:
    return set() if owner is None or owner.fields is None else set(owner.fields.names)


def _resolve_family(c: SampleConfig, family: ModelFamily, allowed: set[str]) -> None:
    """The sampler (the family's default), the fields of other families refused, then the
    family's own part."""
    if c.sampler is None:
        c.sampler = family.default_sampler
    check_choice("sampler", c.sampler, defaults.SAMPLERS)
    if c.sampler not in family.samplers:
        raise ParamError(
            "{0}: {s!r} does not apply to {family} models (their samplers: {ok})",
            "sampler",
            s=c.sampler,
            family=family.name,
            ok=", ".join(family.samplers),
        )
    methods = family.guidance_methods
    if methods is not None and c.guidance_method not in methods:
        raise ParamError(
            "{0} {v!r}: not available for {family} models yet (their guidance: {ok})",
            "guidance_method",
            v=c.guidance_method,
            family=family.name,
            ok=", ".join(methods),
        )
    if c.steps is None:
        c.steps = family.default_steps
    for other in FAMILIES:
        if other is not family and other.fields is not None:
            other.fields.refuse(c, allowed)
    family.resolve(c)


def _flags(name: str, text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    try:
        return parse_flags(text)
    except ValueError as err:
        raise ParamError("{0}: {detail}", name, detail=str(err)) from None


def _check_respacing(steps: str) -> None:
    """ADM's respacing syntax: '' (every step), 'N', 'N1,N2,...' or 'ddimN', counts >= 1."""
    parts = [steps[len("ddim") :]] if steps.startswith("ddim") else steps.split(",")
    if steps and not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise ParamError(
            "{0}: expected a respacing 'N', 'N1,N2,...' or 'ddimN' with counts >= 1; got {steps!r}",
            "steps",
            steps=steps,
        )


def _resolve_steps_and_labels(c: SampleConfig) -> None:
    c.steps = str(c.steps).strip()
    if c.sampler == "heun":
        if not (c.steps.isdigit() and int(c.steps) >= 2):
            raise ParamError(
                "{0}: Heun takes a number of steps >= 2; got {steps!r}", "steps", steps=c.steps
            )
    else:
        _check_respacing(c.steps)
    c.labels = str(c.labels).strip()
    if c.labels not in ("uniform", "balanced"):
        try:
            c.labels = str(int(c.labels))
        except ValueError:
            raise ParamError(
                "{0} must be 'uniform', 'balanced' or a class id; got {value!r}",
                "labels",
                value=c.labels,
            ) from None
    check_choice("method", c.method, [m for m in ("none", *METHODS) if m != "f"])


def _resolve_guide(c: SampleConfig, kind: GuideKind | None, allowed: set[str]) -> None:
    """The guide's kind decides which classifier settings apply: the fields of other kinds are
    refused (or dropped), then the kind fills its own (β's default, CLIP's prompts ...)."""
    if c.method != "none" and c.classifier is None:
        raise ParamError(
            "{0} {method!r} needs a classifier ({1})", "method", "classifier", method=c.method
        )
    if c.classifier is not None and kind is None:
        raise ParamError("{0}: {why}", "classifier", why=unknown_guide(c.classifier))
    for other in GUIDE_KINDS:
        if other is kind:
            continue
        if other.fields is not None:
            other.fields.refuse(c, allowed)
        for name in other.dropped:  # e.g. a configuration's Softplus β, for a ResNet only
            if name not in allowed:
                setattr(c, name, None)
    if kind is not None:
        kind.resolve(c)


def _resolve_sampler_settings(c: SampleConfig) -> None:
    """DDIM's η and Heun's churn: defaults where they apply, None where they do not (a value
    given for a sampler that does not read it is refused)."""
    _refuse_other_samplers_settings(c)  # so each is None off its samplers
    if c.sampler == "ddim" and c.eta is None:
        c.eta = defaults.ETA
    heun_only = ("s_churn", "s_tmin", "s_tmax", "s_noise")
    if c.sampler != "heun":
        if any(getattr(c, n) is not None for n in heun_only):
            raise ParamError("{0}, {1}, {2} and {3} apply to the Heun sampler only", *heun_only)
        return
    c.clip_denoised = True  # unused by Heun; fixed so it never makes runs differ
    c.s_churn = 0.0 if c.s_churn is None else float(c.s_churn)
    c.s_tmin = 0.0 if c.s_tmin is None else float(c.s_tmin)
    c.s_noise = 1.0 if c.s_noise is None else float(c.s_noise)
    if c.s_tmax is not None and not c.s_tmax >= c.s_tmin:
        raise ParamError(
            "{0} ({tmax}) must be >= {1} ({tmin}); unset, it is inf",
            "s_tmax",
            "s_tmin",
            tmax=c.s_tmax,
            tmin=c.s_tmin,
        )
    if c.s_churn == 0.0:
        c.s_tmin = c.s_tmax = c.s_noise = None  # no churn: the window does not apply


def _resolve_objective(c: SampleConfig) -> None:
    """τ, α, ε, λ and the tilt of a guided run: their defaults, or an error where they do not
    apply to the method."""
    c.tau1 = defaults.TAU1 if c.tau1 is None else float(c.tau1)
    if c.tau2 is None:
        c.tau2 = defaults.tau2(c.method, c.sampler or "ddpm", c.tau1)
    if c.method in ("rkl", "fkl", "js", "hellinger"):
        c.alpha = defaults.alpha(c.method) if c.alpha is None else c.alpha
        c.eps = defaults.EPS if c.eps is None else c.eps
    elif c.eps is not None:
        raise ParamError(
            "{0} is a divergence parameter; {1} {method!r} has no divergence",
            "eps",
            "method",
            method=c.method,
        )
    if c.entropy or c.method == "entropy":
        c.lam_max = defaults.LAM_MAX if c.lam_max is None else c.lam_max
        c.lam_min = defaults.LAM_MIN if c.lam_min is None else c.lam_min
        c.lam_schedule = c.lam_schedule or defaults.LAM_SCHEDULE
    elif c.lam_max is not None or c.lam_min is not None or c.lam_schedule is not None:
        raise ParamError(
            "{0}, {1} and {2} need {3} 'entropy' or the {4} term",
            "lam_max",
            "lam_min",
            "lam_schedule",
            "method",
            "entropy",
        )
    if c.method == "tilted" and c.t_tilt is None:
        c.t_tilt = defaults.T_TILT
    if c.t_tilt is not None:
        c.tilt_group = defaults.TILT_GROUP if c.tilt_group is None else c.tilt_group
        if c.shard_size % c.tilt_group:
            raise ParamError(
                "{0} ({shard}) must be a multiple of {1} ({group}): tilt groups are fixed blocks "
                "of sample indices",
                "shard_size",
                "tilt_group",
                shard=c.shard_size,
                group=c.tilt_group,
            )
    elif c.tilt_group is not None:
        raise ParamError(
            "{0} needs tilting ({1} 'tilted' or {2})", "tilt_group", "method", "t_tilt"
        )


def _refuse_other_samplers_settings(c: SampleConfig) -> None:
    """A sampler setting given for a sampler that does not read it is an error (it would be
    silently dropped): EluCD's sine boost shifts DDPM's mean (and Heun's), DDIM and DPM-Solver
    shift the score."""
    for name, samplers in SAMPLER_SETTINGS.items():
        if getattr(c, name) is not None and c.sampler not in samplers:
            raise ParamError(
                "{0} applies to {1} {only}, not {v!r}",
                name,
                "sampler",
                only=" or ".join(samplers),
                v=c.sampler,
            )


def _resolve_guidance_strength(c: SampleConfig, kind: GuideKind | None) -> None:
    """The scale γ (G for Heun), the sine boost, DDPM's variance tracking, Heun's input."""
    kind_defaults = {} if kind is None else kind.guidance_defaults(c)
    if c.scale is None:
        if c.sampler == "heun":
            c.scale = defaults.heun_scale(int(str(c.steps)))
        else:
            c.scale = kind_defaults.get("scale", defaults.SCALE)
    # off their samplers these are None already (_refuse_other_samplers_settings)
    if c.sampler in SAMPLER_SETTINGS["sine_factor"] and c.sine_factor is None:
        c.sine_factor = kind_defaults.get("sine_factor", defaults.SINE_FACTOR)
    if c.sampler == "ddpm":
        c.variance_tracking = c.variance_tracking or "per_sample"
        check_choice("variance_tracking", c.variance_tracking, ("per_sample", "first_sample"))
    if c.sampler == "heun":
        c.guidance_input = c.guidance_input or "x"
        check_choice("guidance_input", c.guidance_input, ("x", "denoised"))
