"""The configuration of a sampling run: its fields, their numeric ranges, and its parsing.

:class:`SampleConfig` holds everything a run needs. It is data only, below the model families
and guide kinds that read it: :func:`fguide.sampling.resolve_config` validates it and fills the
defaults that depend on other fields, asking the registries (:mod:`fguide.families`,
:mod:`fguide.guides`) for the parts that depend on the model and the guide.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fguide import defaults
from fguide.accel import PRECISIONS
from fguide.guidance import ClassifierFn
from fguide.models.presets import parse_flag_string
from fguide.objectives import Objective, objective
from fguide.params import ParamError, Range
from fguide.training_free import METHODS, GuidanceMethod

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "METHOD_FIELDS",
    "PARAM_RANGES",
    "PRECISIONS",
    "TRAINING_FREE_FIELDS",
    "SampleConfig",
    "build_guidance_method",
    "build_objective",
    "guidance_method_kwargs",
    "parse_flags",
    "recurrence_window",
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
    # the training-free family
    "recurrence": Range(int, 1),
    "backward_steps": Range(int, 0),
    "rho": Range(float),
    "mu": Range(float),
    "gamma": Range(float, 0),
    "mc_samples": Range(int, 1),
    "iterations": Range(int, 1),
}
"""The domain of every numeric field (None: the default applies); ``fguide sample`` parses its
flags with the same ranges."""


@dataclass
class SampleConfig:
    """Everything a run needs. ``None`` fields take defaults that depend on the others.

    Resolved defaults (:func:`fguide.sampling.resolve_config`): τ1 1; τ2 0.5 τ1 (``logsoftmax``:
    τ1; Heun: 0); α per method (``rkl`` 0.1, others 0.09), ε 0.1; λ 0.2 → 0.05 linear; t_tilt
    −0.2 for ``tilted``; γ 1 for x̂0 classifiers on DDPM/DDIM, the preset's README scale for ADM's
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
    """Text-to-image families (Stable Diffusion): the generation prompts, sample i takes prompt
    i mod n. Other families: a CLIP guide's (``clip:FOLDER``) prompts, its classes (one: text
    guidance)."""
    prompt_file: Path | None = None
    """A file of ``prompts``, one per line (instead of ``prompts``)."""
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
    steps: str | None = None
    """Respacing (``250``, ``10,10,5``, ``ddim25``) for DDPM/DDIM; the number of steps for Heun
    and Stable Diffusion; None: the family's default (:attr:`ModelFamily.default_steps`)."""
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
    # -- text-to-image families (Stable Diffusion; issue 20) ---------------------------------
    negative_prompt: str | None = None
    """Text-to-image: the unconditional prompt of classifier-free guidance (None: "", or
    SDXL's zero embeddings; "" differs from None there)."""
    guide_prompts: Sequence[str] | None = None
    """Text-to-image: the ``clip:`` guide's prompts (default: the generation ``prompts``)."""
    guide_prompt_file: Path | None = None
    """Text-to-image: a file of the ``clip:`` guide's prompts, one per line."""
    # -- the training-free family (fguide.training_free; issue 21) --
    guidance_method: str = "elucd"
    """The update rule: ``elucd`` (EluCD's mean shift, the default) or a training-free method
    (``dps``, ``freedom``, ``mpgd``, ``ugd``, ``tfg``); ``method`` stays the objective."""
    recurrence: int | None = None
    """freedom, ugd, tfg: repeats K of a step (time-travel / self-recurrence); 1: none."""
    recurrence_window: str | None = None
    """freedom, ugd: ``LO:HI``, the original timesteps (inclusive) where K applies (None: all)."""
    backward_steps: int | None = None
    """ugd: backward-guidance ascent steps m on x̂0."""
    rho: float | None = None
    mu: float | None = None
    gamma: float | None = None
    mc_samples: int | None = None
    iterations: int | None = None
    """tfg: ρ̄, μ̄, γ̄, Monte-Carlo draws M and x̂0 ascent steps N_iter."""
    rho_schedule: str | None = None
    """freedom, tfg: the ρ schedule (``increase``, ``decrease``, ``constant``)."""
    mu_schedule: str | None = None
    gamma_schedule: str | None = None
    """tfg: the μ schedule and the γ schedule (``decrease``, ``constant``)."""
    tfg_clip: bool = False
    """dps, freedom, mpgd, ugd: TFG's clip handling instead of the consistent one."""

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


# -- the training-free family (fguide.training_free; issue 21) ----------------------------------

METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "recurrence": ("freedom", "ugd", "tfg"),
    "recurrence_window": ("freedom", "ugd"),
    "backward_steps": ("ugd",),
    "rho": ("tfg",),
    "mu": ("tfg",),
    "gamma": ("tfg",),
    "mc_samples": ("tfg",),
    "iterations": ("tfg",),
    "rho_schedule": ("freedom", "tfg"),
    "mu_schedule": ("tfg",),
    "gamma_schedule": ("tfg",),
    "tfg_clip": ("dps", "freedom", "mpgd", "ugd"),
}
"""Each training-free field and the ``guidance_method`` values it applies to (refused for the
others; None or False for the others after resolving)."""
TRAINING_FREE_FIELDS: tuple[str, ...] = ("guidance_method", *METHOD_FIELDS)
"""The fields of the family: absent from the identity of an ``elucd`` run (older runs lack
them)."""


def recurrence_window(text: str | None) -> tuple[int, int] | None:
    """``"LO:HI"`` → (LO, HI), original timesteps with 0 <= LO <= HI; None stays None."""
    if text is None:
        return None
    lo, sep, hi = str(text).partition(":")
    if sep and lo.strip().isdigit() and hi.strip().isdigit() and int(lo) <= int(hi):
        return int(lo), int(hi)
    raise ParamError(
        "{0} must be LO:HI, original timesteps with 0 <= LO <= HI (e.g. 500:800); got {v!r}",
        "recurrence_window",
        v=text,
    )


def guidance_method_kwargs(c: SampleConfig) -> dict[str, Any]:
    """The hyper-parameters of a resolved configuration's training-free method.

    ``scale`` is the strength of dps, freedom, mpgd and ugd (ζ, ρ̄, s, s) and, for tfg, a gain
    on (ρ̄, μ̄): TFG's ρ̄·scale and μ̄·scale. Where both are 0 nothing is guided, so TFG's
    Monte-Carlo draws are not taken (γ̄ 0): scale 0 is the unguided sampler for every method.
    """
    assert c.scale is not None
    name = c.guidance_method
    if name == "tfg":
        rho, mu = c.scale * (c.rho or 0.0), c.scale * (c.mu or 0.0)
        return dict(
            rho=rho,
            mu=mu,
            gamma=(c.gamma or 0.0) if (rho != 0 or mu != 0) else 0.0,
            mc_samples=c.mc_samples,
            recurrence=c.recurrence,
            iterations=c.iterations,
            rho_schedule=c.rho_schedule,
            mu_schedule=c.mu_schedule,
            gamma_schedule=c.gamma_schedule,
        )
    kw: dict[str, Any] = {"scale": c.scale, "tfg_clip": c.tfg_clip}
    if name in ("freedom", "ugd"):
        kw.update(recurrence=c.recurrence, window=recurrence_window(c.recurrence_window))
    if name == "freedom":
        kw["schedule"] = c.rho_schedule
    if name == "ugd":
        kw["backward_steps"] = c.backward_steps
    return kw


def build_guidance_method(c: SampleConfig, classifier: ClassifierFn) -> GuidanceMethod:
    """The :class:`~fguide.training_free.GuidanceMethod` of a resolved configuration whose
    ``guidance_method`` is not ``elucd``, guiding with ``classifier`` (a classifier of x̂0)."""
    cls = METHODS[c.guidance_method]
    return cls(classifier, build_objective(c), **guidance_method_kwargs(c))


SAMPLER_SETTINGS: dict[str, tuple[str, ...]] = {
    "sine_factor": ("ddpm", "heun"),
    "variance_tracking": ("ddpm",),
    "guidance_input": ("heun",),
    "eta": ("ddim",),
}
"""The settings that shape one sampler's guidance step, and the samplers that read them."""
