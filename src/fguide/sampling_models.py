"""The networks of a sampling run, built from its configuration: the diffusion model (an ADM
checkpoint), the schedule the sampler walks, and the guide (through the one classifier loader,
:func:`fguide.models.classifiers.load_classifier`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fguide.denoisers import ADMModel, VPAsEDM
from fguide.guidance import ClassifierGuide
from fguide.models.classifiers import LoadedClassifier, load_classifier
from fguide.models.loading import load_model, load_state_dict_file, matching_presets
from fguide.models.presets import (
    PRESETS,
    create_model,
    diffusion_defaults,
    model_defaults,
    preset_info,
    split_flags,
)
from fguide.sampling_config import PRECISIONS, SampleConfig, build_objective
from fguide.schedules import Process, betas_for, karras_sigmas, make_process

__all__ = ["Components", "build_components"]


@dataclass
class Components:
    """The built networks and schedule of a run, on one device."""

    net: nn.Module
    model: ADMModel
    process: Process
    sigmas: Tensor | None
    denoiser: VPAsEDM | None
    classifier: LoadedClassifier | None
    guide: ClassifierGuide | None
    image_size: int
    num_classes: int | None
    device: torch.device
    info: dict[str, Any]
    """Resolved model and classifier description (part of the run's identity)."""
    label_mode: str = "uniform"
    """How labels are drawn (:func:`sample_labels`): the configuration's, or a CLIP target."""


def _model_flags(cfg: SampleConfig, state_dict: Mapping[str, Tensor]) -> tuple[str | None, dict]:
    """(preset or None, resolved {model, diffusion} flags) of the diffusion model."""
    preset = cfg.model_preset
    overrides = dict(cfg.model_flags)
    if preset is None and not overrides:
        fits = [p for p in matching_presets(state_dict) if PRESETS[p].kind == "diffusion"]
        if not fits:
            raise ValueError(
                f"model: {cfg.model} has the layout of no official ADM diffusion preset; give "
                "--model-preset or --model-flags (e.g. 'image_size=64 num_channels=192 ...')"
            )
        preset = fits[0]
    base: dict[str, Any] = {}
    if preset is not None:
        info = preset_info(preset)
        if info.kind != "diffusion":
            raise ValueError(
                f"model_preset: {preset!r} is a classifier preset, not a diffusion one"
            )
        base = {**info.flags, **(info.diffusion_flags or {})}
    if "timestep_respacing" in overrides:
        raise ValueError("model flags: give the respacing with --steps, not timestep_respacing")
    unknown = sorted(set(overrides) - set(model_defaults()) - set(diffusion_defaults()))
    if unknown:
        raise ValueError(
            f"model flags: unknown flag(s) {unknown}; valid: "
            f"{sorted(set(model_defaults()) | set(diffusion_defaults()))}"
        )
    groups = split_flags({**base, **overrides})
    if groups["diffusion"]["predict_xstart"]:
        raise ValueError("model flags: predict_xstart models are not supported (ε-prediction only)")
    return preset, {"model": groups["model"], "diffusion": groups["diffusion"]}


def _load_diffusion(cfg: SampleConfig, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    if not cfg.model.is_file():
        raise FileNotFoundError(f"model: diffusion checkpoint not found: {cfg.model}")
    sd = load_state_dict_file(cfg.model)
    preset, flags = _model_flags(cfg, sd)
    size = flags["model"]["image_size"]
    if cfg.image_size is not None and cfg.image_size != size:
        raise ValueError(
            f"image_size: {cfg.image_size} does not match the diffusion model's image_size {size}"
            + (f" (preset {preset!r})" if preset else "")
        )
    if preset is not None and not cfg.model_flags:
        net = load_model(preset, sd)
    else:
        net = load_model(create_model(**flags["model"]), sd)
    net = net.to(device).eval().requires_grad_(False)
    if cfg.precision != "fp32":
        net.convert_torso(PRECISIONS[cfg.precision])  # type: ignore[operator]
    return net, {"preset": preset, **flags}


def build_components(cfg: SampleConfig, device: torch.device | str = "cpu") -> Components:
    """Load and check the networks of a resolved configuration and build the schedule."""
    dev = torch.device(device)
    # Check every file before loading any: a 2 GB checkpoint takes a while to read.
    if not cfg.model.is_file():
        raise FileNotFoundError(f"model: diffusion checkpoint not found: {cfg.model}")
    if cfg.classifier_weights is not None and not cfg.classifier_weights.is_file():
        raise FileNotFoundError(f"classifier_weights: file not found: {cfg.classifier_weights}")
    net, model_info = _load_diffusion(cfg, dev)
    mflags, dflags = model_info["model"], model_info["diffusion"]
    size = int(mflags["image_size"])
    class_cond = bool(mflags["class_cond"])
    variance = "learned_range" if dflags["learn_sigma"] else "fixed_large"
    process = make_process(
        dflags["noise_schedule"],
        dflags["diffusion_steps"],
        cfg.steps if cfg.sampler != "heun" else "",
        variance,  # type: ignore[arg-type]
        dflags["rescale_timesteps"],
    )
    model = ADMModel(net, class_cond)
    info: dict[str, Any] = {"model": model_info, "variance_type": variance}
    sigmas = denoiser = None
    if cfg.sampler == "heun":
        abar = np.cumprod(1.0 - betas_for(dflags["noise_schedule"], dflags["diffusion_steps"]))
        denoiser = VPAsEDM(model, abar)
        lo, hi = max(0.002, denoiser.sigma_min), min(80.0, denoiser.sigma_max)
        sigmas = karras_sigmas(int(cfg.steps), lo, hi)
        info["sigma_range"] = [lo, hi]

    classifier, num_classes = None, 1000 if class_cond else None
    if cfg.classifier is not None:
        classifier = load_classifier(
            cfg.classifier,
            cfg.classifier_weights,
            image_size=size,
            device=dev,
            softplus_beta=cfg.softplus_beta,
            sampler=cfg.sampler,
            input_mode=cfg.classifier_input_mode,
            resize=cfg.classifier_resize,
            flags=cfg.classifier_flags,
            prompts=cfg.prompts,
            prompt_file=cfg.prompt_file,
        )
        if class_cond and classifier.num_classes != num_classes:
            raise ValueError(
                f"classifier {cfg.classifier!r} has {classifier.num_classes} classes but the "
                f"class-conditional diffusion model has {num_classes}: the labels must mean the "
                "same classes"
            )
        num_classes = classifier.num_classes
        info["classifier"] = classifier.description
    label_mode = cfg.labels
    if cfg.target is not None:
        assert classifier is not None and classifier.kind == "clip"
        label_mode = str(classifier.module.target_index(cfg.target))  # type: ignore[operator]
    if cfg.labels not in ("uniform", "balanced"):
        cls = int(cfg.labels)
        if num_classes is None:
            raise ValueError(
                f"labels: class {cls} given, but the model is unconditional and there is no "
                "classifier"
            )
        if not 0 <= cls < num_classes:
            raise ValueError(f"labels: class {cls} is out of range [0, {num_classes})")
    guide = None
    if cfg.method != "none":
        assert classifier is not None and cfg.scale is not None
        guide = ClassifierGuide(
            classifier.module,
            build_objective(cfg),
            cfg.scale,
            input="xt" if classifier.time_aware else "x0",
            time_aware=classifier.time_aware,
        )
    return Components(
        net,
        model,
        process,
        sigmas,
        denoiser,
        classifier,
        guide,
        size,
        num_classes,
        dev,
        info,
        label_mode,
    )
