"""The networks of a sampling run, built from its configuration: the diffusion model (an ADM
checkpoint), the schedule the sampler walks, and the guide (through the one classifier loader,
:func:`fguide.guides.load_classifier`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fguide.accel import (
    CompiledModel,
    compile_model,
    precision_dtype,
    to_channels_last,
    with_precision,
)
from fguide.config import SampleConfig, build_objective
from fguide.denoisers import ADMModel, Denoiser, EpsModel, VPAsEDM
from fguide.guidance import ClassifierGuide
from fguide.guides import LoadedClassifier, load_classifier
from fguide.models.edm import EDMDenoiser
from fguide.models.loading import load_model, load_state_dict_file, matching_presets
from fguide.models.nvlabs import load_network_pickle
from fguide.models.presets import (
    PRESETS,
    create_model,
    diffusion_defaults,
    model_defaults,
    preset_info,
    split_flags,
)
from fguide.params import ParamError
from fguide.schedules import Process, betas_for, karras_sigmas, make_process

__all__ = ["Components", "build_components"]


@dataclass
class Components:
    """The built networks and schedule of a run, on one device."""

    net: nn.Module
    model: EpsModel | None
    """The ε-model DDPM/DDIM call (ADM); None for an EDM network."""
    process: Process | None
    sigmas: Tensor | None
    denoiser: Denoiser | None
    """D(x, σ) for Heun: an EDM network, or an ε-model through :class:`VPAsEDM`."""
    classifier: LoadedClassifier | None
    guide: ClassifierGuide | None
    image_size: int
    num_classes: int | None
    device: torch.device
    info: dict[str, Any]
    """Resolved model and classifier description (part of the run's identity)."""
    label_mode: str = "uniform"
    """How labels are drawn (:func:`sample_labels`): the configuration's, or a CLIP target."""
    state_shape: tuple[int, int, int] | None = None
    """(C, H, W) of the state the sampler walks; None: (3, image_size, image_size)."""
    to_image: Callable[[Tensor], Tensor] | None = None
    """The final state → the image in [−1, 1] (a latent model's VAE decoder); None: itself."""
    clip_denoised: bool | None = None
    """The model's own x̂0 clipping (diffusers pipelines); None: the configuration's."""
    compiled: CompiledModel | None = None
    """The ``torch.compile``d network (``--compile``): its ``compile_seconds`` after a call."""


def _model_flags(cfg: SampleConfig, state_dict: Mapping[str, Tensor]) -> tuple[str | None, dict]:
    """(preset or None, resolved {model, diffusion} flags) of the diffusion model."""
    preset = cfg.model_preset
    overrides = dict(cfg.model_flags)
    if preset is None and not overrides:
        fits = [p for p in matching_presets(state_dict) if PRESETS[p].kind == "diffusion"]
        if not fits:
            raise ParamError(
                "{0}: {path} has the layout of no official ADM diffusion preset; give {1} or "
                "{2} (e.g. 'image_size=64 num_channels=192 ...')",
                *("model", "model_preset", "model_flags"),
                path=cfg.model,
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


MODEL_FILE = (
    "an ADM diffusion checkpoint (a .pt state dict), an NVlabs EDM network pickle (.pkl) or a "
    "diffusers pipeline folder"
)
"""What ``--model`` should be, for messages."""


def _load_diffusion(cfg: SampleConfig, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    if not cfg.model.is_file():
        raise FileNotFoundError(f"model: diffusion checkpoint not found: {cfg.model}")
    sd = load_state_dict_file(cfg.model, MODEL_FILE)
    preset, flags = _model_flags(cfg, sd)
    size = flags["model"]["image_size"]
    if cfg.image_size is not None and cfg.image_size != size:
        raise ParamError(
            "{0}: {given} does not match the diffusion model's image_size {size}{preset}",
            "image_size",
            given=cfg.image_size,
            size=size,
            preset=f" (preset {preset!r})" if preset else "",
        )
    try:
        if preset is not None and not cfg.model_flags:
            net = load_model(preset, sd)
        else:
            net = load_model(create_model(**flags["model"]), sd)
    except ValueError as err:  # the file's tensors do not fit: name the file
        raise ValueError(f"{cfg.model}: {err}") from err
    net = net.to(device).eval().requires_grad_(False)
    if cfg.precision != "fp32":
        net.convert_torso(precision_dtype(cfg.precision))  # type: ignore[operator]
    return net, {"preset": preset, **flags}


def _karras(cfg: SampleConfig, sigma_min: float, sigma_max: float) -> tuple[Tensor, list[float]]:
    """EDM's σ grid of ``cfg.steps`` steps within the network's range and EDM's [0.002, 80]."""
    lo, hi = max(0.002, sigma_min), min(80.0, sigma_max)
    return karras_sigmas(int(cfg.steps), lo, hi), [lo, hi]


def _edm_network(cfg: SampleConfig, dev: torch.device) -> Components:
    """The run's parts for an NVlabs EDM network pickle, read without running its embedded
    code, with its guide."""
    if cfg.sampler != "heun":
        raise ParamError(
            "{0}: EDM networks are sampled with heun, not {s!r}", "sampler", s=cfg.sampler
        )
    if cfg.model_preset is not None or cfg.model_flags:
        raise ParamError(
            "{0} and {1} apply to ADM checkpoints, not EDM pickles", "model_preset", "model_flags"
        )
    if cfg.precision == "bf16":
        raise ParamError(
            "{0}: EDM networks run in fp32 or fp16 (as EDM does), not bf16", "precision"
        )
    net, info = load_network_pickle(cfg.model)  # eval mode, no gradients
    net = net.to(dev)
    net.use_fp16 = cfg.precision == "fp16"  # EDM: the UNet body in fp16 on CUDA only
    # The whole preconditioned denoiser is compiled: c_in, c_skip, c_out fuse with the UNet.
    compiled = compile_model(net) if cfg.compile else None
    den_net = EDMDenoiser(net, compiled)
    den: Denoiser = to_channels_last(den_net, net) if cfg.channels_last else den_net
    kwargs = info["init_kwargs"]
    size, label_dim = int(kwargs["img_resolution"]), int(kwargs.get("label_dim", 0))
    if cfg.image_size is not None and cfg.image_size != size:
        raise ParamError(
            "{0}: {given} does not match the EDM network's {size}",
            "image_size",
            given=cfg.image_size,
            size=size,
        )
    sigmas, sigma_range = _karras(cfg, den_net.sigma_min, den_net.sigma_max)
    desc = {"family": "nvlabs", **{k: v for k, v in info.items() if k != "other_objects"}}
    desc["sigma_range"] = sigma_range
    comp = _with_guide(
        cfg, dev, net, None, None, sigmas, den, size, label_dim or None, {"model": desc}
    )
    comp.compiled = compiled
    return comp


def build_components(cfg: SampleConfig, device: torch.device | str = "cpu") -> Components:
    """Load and check the networks of a resolved configuration and build the schedule."""
    dev = torch.device(device)
    # Check every file before loading any: a 2 GB checkpoint takes a while to read.
    family = model_family(cfg.model)
    if not (cfg.model.is_file() or family == "diffusers"):
        raise FileNotFoundError(
            f"model: diffusion checkpoint not found: {cfg.model}"
            + (
                " (a folder, but not a diffusers pipeline: no model_index.json)"
                if cfg.model.is_dir()
                else ""
            )
        )
    if cfg.classifier_weights is not None and not cfg.classifier_weights.is_file():
        raise FileNotFoundError(f"classifier_weights: file not found: {cfg.classifier_weights}")
    if family == "diffusers":
        return _pipeline(cfg, dev)
    if family == "nvlabs":
        return _edm_network(cfg, dev)
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
    compiled = compile_model(net) if cfg.compile else None  # compiled on the first call
    model: EpsModel = ADMModel(compiled or net, class_cond)  # type: ignore[arg-type]
    if cfg.channels_last:
        model = to_channels_last(model, net)
    info: dict[str, Any] = {"model": model_info, "variance_type": variance}
    sigmas: Tensor | None = None
    denoiser: Denoiser | None = None
    if cfg.sampler == "heun":
        abar = np.cumprod(1.0 - betas_for(dflags["noise_schedule"], dflags["diffusion_steps"]))
        denoiser = VPAsEDM(model, abar)
        sigmas, info["sigma_range"] = _karras(cfg, denoiser.sigma_min, denoiser.sigma_max)

    comp = _with_guide(
        cfg, dev, net, model, process, sigmas, denoiser, size, 1000 if class_cond else None, info
    )
    comp.compiled = compiled
    return comp


def _pipeline(cfg: SampleConfig, dev: torch.device) -> Components:
    """A diffusers pipeline folder (DiT with CFG in a VAE latent space, or a pixel UNet2DModel)
    with its guide: EluCD's Algorithm 3 or the DDPM mean shift through the decoder.

    ``precision`` casts the denoising network's weights (diffusers' ``torch_dtype``; its inputs
    are cast to them and its outputs back to float32); the guidance's decoder and classifier
    run under autocast in ``classifier_precision``; the final decode stays float32.
    ``channels_last`` converts the convolutional networks (UNet2DModel, the VAE); ``compile``
    compiles the denoising network.
    """
    from fguide.models.hf_diffusers import load_pipeline_model
    from fguide.models.latent_guidance import build_pipeline_sampling

    pm = load_pipeline_model(cfg.model, device=dev)
    if cfg.precision != "fp32":
        pm.net.to(precision_dtype(cfg.precision))
    if cfg.channels_last:
        for module in ([pm.net] if pm.kind == "unet" else []) + (
            [pm.decoder.vae] if pm.decoder is not None else []
        ):
            module.to(memory_format=torch.channels_last)
    comp = _with_guide(
        cfg, dev, pm.net, None, None, None, None, pm.image_size, pm.num_classes,
        {"model": {"family": "diffusers", **pm.info()}}, make_guide=False,
    )  # fmt: skip
    if cfg.compile:
        comp.compiled = compile_model(pm.net)
        pm.net = comp.compiled  # type: ignore[assignment]  # called like the module it wraps
    guided = cfg.method != "none"
    assert comp.classifier is not None or not guided
    s = build_pipeline_sampling(
        pm,
        respacing=cfg.steps,
        cfg_scale=cfg.cfg_scale if cfg.cfg_scale is not None else 1.0,
        cfg_channels=cfg.cfg_channels,
        classifier=comp.classifier.module if guided else None,  # type: ignore[union-attr]
        objective=build_objective(cfg) if guided else None,
        scale=cfg.scale or 0.0,
        guidance=cfg.guidance_form or "algorithm3",  # type: ignore[arg-type]
        sine_factor=cfg.sine_factor or 0.0,
        microbatch=cfg.guidance_microbatch,
        classifier_precision=cfg.classifier_precision,  # type: ignore[arg-type]
    )
    comp.model, comp.process, comp.guide = s.model, s.process, s.guide
    comp.state_shape, comp.to_image, comp.clip_denoised = s.state_shape, s.to_image, s.clip_denoised
    return comp


def _with_guide(
    cfg: SampleConfig,
    dev: torch.device,
    net: nn.Module,
    model: EpsModel | None,
    process: Process | None,
    sigmas: Tensor | None,
    denoiser: Denoiser | None,
    size: int,
    num_classes: int | None,
    info: dict[str, Any],
    make_guide: bool = True,
) -> Components:
    """Load the guide's classifier (when there is one), check it against the model, build the
    run's parts; ``make_guide=False`` leaves the guide to the caller (diffusers pipelines)."""
    class_cond = num_classes is not None
    classifier = None
    if cfg.classifier is not None:
        classifier = load_classifier(
            cfg.classifier,
            cfg.classifier_weights,
            image_size=size,
            device=dev,
            softplus_beta=cfg.softplus_beta,
            sampler=cfg.sampler or "ddpm",
            input_mode=cfg.classifier_input_mode,
            resize=cfg.classifier_resize,
            flags=cfg.classifier_flags,
            prompts=cfg.prompts,
            prompt_file=cfg.prompt_file,
        )
        if class_cond and classifier.num_classes != num_classes:
            raise ParamError(
                "{0} {spec!r} has {n} classes but the class-conditional diffusion model has "
                "{m}: the labels must mean the same classes",
                "classifier",
                spec=cfg.classifier,
                n=classifier.num_classes,
                m=num_classes,
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
            raise ParamError(
                "{0}: class {cls} given, but the model is unconditional and there is no classifier",
                "labels",
                cls=cls,
            )
        if not 0 <= cls < num_classes:
            raise ParamError(
                "{0}: class {cls} is out of range [0, {n})", "labels", cls=cls, n=num_classes
            )
    guide = None
    if cfg.method != "none" and make_guide:
        assert classifier is not None and cfg.scale is not None
        guide = ClassifierGuide(
            with_precision(classifier.module, cfg.classifier_precision),  # type: ignore[arg-type]
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
