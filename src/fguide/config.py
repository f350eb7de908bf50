"""The configuration of a sampling run: its fields, their defaults, and their validation.

:class:`SampleConfig` holds everything a run needs; :func:`resolve_config` validates it and
fills the defaults that depend on other fields (the sampler, the classifier, the method) from
:mod:`fguide.defaults`, so that the API, ``fguide sample`` and the named configurations agree.
Parameters that do not apply to a configuration resolve to None (so they never make two runs
differ).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fguide import defaults
from fguide.accel import PRECISIONS
from fguide.models.classifiers import CLIP_PREFIX, is_adm_classifier
from fguide.models.dit_network import check_dit_network
from fguide.models.presets import PRESETS, parse_flag_string
from fguide.models.resnet import ARCHS, INPUT_MODES
from fguide.objectives import METHODS, Objective, objective
from fguide.params import ParamError, Range, check_ranges

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "PARAM_RANGES",
    "model_family",
    "PRECISIONS",
    "SampleConfig",
    "build_objective",
    "parse_flags",
    "resolve_config",
]

DEFAULT_SHARD_SIZE = 256
"""Samples per shard: at most this much work is lost to a kill (per process)."""

PARAM_RANGES: dict[str, Range] = {
    "num_samples": Range(int, 1),
    "batch_size": Range(int, 1),
    "seed": Range(int, 0),
    "shard_size": Range(int, 1),
    "grid": Range(int, 0),
    "max_shards": Range(int, 1),
    "image_size": Range(int, 1),
    "classifier_resize": Range(int, 1),
    "cfg_scale": Range(float, 0),
    "cfg_channels": Range(int, 1),
    "guidance_microbatch": Range(int, 1),
    "eta": Range(float, 0, 1),
    "s_churn": Range(float, 0),
    "s_tmin": Range(float, 0),
    "s_tmax": Range(float, 0, allow_inf=True),
    "s_noise": Range(float, 0),
    "scale": Range(float),
    "tau1": Range(float, 0, low_open=True),
    "tau2": Range(float, 0),
    "alpha": Range(float, 0),
    "eps": Range(float, 0, 1),
    "lam_max": Range(float, 0),
    "lam_min": Range(float, 0),
    "t_tilt": Range(float),
    "tilt_group": Range(int, 1),
    "sine_factor": Range(float, 0),
}
"""The domain of every numeric field (None: the default applies); ``fguide sample`` parses its
flags with the same ranges."""


@dataclass
class SampleConfig:
    """Everything a run needs. ``None`` fields take defaults that depend on the others.

    Resolved defaults (:func:`resolve_config`): τ1 1; τ2 0.5 τ1 (``logsoftmax``: τ1; Heun: 0);
    α per method (``rkl`` 0.1, others 0.09), ε 0.1; λ 0.2 → 0.05 linear; t_tilt −0.2 for
    ``tilted``; γ 1 for x̂0 classifiers on DDPM/DDIM, the preset's README scale for ADM's
    classifier, EluCD's G for Heun (0.004 up to 18 steps, 0.0018 up to 36, else 0.001);
    γ_sine 0.3 (0 for ADM's classifier: ``condition_mean``); Softplus β 3 (Heun: 5).
    """

    out: Path
    model: Path
    """The diffusion checkpoint (a plain state dict)."""
    model_preset: str | None = None
    """An ADM preset (``128x128_diffusion``...); inferred from the checkpoint when omitted."""
    model_flags: Mapping[str, Any] = field(default_factory=dict)
    """``create_model`` / diffusion flags overriding the preset's (or the defaults)."""
    classifier: str | None = None
    """``resnet18``..``resnet152``, an ADM classifier preset, ``adm``, or ``module:function``."""
    classifier_weights: Path | None = None
    classifier_flags: Mapping[str, Any] = field(default_factory=dict)
    classifier_input_mode: str = "elucd"
    classifier_resize: int | None = None
    softplus_beta: float | None = None
    """Softplus β for the ResNet's ReLUs; 0 keeps ReLU."""
    prompts: Sequence[str] | None = None
    """CLIP guides (``clip:FOLDER``): the prompts that are the classes (one: text guidance)."""
    prompt_file: Path | None = None
    """CLIP guides: a file of prompts, one per line (instead of ``prompts``)."""
    target: str | None = None
    """CLIP guides: the prompt (its index or its text) every sample is guided toward."""
    method: str = "base"
    """``none`` (unguided) or an :func:`fguide.objective` name."""
    tau1: float | None = None
    tau2: float | None = None
    alpha: float | None = None
    eps: float | None = None
    lam_max: float | None = None
    lam_min: float | None = None
    lam_schedule: str | None = None
    entropy: bool = False
    """Add the entropy term to any method."""
    t_tilt: float | None = None
    tilt_group: int | None = None
    scale: float | None = None
    sine_factor: float | None = None
    variance_tracking: str | None = None
    guidance_input: str | None = None
    cfg_scale: float | None = None
    """diffusers DiT pipelines: the classifier-free guidance scale s (1: conditional only)."""
    cfg_channels: int | None = None
    """DiT: guide only the first N latent channels with CFG (DiT's own code: 3; None: all)."""
    dit_network: str | None = None
    """DiT pipelines: ``dit`` (default: the network computes as DiT's own code: its timestep
    features and LayerNorm eps) or ``diffusers`` (``DiTTransformer2DModel`` as it is)."""
    guidance_form: str | None = None
    """diffusers pipelines: ``algorithm3`` (EluCD's CFG + classifier, DiT) or ``mean``
    (EluCD's DDPM mean shift; unconditional pixel models)."""
    guidance_microbatch: int | None = None
    """Micro-batch of the classifier pass (bounds the VAE decoder's backward memory)."""
    s_churn: float | None = None
    """Heun only: EDM's stochastic churn S_churn (0, the default: deterministic Heun)."""
    s_tmin: float | None = None
    s_tmax: float | None = None
    """Heun only: the σ window [S_tmin, S_tmax] of the churn (default [0, ∞))."""
    s_noise: float | None = None
    """Heun only: EDM's S_noise (default 1)."""
    """Heun only: ``x`` (EluCD) or ``denoised``."""
    sampler: str | None = None
    """``ddpm``, ``ddim`` or ``heun``; default ``heun`` for EDM networks, else ``ddpm``."""
    steps: str = defaults.STEPS
    """Respacing (``250``, ``10,10,5``, ``ddim25``) for DDPM/DDIM; the number of steps for Heun."""
    eta: float | None = None
    clip_denoised: bool = True
    num_samples: int = 50000
    batch_size: int | None = None
    """Samples per forward pass; None: chosen from free GPU memory on CUDA, 64 on CPU."""
    seed: int = 0
    labels: str = "uniform"
    """``uniform`` (i.i.d. per sample), ``balanced`` (seeded permutations of the classes), or
    one class id."""
    precision: str = "fp32"
    """The diffusion network's precision (``fp32``, ``fp16``, ``bf16``): an ADM UNet's torso
    dtype as ADM converts it, an EDM network's fp16 body (CUDA, as EDM; no bf16), a diffusers
    pipeline network's weight dtype."""
    classifier_precision: str = "fp32"
    """The classifier's forward and backward under autocast (``fp32``: none; ``bf16``, ``fp16``);
    for a latent pipeline, the VAE decoder of the guidance too."""
    compile: bool = False
    """``torch.compile`` the diffusion network: ADM UNet, EDM denoiser or pipeline network (the
    compile time is reported)."""
    channels_last: bool = False
    """Run the diffusion network in channels_last (NHWC) memory format (GPUs, half precision)."""
    device: str = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE
    image_size: int | None = None
    grid: int = 64
    max_shards: int | None = None
    """Stop after this many shards in this process (rerun to continue)."""
    progress: bool = True
    config_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            k: (
                str(v)
                if isinstance(v, Path)
                else dict(v)
                if isinstance(v, Mapping)
                else list(v)
                if isinstance(v, tuple)
                else v
            )
            for k, v in dataclasses.asdict(self).items()
        }


def parse_flags(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``"image_size=16 num_channels=32"`` or ``"--image_size 16 --num_channels 32"`` → dict."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    if text.strip().startswith("--"):
        return dict(parse_flag_string(text))
    out: dict[str, Any] = {}
    for tok in shlex.split(text):
        key, eq, value = tok.partition("=")
        if not eq or not key:
            raise ValueError(f"flags: expected name=value items, got {tok!r} in {text!r}")
        out[key] = value
    return out


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


def resolve_config(cfg: SampleConfig) -> SampleConfig:
    """Validate ``cfg`` and fill its derived defaults; parameters that do not apply are None.

    Errors are :class:`~fguide.params.ParamError` naming the field (the CLI names its flag).
    """
    if not str(cfg.out).strip():
        raise ParamError("{0}: the output folder path is empty", "out")
    if not str(cfg.model).strip():
        raise ParamError("{0}: the diffusion checkpoint path is empty", "model")
    c = dataclasses.replace(
        cfg,
        out=Path(cfg.out),
        model=Path(cfg.model),
        classifier_weights=None if cfg.classifier_weights is None else Path(cfg.classifier_weights),
        model_flags=_flags("model_flags", cfg.model_flags),
        classifier_flags=_flags("classifier_flags", cfg.classifier_flags),
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


def model_family(path: str | Path) -> str:
    """``diffusers`` (a pipeline folder), ``nvlabs`` (an EDM network pickle) or ``adm``."""
    from fguide.models.nvlabs import is_network_pickle

    p = Path(path)
    if p.is_dir() and (p / "model_index.json").is_file():
        return "diffusers"
    if p.is_file() and is_network_pickle(p):
        return "nvlabs"
    return "adm"


def _is_dit_pipeline(path: Path) -> bool:
    """True when a pipeline folder's ``model_index.json`` names a ``transformer`` (DiT); an
    unreadable index counts as DiT here (the loader then says what is wrong with it)."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return True
    return not isinstance(index, dict) or "transformer" in index


def build_objective(c: SampleConfig) -> Objective:
    """The :class:`~fguide.objectives.Objective` of a resolved, guided configuration."""
    assert c.tau1 is not None
    return objective(
        c.method,
        tau1=c.tau1,
        tau2=c.tau2,
        alpha=c.alpha,
        eps=defaults.EPS if c.eps is None else c.eps,
        lam_max=defaults.LAM_MAX if c.lam_max is None else c.lam_max,
        lam_min=defaults.LAM_MIN if c.lam_min is None else c.lam_min,
        lam_schedule=c.lam_schedule or defaults.LAM_SCHEDULE,  # type: ignore[arg-type]
        entropy=c.entropy,
        t_tilt=c.t_tilt,
        group_size=c.tilt_group,
        sampler=c.sampler or "ddpm",
    )
