"""The validation of a sampling run's configuration: :func:`resolve_config`.

It checks :class:`~fguide.config.SampleConfig` and fills the defaults that depend on other
fields (the sampler, the classifier, the method) from :mod:`fguide.defaults`, so that the API,
``fguide sample`` and the named configurations agree. Parameters that do not apply to a
configuration resolve to None (so they never make two runs differ). Errors are
:class:`~fguide.params.ParamError` naming the field (the CLI names its flag).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fguide import defaults
from fguide.accel import PRECISIONS
from fguide.config import PARAM_RANGES, SampleConfig, build_objective, parse_flags
from fguide.families.base import _is_dit_pipeline, model_family
from fguide.guides import CLIP_PREFIX, is_adm_classifier
from fguide.models.dit_network import check_dit_network
from fguide.models.presets import PRESETS
from fguide.models.resnet import ARCHS, INPUT_MODES
from fguide.objectives import METHODS
from fguide.params import ParamError, check_ranges

__all__ = ["resolve_config"]


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ParamError(
            "{0} must be one of {valid}; got {value!r}", name, valid=", ".join(choices), value=value
        )


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


def resolve_config(config: SampleConfig) -> SampleConfig:
    """Validate ``config`` and fill its derived defaults; parameters that do not apply are None.

    Errors are :class:`~fguide.params.ParamError` naming the field (the CLI names its flag).
    """
    if not str(config.out).strip():
        raise ParamError("{0}: the output folder path is empty", "out")
    if not str(config.model).strip():
        raise ParamError("{0}: the diffusion checkpoint path is empty", "model")
    c = dataclasses.replace(
        config,
        out=Path(config.out),
        model=Path(config.model),
        classifier_weights=None
        if config.classifier_weights is None
        else Path(config.classifier_weights),
        model_flags=_flags("model_flags", config.model_flags),
        classifier_flags=_flags("classifier_flags", config.classifier_flags),
    )
    check_ranges(c, PARAM_RANGES)
    _check_choice("precision", c.precision, list(PRECISIONS))
    _check_choice("classifier_precision", c.classifier_precision, list(PRECISIONS))
    _check_choice("classifier_input_mode", c.classifier_input_mode, INPUT_MODES)
    _resolve_model_family(c)
    _resolve_steps_and_labels(c)
    _resolve_classifier(c)
    _resolve_sampler_settings(c)
    if c.method == "none":
        for name in ("tau1", "tau2", "alpha", "eps", "lam_max", "lam_min", "lam_schedule"):
            setattr(c, name, None)
        c.entropy, c.t_tilt, c.tilt_group = False, None, None
        c.scale = c.sine_factor = c.variance_tracking = c.guidance_input = None
        return c
    _resolve_objective(c)
    _resolve_guidance_strength(c)
    build_objective(c)  # validates what is left with the objective's own messages
    return c


def _resolve_model_family(c: SampleConfig) -> None:
    """The sampler's default and the settings that apply to diffusers pipelines only."""
    family = model_family(c.model)
    if c.sampler is None:
        c.sampler = "heun" if family == "nvlabs" else "ddpm"
    _check_choice("sampler", c.sampler, defaults.SAMPLERS)
    pipeline_only = (
        "cfg_scale", "cfg_channels", "dit_network", "guidance_form", "guidance_microbatch"
    )  # fmt: skip
    if family != "diffusers":
        given = [n for n in pipeline_only if getattr(c, n) is not None]
        if given:
            names = ", ".join(f"{{{i}}}" for i in range(len(given)))
            verb = "applies" if len(given) == 1 else "apply"
            raise ParamError(
                names + f" {verb} to diffusers pipeline folders ({{{len(given)}}} DIR)",
                *given,
                "model",
            )
        return
    if c.sampler == "heun":
        raise ParamError("{0}: diffusers pipelines are sampled with ddpm or ddim", "sampler")
    if c.model_preset is not None or c.model_flags:
        raise ParamError("{0} and {1} apply to ADM checkpoints", "model_preset", "model_flags")
    c.cfg_scale = 1.0 if c.cfg_scale is None else float(c.cfg_scale)
    c.clip_denoised = True  # unused: the pipeline's scheduler decides (resolved model info)
    if _is_dit_pipeline(c.model):
        c.dit_network = check_dit_network(c.dit_network or "dit")
    elif c.dit_network is not None:
        raise ParamError("{0} applies to DiT pipelines (a transformer component)", "dit_network")
    if c.method != "none":
        c.guidance_form = c.guidance_form or "algorithm3"
        _check_choice("guidance_form", c.guidance_form, ("algorithm3", "mean"))
    elif c.guidance_form is not None or c.guidance_microbatch is not None:
        raise ParamError(
            "{0} and {1} need a guided {2}", "guidance_form", "guidance_microbatch", "method"
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
    _check_choice("method", c.method, [m for m in ("none", *METHODS) if m != "f"])


def _resolve_classifier(c: SampleConfig) -> None:
    """The classifier's kind decides which classifier settings apply (and β's default)."""
    adm_clf = is_adm_classifier(c.classifier)
    if c.method != "none" and c.classifier is None:
        raise ParamError(
            "{0} {method!r} needs a classifier ({1})", "method", "classifier", method=c.method
        )
    if adm_clf and c.sampler == "heun":
        raise ParamError(
            "{0}: ADM's noise-aware classifier guides DDPM or DDIM on x_t; Heun guidance needs "
            "an x̂0 classifier (a ResNet or an import spec)",
            "classifier",
        )
    if c.classifier is not None and c.classifier.startswith("resnet"):
        if c.classifier not in ARCHS:
            raise ParamError(
                "{0}: unknown ResNet {spec!r}; valid: {valid}",
                "classifier",
                spec=c.classifier,
                valid=", ".join(ARCHS),
            )
        if c.softplus_beta is None:
            c.softplus_beta = defaults.softplus_beta(c.sampler or "ddpm")
        c.softplus_beta = defaults.parse_softplus_beta(c.softplus_beta)
    else:
        c.softplus_beta = None  # ResNets only (a config's β is dropped for other classifiers)
        if c.classifier_input_mode != "elucd" or c.classifier_resize is not None:
            raise ParamError(
                "{0} and {1} apply to ResNet classifiers only",
                "classifier_input_mode",
                "classifier_resize",
            )
    clip = c.classifier is not None and c.classifier.startswith(CLIP_PREFIX)
    if c.prompts is not None:
        c.prompts = tuple(
            str(p) for p in ([c.prompts] if isinstance(c.prompts, str) else c.prompts)
        )
    if not clip and (c.prompts or c.prompt_file is not None or c.target is not None):
        raise ParamError(
            "{0}, {1} and {2} apply to CLIP guides ({3} clip:FOLDER)",
            "prompts",
            "prompt_file",
            "target",
            "classifier",
        )
    if c.prompts and c.prompt_file is not None:
        raise ParamError("give {0} or {1}, not both", "prompts", "prompt_file")
    if c.prompt_file is not None:
        c.prompt_file = Path(c.prompt_file)
    if c.target is not None and c.labels != "uniform":
        raise ParamError(
            "{0} fixes every sample's label: do not give {1} as well", "target", "labels"
        )


def _resolve_sampler_settings(c: SampleConfig) -> None:
    """DDIM's η and Heun's churn: defaults where they apply, None where they do not."""
    if c.sampler != "ddim":
        c.eta = None
    elif c.eta is None:
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


def _resolve_guidance_strength(c: SampleConfig) -> None:
    """The scale γ (G for Heun), the sine boost, DDPM's variance tracking, Heun's input."""
    adm_clf = is_adm_classifier(c.classifier)
    if c.scale is None:
        if c.guidance_form == "algorithm3":
            raise ParamError(
                "{0}: give {0}, the maximum guidance G of EluCD's Algorithm 3 (EluCD does not "
                "publish its DiT value; choose it by a sweep on a validation seed)",
                "scale",
            )
        if c.sampler == "heun":
            c.scale = defaults.heun_scale(int(c.steps))
        elif adm_clf:
            # ADM's README scale for the diffusion model the classifier belongs to
            name = c.model_preset or str(c.classifier).replace("_classifier", "_diffusion")
            preset = PRESETS.get(name)
            c.scale = (preset.readme_classifier_scale if preset else None) or 1.0
        else:
            c.scale = defaults.SCALE
    if c.sampler == "ddim":
        c.sine_factor = None
    elif c.sine_factor is None:
        c.sine_factor = 0.0 if adm_clf else defaults.SINE_FACTOR
    if c.sampler == "ddpm":
        c.variance_tracking = c.variance_tracking or "per_sample"
        _check_choice("variance_tracking", c.variance_tracking, ("per_sample", "first_sample"))
    else:
        c.variance_tracking = None
    if c.sampler == "heun":
        c.guidance_input = c.guidance_input or "x"
        _check_choice("guidance_input", c.guidance_input, ("x", "denoised"))
    else:
        c.guidance_input = None
