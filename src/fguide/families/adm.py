"""The ADM family: a diffusion checkpoint as a plain state dict (``*.pt``), its flags from an
official preset (inferred from the file's layout) or given, sampled by DDPM/DDIM on its
respaced process or by Heun through :class:`~fguide.denoisers.VPAsEDM`.

It is the fallback of the registry: any ``--model`` no other family claims is read as an ADM
checkpoint (and refused, naming what ``--model`` may be, when it is none).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fguide.accel import compile_model, precision_dtype, to_channels_last
from fguide.config import SampleConfig
from fguide.denoisers import ADMModel, Denoiser, EpsModel, VPAsEDM
from fguide.families.base import Components, ModelFamily, attach_guide, karras_grid
from fguide.models.loading import load_model, load_state_dict_file, matching_presets
from fguide.models.presets import (
    PRESETS,
    create_model,
    diffusion_defaults,
    model_defaults,
    preset_info,
    split_flags,
)
from fguide.params import OwnedFields, ParamError
from fguide.schedules import betas_for, make_process

__all__ = ["MODEL_FILE", "ADMFamily", "load_diffusion", "model_flags"]

MODEL_FILE = (
    "an ADM diffusion checkpoint (a .pt state dict), an NVlabs EDM network pickle (.pkl) or a "
    "diffusers pipeline folder"
)
"""What ``--model`` may be (every family's input), for the fallback's messages."""


class ADMFamily(ModelFamily):
    """ADM checkpoints (the fallback: it claims every model)."""

    name = "adm"
    fields = OwnedFields(("model_preset", "model_flags"), "ADM checkpoints", name_all=True)

    def claims(self, model: Path) -> bool:
        return True

    def check_files(self, config: SampleConfig) -> None:
        if not config.model.is_file():
            hint = (
                " (a folder, but not a diffusers pipeline: no model_index.json)"
                if config.model.is_dir()
                else ""
            )
            raise FileNotFoundError(f"model: diffusion checkpoint not found: {config.model}{hint}")

    def build(self, config: SampleConfig, device: torch.device) -> Components:
        net, model_info = load_diffusion(config, device)
        mflags, dflags = model_info["model"], model_info["diffusion"]
        class_cond = bool(mflags["class_cond"])
        variance = "learned_range" if dflags["learn_sigma"] else "fixed_large"
        process = make_process(
            dflags["noise_schedule"],
            dflags["diffusion_steps"],
            str(config.steps) if config.sampler != "heun" else "",
            variance,  # type: ignore[arg-type]
            dflags["rescale_timesteps"],
        )
        compiled = compile_model(net) if config.compile else None  # compiled on the first call
        model: EpsModel = ADMModel(compiled or net, class_cond)  # type: ignore[arg-type]
        if config.channels_last:
            model = to_channels_last(model, net)
        info: dict[str, Any] = {"model": model_info, "variance_type": variance}
        sigmas: Tensor | None = None
        denoiser: Denoiser | None = None
        if config.sampler == "heun":
            betas = betas_for(dflags["noise_schedule"], dflags["diffusion_steps"])
            denoiser = VPAsEDM(model, np.cumprod(1.0 - betas))
            sigmas, info["sigma_range"] = karras_grid(
                config, denoiser.sigma_min, denoiser.sigma_max
            )
        size, num_classes = int(mflags["image_size"]), 1000 if class_cond else None
        comp = Components(
            net, model, process, sigmas, denoiser, None, None, size, num_classes, device, info
        )
        comp.compiled = compiled
        return attach_guide(config, comp)


def model_flags(config: SampleConfig, state_dict: Mapping[str, Tensor]) -> tuple[str | None, dict]:
    """(preset or None, resolved {model, diffusion} flags) of the diffusion model."""
    preset = config.model_preset
    overrides = dict(config.model_flags)
    if preset is None and not overrides:
        fits = [p for p in matching_presets(state_dict) if PRESETS[p].kind == "diffusion"]
        if not fits:
            raise ParamError(
                "{0}: {path} has the layout of no official ADM diffusion preset; give {1} or "
                "{2} (e.g. 'image_size=64 num_channels=192 ...')",
                *("model", "model_preset", "model_flags"),
                path=config.model,
            )
        preset = fits[0]
    base: dict[str, Any] = {}
    if preset is not None:
        info = preset_info(preset)
        if info.kind != "diffusion":
            raise ParamError(
                "{0}: {preset!r} is a classifier preset, not a diffusion one",
                "model_preset",
                preset=preset,
            )
        base = {**info.flags, **(info.diffusion_flags or {})}
    if "timestep_respacing" in overrides:
        raise ParamError(
            "{0}: give the respacing with {1}, not timestep_respacing", "model_flags", "steps"
        )
    unknown = sorted(set(overrides) - set(model_defaults()) - set(diffusion_defaults()))
    if unknown:
        raise ParamError(
            "{0}: unknown flag(s) {unknown}; valid: {valid}",
            "model_flags",
            unknown=unknown,
            valid=sorted(set(model_defaults()) | set(diffusion_defaults())),
        )
    groups = split_flags({**base, **overrides})
    if groups["diffusion"]["predict_xstart"]:
        raise ParamError(
            "{0}: predict_xstart models are not supported (ε-prediction only)", "model_flags"
        )
    return preset, {"model": groups["model"], "diffusion": groups["diffusion"]}


def load_diffusion(config: SampleConfig, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The ADM UNet of ``config.model``, checked against its flags, on ``device``; its resolved
    preset and flags."""
    if not config.model.is_file():
        raise FileNotFoundError(f"model: diffusion checkpoint not found: {config.model}")
    sd = load_state_dict_file(config.model, MODEL_FILE)
    preset, flags = model_flags(config, sd)
    size = flags["model"]["image_size"]
    if config.image_size is not None and config.image_size != size:
        raise ParamError(
            "{0}: {given} does not match the diffusion model's image_size {size}{preset}",
            "image_size",
            given=config.image_size,
            size=size,
            preset=f" (preset {preset!r})" if preset else "",
        )
    try:
        if preset is not None and not config.model_flags:
            net = load_model(preset, sd)
        else:
            net = load_model(create_model(**flags["model"]), sd)
    except ValueError as err:  # the file's tensors do not fit: name the file
        raise ValueError(f"{config.model}: {err}") from err
    net = net.to(device).eval().requires_grad_(False)
    if config.precision != "fp32":
        net.convert_torso(precision_dtype(config.precision))  # type: ignore[operator]
    return net, {"preset": preset, **flags}
