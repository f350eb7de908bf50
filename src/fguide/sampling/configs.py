"""The paper's and EluCD's named sampling configurations (METHODS.md §7).

Each configuration is a set of :class:`fguide.sampling.SampleConfig` field values: the model
preset, the sampler and its steps, the classifier, the method and its parameters. File paths
(the diffusion checkpoint, the classifier weights) are never part of a configuration's
settings; the user gives them, or ``--weights-dir`` finds the files the configuration names
(``model_file``, ``weights``; :mod:`fguide.weights` says where each comes from).
``fguide sample --config NAME`` starts from these values and every flag given explicitly
overrides them (:func:`apply_paper_config`).

All ImageNet 128×128 configurations use ADM's ``128x128_diffusion`` with 250 DDPM steps in
fp16 (the reference samples with ``--use_fp16 True``). The EluCD ones use torchvision's V2
ResNet weights (``resnet50-11ad3fa6.pth``, ``resnet101-cd907fc2.pth``) on x̂0 in [−1, 1] at
native size, every ReLU made Softplus(β = 3), τ1 = 1, τ2 = 0.5, γ = 1.0, γ_sine = 0.3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fguide import defaults
from fguide.config import SAMPLER_SETTINGS
from fguide.sampling.guidance_method import ELUCD_ONLY

__all__ = ["PAPER_CONFIGS", "PaperConfig", "apply_paper_config", "paper_config"]


@dataclass(frozen=True)
class PaperConfig:
    """One named configuration: :class:`~fguide.sampling.SampleConfig` values and its source."""

    name: str
    description: str
    reference: str
    """The result the configuration reproduces (FID and sample count), as published."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    """The guide's weight file (torchvision or ADM file name) or CLIP folder it expects."""
    model_file: str | None = None
    """The diffusion model's file (ADM checkpoint, NVlabs pickle) or pipeline folder name."""


_ELUCD: dict[str, Any] = {
    "model_preset": "128x128_diffusion",
    "sampler": "ddpm",
    "steps": "250",
    "precision": "fp16",
    "classifier_input_mode": "elucd",
    "softplus_beta": defaults.softplus_beta("ddpm"),
    "tau1": defaults.TAU1,
    "tau2": defaults.tau2("base", "ddpm"),
    "scale": defaults.SCALE,
    "sine_factor": defaults.SINE_FACTOR,
    "num_samples": 50000,
}
# EluCD's EDM experiments (its EDM/guided_sample.sh): edm-imagenet-64x64-cond-adm.pkl, Heun,
# ResNet-101 V2 on x/max(1, rms x) at 64×64, Softplus 5, τ1 1, τ2 0, sine factor 0.3.
_EDM: dict[str, Any] = {
    "sampler": "heun",
    "precision": "fp16",
    "classifier": "resnet101",
    "classifier_input_mode": "elucd",
    "softplus_beta": defaults.softplus_beta("heun"),
    "method": "base",
    "tau1": defaults.TAU1,
    "tau2": defaults.tau2("base", "heun"),
    "sine_factor": defaults.SINE_FACTOR,
    "guidance_input": "x",
    "num_samples": 50000,
}
_EDM_CHURN = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
_R50 = {"classifier": "resnet50"}
_R101 = {"classifier": "resnet101"}
_R50_FILE = "resnet50-11ad3fa6.pth"
_R101_FILE = "resnet101-cd907fc2.pth"
_EDM_FILE = "edm-imagenet-64x64-cond-adm.pkl"

# Stable Diffusion: unguided by default; a guide is the user's (γ has no published value).
_SD15: dict[str, Any] = {
    "steps": defaults.SD_STEPS,
    "cfg_scale": defaults.SD_CFG_SCALE["sd"],
    "image_size": 512,
    "method": "none",
    "tau2": 0.0,
}
_SD_GUIDED = (
    "Unguided as named; CLIP-guided with --guide clip:FOLDER (ViT-L/14; it scores the "
    "generation prompts) --method base --scale γ (τ2 = 0: cosine guidance). No γ is published "
    "for these models: choose it by a sweep on validation seeds"
)
_SD_REFERENCE = "no published guided number: a starting point, not a reproduction"
# The pipeline folders (fguide.weights' entries, diffusers layout) the SD configurations load.
_SD15_FOLDER = "stable-diffusion-v1-5"
_SDXL_FOLDER = "stable-diffusion-xl-base-1.0"

# Methods that carry their own parameters: a config's values for them are dropped when the
# user picks another method (they would not apply, and objective() refuses e.g. alpha on base).
_METHOD_PARAMS = ("alpha", "eps", "lam_max", "lam_min", "lam_schedule", "t_tilt", "tilt_group")


def _cfg(
    name: str,
    description: str,
    reference: str,
    weights: str | None,
    model_file: str | None = None,
    **settings: Any,
) -> PaperConfig:
    # ADM presets are published as <preset>.pt (openai/guided-diffusion's file names).
    preset = settings.get("model_preset")
    model_file = model_file or (f"{preset}.pt" if preset else None)
    return PaperConfig(name, description, reference, settings, weights, model_file)


PAPER_CONFIGS: dict[str, PaperConfig] = {
    c.name: c
    for c in (
        _cfg(
            "elucd-r50-128",
            "EluCD: ResNet-50 V2 (Softplus 3) guiding 128x128_diffusion on x̂0, base score",
            "EluCD",
            _R50_FILE,
            **_ELUCD,
            **_R50,
            method="base",
        ),
        _cfg(
            "elucd-r101-128",
            "EluCD: ResNet-101 V2 (Softplus 3) guiding 128x128_diffusion on x̂0, base score",
            "EluCD FID 2.19 (50k)",
            _R101_FILE,
            **_ELUCD,
            **_R101,
            method="base",
        ),
        _cfg(
            "rkl-r50-128",
            "reverse-KL regularised guidance, ResNet-50 (α 0.1, ε 0.1)",
            "paper FID 2.29 (50k)",
            _R50_FILE,
            **_ELUCD,
            **_R50,
            method="rkl",
            alpha=defaults.alpha("rkl"),
            eps=defaults.EPS,
        ),
        _cfg(
            "js-r101-128",
            "Jensen–Shannon regularised guidance, ResNet-101 (α 0.09, ε 0.1)",
            "paper FID 2.13 (50k)",
            _R101_FILE,
            **_ELUCD,
            **_R101,
            method="js",
            alpha=defaults.alpha("js"),
            eps=defaults.EPS,
        ),
        _cfg(
            "fkl-r101-128",
            "forward-KL regularised guidance, ResNet-101 (α 0.09, ε 0.1)",
            "paper FID 2.16–2.17 (50k)",
            _R101_FILE,
            **_ELUCD,
            **_R101,
            method="fkl",
            alpha=defaults.alpha("fkl"),
            eps=defaults.EPS,
        ),
        _cfg(
            "rkl-r101-128",
            "reverse-KL regularised guidance, ResNet-101 (α 0.1, ε 0.1)",
            "paper FID 2.14 (50k)",
            _R101_FILE,
            **_ELUCD,
            **_R101,
            method="rkl",
            alpha=defaults.alpha("rkl"),
            eps=defaults.EPS,
        ),
        _cfg(
            "hellinger-r101-128",
            "squared-Hellinger regularised guidance, ResNet-101 (α 0.09, ε 0.1)",
            "paper FID 2.15 (50k)",
            _R101_FILE,
            **_ELUCD,
            **_R101,
            method="hellinger",
            alpha=defaults.alpha("hellinger"),
            eps=defaults.EPS,
        ),
        _cfg(
            "entropy-r50-128",
            "entropy-regularised guidance, ResNet-50 (λ 0.2 → 0.05, linear in progress)",
            "paper FID 5.30 (10k)",
            _R50_FILE,
            **{**_ELUCD, "num_samples": 10000},
            **_R50,
            method="entropy",
            lam_max=defaults.LAM_MAX,
            lam_min=defaults.LAM_MIN,
            lam_schedule=defaults.LAM_SCHEDULE,
        ),
        _cfg(
            "tilted-r50-128",
            "tilted batch weights on the base score, ResNet-50 (t_tilt −0.2)",
            "paper FID 5.28 (10k)",
            _R50_FILE,
            **{**_ELUCD, "num_samples": 10000},
            **_R50,
            method="tilted",
            t_tilt=defaults.T_TILT,
        ),
        _cfg(
            "adm-cg-128",
            "classic classifier guidance: ADM's noise-aware 128x128_classifier on x_t, "
            "log-softmax (τ1 = τ2 = 1), condition_mean without the sine boost",
            "ADM's guided 128×128 setting (classifier scale 0.5)",
            "128x128_classifier.pt",
            model_preset="128x128_diffusion",
            sampler="ddpm",
            steps="250",
            precision="fp16",
            classifier="128x128_classifier",
            method="logsoftmax",
            tau1=1.0,
            tau2=1.0,
            scale=0.5,
            sine_factor=0.0,
            num_samples=50000,
        ),
        *(
            _cfg(
                f"elucd-edm-r101-{steps}",
                f"EluCD Algorithm 2: EDM's ImageNet-64 network, deterministic Heun with {steps} "
                "steps, guided by ResNet-101 V2 (Softplus 5) on x/max(1, rms x), τ2 = 0, "
                f"G = {defaults.heun_scale(steps):g}",
                f"EluCD Table 8: FID {fid} (50k; ~+5% time)",
                _R101_FILE,
                _EDM_FILE,
                **_EDM,
                steps=str(steps),
                scale=defaults.heun_scale(steps),
            )
            for steps, fid in ((10, "3.64 → 3.38"), (18, "2.54 → 2.35"), (36, "2.35 → 2.22"))
        ),
        _cfg(
            "elucd-edm-r101-stoch-250",
            "EluCD: EDM's stochastic sampler (S_churn 40, S_min 0.05, S_max 50, S_noise 1.003), "
            "250 steps, ResNet-101 guidance as in elucd-edm-r101-18, G = 0.001",
            "EluCD Table C.1: FID 1.41 → 1.33 (50k)",
            _R101_FILE,
            _EDM_FILE,
            **_EDM,
            **_EDM_CHURN,
            steps="250",
            scale=defaults.heun_scale(250),
        ),
        _cfg(
            "edm-imagenet64-stoch",
            "EDM's own ImageNet-64 setting, unguided: stochastic Heun, 256 steps",
            "EDM paper: FID 1.36 (50k)",
            None,
            _EDM_FILE,
            **{k: v for k, v in _EDM.items() if k in ("sampler", "precision", "num_samples")},
            **_EDM_CHURN,
            steps="256",
            method="none",
        ),
        _cfg(
            "elucd-dit-xl2-256",
            "EluCD §5.3 / Algorithm 3: DiT-XL/2 256 (a diffusers pipeline folder, VAE "
            "sd-vae-ft-ema) with CFG 1.5 on 3 latent channels, learned variance, 250 steps, plus "
            "ResNet-101 V2 (Softplus 3, τ2 0.5) on the decoded x̂0; give --scale (G): EluCD does "
            "not publish it",
            "EluCD Table 9: FID 2.27 (CFG alone, DiT) → 2.12 (+ ResNet-101) (50k)",
            _R101_FILE,
            "DiT-XL-2-256",
            sampler="ddpm",
            steps="250",
            cfg_scale=1.5,
            cfg_channels=3,
            dit_network="dit",
            guidance_form="algorithm3",
            classifier="resnet101",
            classifier_input_mode="elucd",
            softplus_beta=defaults.softplus_beta("ddpm"),
            method="base",
            tau1=defaults.TAU1,
            tau2=defaults.tau2("base", "ddpm"),
            sine_factor=defaults.SINE_FACTOR,
            num_samples=50000,
        ),
        _cfg(
            "elucd-clip-256",
            "EluCD §5.4 text guidance: ADM's 256x256_diffusion_uncond guided by an off-the-shelf "
            "CLIP (ViT-L/14 at 336 px; give --guide clip:FOLDER --prompt TEXT) on x̂0, S = "
            "s·cos(image, prompt) (τ2 = 0), sine-boosted schedule",
            "EluCD Figure 7 (CLIP score along the trajectory, boosted above linear at every "
            "step); γ = 1 is fguide's choice: EluCD's scale is not in its text or code",
            "clip-vit-large-patch14-336",
            model_preset="256x256_diffusion_uncond",
            sampler="ddpm",
            steps="250",
            precision="fp16",
            method="base",
            tau1=defaults.TAU1,
            tau2=0.0,
            scale=defaults.SCALE,
            sine_factor=defaults.SINE_FACTOR,
            num_samples=1000,
        ),
        # Stable Diffusion (issue 20): the pipelines' usual settings; give --model SD_DIR (or
        # --weights-dir DIR holding the folder named by model_file) and --prompt. Guided
        # variant: --guide clip:FOLDER (CLIP ViT-L/14; the generation prompts) --method base
        # --scale γ; tau2 0 makes S = τ1·s·cos (cosine guidance).
        _cfg(
            "sd15",
            "Stable Diffusion 1.5's usual text-to-image setting: DPM-Solver++(2M), 50 steps, CFG "
            f"7.5, 512 px (diffusers' recommended fast solver). {_SD_GUIDED}",
            _SD_REFERENCE,
            None,
            _SD15_FOLDER,
            **_SD15,
            sampler="dpmpp-2m",
        ),
        _cfg(
            "sd15-ddim",
            "Stable Diffusion 1.5 with DDIM (η 0), 50 steps, CFG 7.5, 512 px: the setting most "
            f"SD papers report, closest to the original LDM sampler. {_SD_GUIDED}",
            _SD_REFERENCE,
            None,
            _SD15_FOLDER,
            **_SD15,
            sampler="ddim",
            eta=0.0,
        ),
        _cfg(
            "sdxl",
            "SDXL base 1.0's usual setting: DPM-Solver++(2M), 50 steps, CFG 5.0 (diffusers' "
            f"SDXL default), 1024 px. {_SD_GUIDED}",
            _SD_REFERENCE,
            None,
            _SDXL_FOLDER,
            sampler="dpmpp-2m",
            steps=defaults.SD_STEPS,
            cfg_scale=defaults.SD_CFG_SCALE["sdxl"],
            image_size=1024,
            method="none",
            tau2=0.0,
        ),
    )
}
"""The named configurations of METHODS.md §7, by name."""


def paper_config(name: str) -> PaperConfig:
    """The configuration called ``name``; a ``ValueError`` lists the valid names."""
    try:
        return PAPER_CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"config: unknown configuration {name!r}; valid: {', '.join(PAPER_CONFIGS)}"
        ) from None


def apply_paper_config(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration's settings with ``overrides`` (explicit user values) applied on top.

    When ``overrides`` changes the method, the configuration's method parameters (α, ε, λ,
    t_tilt, tilt group) are dropped: they belong to the configuration's method. A training-free
    ``guidance_method`` drops EluCD's scale, sine boost, variance tracking and Heun input.
    """
    settings = dict(paper_config(name).settings)
    method = overrides.get("method")
    if method is not None and method != settings.get("method"):
        for key in _METHOD_PARAMS:
            settings.pop(key, None)
    if overrides.get("guidance_method", "elucd") != "elucd":
        # a training-free method replaces EluCD's mean shift: its strength and settings go
        for key in ("scale", *ELUCD_ONLY):
            settings.pop(key, None)
    sampler = overrides.get("sampler")
    if sampler is not None and sampler != settings.get("sampler"):
        # the configuration's settings of its own sampler do not apply to another
        for key, samplers in SAMPLER_SETTINGS.items():
            if sampler not in samplers:
                settings.pop(key, None)
    settings.update(overrides)
    settings["config_name"] = name
    return settings
