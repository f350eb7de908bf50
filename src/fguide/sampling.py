"""Sampling runs: sharded, resumable and distributed guided sampling (``fguide sample``).

A run draws ``num_samples`` images with one sampler (METHODS.md §1, §5) guided by one
objective (§2–3) and writes them in ADM's format. The rules that make it resumable and
parallel:

- **Sample i is a function of (configuration, seed, i) only.** Its noise comes from a
  generator seeded by (seed, i) (:class:`fguide.SampleNoise`), its label from one seeded by
  (seed, i, label stream) (:func:`sample_labels`). So it does not depend on the batch, the
  shard, the process, or the number of samples asked for. Per-sample methods are exact in
  this sense; EluCD's ``variance_tracking="first_sample"`` couples a batch and is not.
- **Tilting couples a group**, so groups are fixed blocks of sample indices
  [jG, (j+1)G), G = ``tilt_group``, never "the batch": batches are whole groups and shards are
  multiples of G. The last block of a run is completed with extra samples that are drawn and
  thrown away, so a tilted sample depends on its block alone.
- **Shards** are fixed index ranges [i0, i1) of ``shard_size`` samples (independent of the
  batch size and of the number of processes). A shard is written atomically (temporary file,
  then rename): the npz, its trajectory statistics, and last a sidecar JSON with their
  SHA-256. A shard counts as done only when its sidecar exists and the checksums match, so a
  run killed at any moment leaves complete shards or none, and a truncated or corrupt shard is
  found and regenerated on the next run.
- **Processes** (``torchrun``): rank 0 checks the output folder, then every rank takes the
  missing shards round-robin; after all ranks report, rank 0 merges the shards, in index order,
  into ``samples.npz``. Multi-node runs need ``out`` on a filesystem all nodes share.
- **Identity.** The manifest stores the resolved configuration that determines the samples
  (checkpoint checksums included). A rerun into the same folder with a different one is
  refused; the batch size, device, number of processes and number of samples may change
  (more samples extend the run; the shards already there are reused).

Files (``out/``): ``shards/shard-<i0>-<i1>.{npz,traj.npz,json}``; ``samples.npz``
(``arr_0`` uint8 NHWC with ADM's quantisation, ``arr_1`` int64 labels, the layout of
``np.savez(path, images, labels)``, written byte-reproducibly); ``manifest.json``;
``grid.png``; ``trajectory.json`` (:class:`fguide.diagnostics.TrajectoryRecorder`'s format,
merged over all shards and ranks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shlex
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from fguide.denoisers import ADMModel, VPAsEDM
from fguide.diagnostics import TrajectoryRecorder
from fguide.guidance import ClassifierGuide, GuidanceResult
from fguide.io.files import atomic_write, atomic_write_json, provenance, sha256_file
from fguide.io.images import to_uint8_nhwc
from fguide.models.loading import load_model, load_state_dict_file, matching_presets
from fguide.models.presets import (
    PRESETS,
    classifier_defaults,
    create_classifier,
    create_model,
    diffusion_defaults,
    model_defaults,
    parse_flag_string,
    preset_info,
    split_flags,
)
from fguide.models.resnet import ARCHS, INPUT_MODES, InputMode, load_resnet
from fguide.objectives import METHODS, Objective, objective
from fguide.runtime import import_module_spec, resolve_device
from fguide.samplers import NonFiniteGuidanceError, SampleNoise, StepRecord, ddim, ddpm, heun
from fguide.schedules import Process, betas_for, karras_sigmas, make_process

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "DEFAULT_TILT_GROUP",
    "Components",
    "ConfigMismatchError",
    "NonFiniteSamplesError",
    "SampleConfig",
    "SampleResult",
    "build_components",
    "parse_flags",
    "plan_shards",
    "resolve_config",
    "run_sampling",
    "sample_batch",
    "sample_labels",
]

SAMPLERS = ("ddpm", "ddim", "heun")
PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
DEFAULT_SHARD_SIZE = 256
"""Samples per shard: at most this much work is lost to a kill (per process)."""
DEFAULT_TILT_GROUP = 16
"""Samples per tilt group when tilting and no group size is given."""
_LABEL_STREAM = 0x4C41424C  # "LABL": the labels' generators differ from the noise's
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: equal runs give equal bytes
_FORMAT = "fguide-sample-run/1"


class ConfigMismatchError(ValueError):
    """The output folder holds a run with another configuration."""


class NonFiniteSamplesError(NonFiniteGuidanceError):
    """Non-finite guidance, naming the step and the global indices of the samples."""

    def __init__(self, step: int, t: float, samples: list[int], shard: tuple[int, int]):
        super().__init__(step, t, samples)
        shown = f"{samples[:16]}{' …' if len(samples) > 16 else ''}"
        self.args = (
            f"non-finite guidance gradient at sampling step {step} (t = {t:g}) for sample "
            f"indices {shown} (shard [{shard[0]}, {shard[1]})); lower --scale, check the "
            "classifier, or use a smoother one (--softplus-beta)",
        )


class DistributedRunError(RuntimeError):
    """Another process of a ``torchrun`` job failed; names the rank and its error."""


# -- configuration ---------------------------------------------------------------------------


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
    """Heun only: ``x`` (EluCD) or ``denoised``."""
    sampler: str = "ddpm"
    steps: str = "250"
    """Respacing (``250``, ``10,10,5``, ``ddim25``) for DDPM/DDIM; the number of steps for Heun."""
    eta: float | None = None
    clip_denoised: bool = True
    num_samples: int = 50000
    batch_size: int = 64
    seed: int = 0
    labels: str = "uniform"
    """``uniform`` (i.i.d. per sample), ``balanced`` (seeded permutations of the classes), or
    one class id."""
    precision: str = "fp32"
    """The diffusion UNet's torso dtype (``fp32``, ``fp16``, ``bf16``); classifiers run fp32."""
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
            k: (str(v) if isinstance(v, Path) else dict(v) if isinstance(v, Mapping) else v)
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


def _heun_scale(steps: int) -> float:
    # EluCD's maximum guidance G: 0.004 at 10 and 18 steps, 0.0018 at 36, 0.001 at 250.
    return 0.004 if steps <= 18 else 0.0018 if steps <= 36 else 0.001


def _is_adm_classifier(spec: str | None) -> bool:
    return spec == "adm" or (spec in PRESETS and PRESETS[spec].kind == "classifier")


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def resolve_config(cfg: SampleConfig) -> SampleConfig:
    """Validate ``cfg`` and fill its derived defaults; parameters that do not apply are None."""
    c = dataclasses.replace(
        cfg,
        out=Path(cfg.out),
        model=Path(cfg.model),
        classifier_weights=None if cfg.classifier_weights is None else Path(cfg.classifier_weights),
        model_flags=parse_flags(cfg.model_flags),
        classifier_flags=parse_flags(cfg.classifier_flags),
    )
    _check_positive_int("num_samples", c.num_samples)
    _check_positive_int("batch_size", c.batch_size)
    _check_positive_int("shard_size", c.shard_size)
    _check_positive_int("grid", c.grid, 0)
    if c.max_shards is not None:
        _check_positive_int("max_shards", c.max_shards)
    if c.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {c.sampler!r}")
    c.steps = str(c.steps).strip()
    if c.sampler == "heun":
        try:
            n_heun = int(c.steps)
        except ValueError:
            raise ValueError(f"steps: Heun takes a number of steps, got {c.steps!r}") from None
        if n_heun < 2:
            raise ValueError(f"steps: Heun needs at least 2 steps, got {n_heun}")
    if c.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {c.precision!r}")
    c.labels = str(c.labels).strip()
    if c.labels not in ("uniform", "balanced"):
        try:
            c.labels = str(int(c.labels))
        except ValueError:
            raise ValueError(
                f"labels must be 'uniform', 'balanced' or a class id; got {c.labels!r}"
            ) from None
    if c.method not in ("none", *METHODS) or c.method == "f":
        valid = ", ".join(m for m in ("none", *METHODS) if m != "f")
        raise ValueError(f"method must be one of {valid}; got {c.method!r}")
    if c.classifier_input_mode not in INPUT_MODES:
        raise ValueError(
            f"classifier_input_mode must be one of {', '.join(INPUT_MODES)}; "
            f"got {c.classifier_input_mode!r}"
        )
    if c.image_size is not None:
        _check_positive_int("image_size", c.image_size)

    guided = c.method != "none"
    adm_clf = _is_adm_classifier(c.classifier)
    if guided and c.classifier is None:
        raise ValueError(f"method {c.method!r} needs a classifier (--classifier)")
    if adm_clf and c.sampler == "heun":
        raise ValueError(
            "ADM's noise-aware classifier guides DDPM or DDIM on x_t; Heun guidance needs an "
            "x̂0 classifier (a ResNet or an import spec)"
        )
    if c.classifier is not None and c.classifier.startswith("resnet"):
        if c.classifier not in ARCHS:
            raise ValueError(f"classifier: unknown ResNet {c.classifier!r}; valid: {list(ARCHS)}")
        if c.softplus_beta is None:
            c.softplus_beta = 5.0 if c.sampler == "heun" else 3.0
        if c.softplus_beta < 0:
            raise ValueError(f"softplus_beta must be >= 0 (0 keeps ReLU); got {c.softplus_beta}")
    else:
        c.softplus_beta = None  # ResNets only (a config's β is dropped for other classifiers)
        if c.classifier_input_mode != "elucd" or c.classifier_resize is not None:
            raise ValueError(
                "classifier_input_mode and classifier_resize apply to ResNet classifiers only"
            )
    if c.sampler != "ddim":
        c.eta = None
    elif c.eta is None:
        c.eta = 0.0
    if c.sampler == "heun":
        c.clip_denoised = True  # unused by Heun; fixed so it never makes runs differ

    if not guided:
        for name in ("tau1", "tau2", "alpha", "eps", "lam_max", "lam_min", "lam_schedule"):
            setattr(c, name, None)
        c.entropy, c.t_tilt, c.tilt_group = False, None, None
        c.scale = c.sine_factor = c.variance_tracking = c.guidance_input = None
        return c

    c.tau1 = 1.0 if c.tau1 is None else float(c.tau1)
    if c.tau2 is None:
        c.tau2 = (
            c.tau1 if c.method == "logsoftmax" else 0.0 if c.sampler == "heun" else 0.5 * c.tau1
        )
    divergence = c.method in ("rkl", "fkl", "js", "hellinger")
    if divergence:
        c.alpha = (0.1 if c.method == "rkl" else 0.09) if c.alpha is None else c.alpha
        c.eps = 0.1 if c.eps is None else c.eps
    elif c.eps is not None:
        raise ValueError(f"eps is a divergence parameter; method {c.method!r} has no divergence")
    if c.entropy or c.method == "entropy":
        c.lam_max = 0.2 if c.lam_max is None else c.lam_max
        c.lam_min = 0.05 if c.lam_min is None else c.lam_min
        c.lam_schedule = c.lam_schedule or "linear"
    elif c.lam_max is not None or c.lam_min is not None or c.lam_schedule is not None:
        raise ValueError("lam_max, lam_min and lam_schedule need method 'entropy' or --entropy")
    if c.method == "tilted" and c.t_tilt is None:
        c.t_tilt = -0.2
    if c.t_tilt is not None:
        c.tilt_group = DEFAULT_TILT_GROUP if c.tilt_group is None else c.tilt_group
        _check_positive_int("tilt_group", c.tilt_group)
        if c.shard_size % c.tilt_group:
            raise ValueError(
                f"shard_size ({c.shard_size}) must be a multiple of tilt_group "
                f"({c.tilt_group}): tilt groups are fixed blocks of sample indices"
            )
    elif c.tilt_group is not None:
        raise ValueError("tilt_group needs tilting (method 'tilted' or --t-tilt)")
    if c.scale is None:
        if c.sampler == "heun":
            c.scale = _heun_scale(int(c.steps))
        elif adm_clf:
            # ADM's README scale for the diffusion model the classifier belongs to
            name = c.model_preset or str(c.classifier).replace("_classifier", "_diffusion")
            preset = PRESETS.get(name)
            c.scale = (preset.readme_classifier_scale if preset else None) or 1.0
        else:
            c.scale = 1.0
    if not math.isfinite(c.scale):
        raise ValueError(f"scale must be finite; got {c.scale}")
    if c.sampler == "ddim":
        c.sine_factor = None
    elif c.sine_factor is None:
        c.sine_factor = 0.0 if adm_clf else 0.3
    if c.sampler == "ddpm":
        c.variance_tracking = c.variance_tracking or "per_sample"
        if c.variance_tracking not in ("per_sample", "first_sample"):
            raise ValueError(
                f"variance_tracking must be per_sample or first_sample; got {c.variance_tracking!r}"
            )
    else:
        c.variance_tracking = None
    if c.sampler == "heun":
        c.guidance_input = c.guidance_input or "x"
        if c.guidance_input not in ("x", "denoised"):
            raise ValueError(f"guidance_input must be x or denoised; got {c.guidance_input!r}")
    else:
        c.guidance_input = None
    build_objective(c)  # validates τ, α, ε, λ, t_tilt with the objective's own messages
    return c


def build_objective(c: SampleConfig) -> Objective:
    """The :class:`~fguide.objectives.Objective` of a resolved, guided configuration."""
    assert c.tau1 is not None
    return objective(
        c.method,
        tau1=c.tau1,
        tau2=c.tau2,
        alpha=c.alpha,
        eps=0.1 if c.eps is None else c.eps,
        lam_max=0.2 if c.lam_max is None else c.lam_max,
        lam_min=0.05 if c.lam_min is None else c.lam_min,
        lam_schedule=c.lam_schedule or "linear",  # type: ignore[arg-type]
        entropy=c.entropy,
        t_tilt=c.t_tilt,
        group_size=c.tilt_group,
    )


# -- networks ----------------------------------------------------------------------------------


@dataclass
class Components:
    """The built networks and schedule of a run, on one device."""

    net: nn.Module
    model: ADMModel
    process: Process
    sigmas: Tensor | None
    denoiser: VPAsEDM | None
    classifier: nn.Module | None
    classifier_kind: str | None
    guide: ClassifierGuide | None
    image_size: int
    num_classes: int | None
    device: torch.device
    info: dict[str, Any]
    """Resolved model and classifier description (part of the run's identity)."""


def _resolve_device(device: str, local_rank: int) -> torch.device:
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


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


def _load_classifier(
    cfg: SampleConfig, device: torch.device, image_size: int
) -> tuple[nn.Module, str, dict[str, Any]]:
    """(classifier module, kind ``resnet``/``adm``/``import``, description)."""
    spec = cfg.classifier
    assert spec is not None
    weights = cfg.classifier_weights
    if weights is not None and not weights.is_file():
        raise FileNotFoundError(f"classifier_weights: file not found: {weights}")
    desc: dict[str, Any] = {"spec": spec}
    if spec in ARCHS:
        if weights is None:
            raise ValueError(f"classifier {spec}: give its weight file with --classifier-weights")
        beta = cfg.softplus_beta or None
        net: nn.Module = load_resnet(
            spec,
            weights,
            beta,
            cast(InputMode, cfg.classifier_input_mode),
            cfg.classifier_resize,
        )
        kind = "resnet"
        desc.update(
            softplus_beta=cfg.softplus_beta,
            input_mode=cfg.classifier_input_mode,
            resize=cfg.classifier_resize,
        )
    elif _is_adm_classifier(spec):
        if weights is None:
            raise ValueError(f"classifier {spec}: give its checkpoint with --classifier-weights")
        base = (
            dict(PRESETS[spec].flags)
            if spec != "adm"
            else {**classifier_defaults(), "image_size": image_size}
        )
        flags = {**base, **cfg.classifier_flags}
        if int(flags["image_size"]) != image_size:
            raise ValueError(
                f"image size: classifier {spec!r} takes {flags['image_size']}x"
                f"{flags['image_size']} images but the diffusion model makes "
                f"{image_size}x{image_size}"
            )
        if spec != "adm" and not cfg.classifier_flags:
            net = load_model(spec, weights)
        else:
            net = load_model(create_classifier(**flags), weights)
        kind = "adm"
        desc["flags"] = flags
    elif ":" in spec:
        net = import_module_spec(spec)
        if not isinstance(net, nn.Module):
            raise ValueError(f"classifier: {spec!r} must be or return a torch.nn.Module")
        if weights is not None:
            net = load_model(net, weights)
        kind = "import"
    else:
        raise ValueError(
            f"classifier: {spec!r} is none of {', '.join(ARCHS)}, an ADM classifier preset "
            f"({', '.join(p for p in PRESETS if PRESETS[p].kind == 'classifier')}), 'adm' or "
            "a 'module:function' import spec"
        )
    if cfg.classifier_flags and kind != "adm":
        raise ValueError("classifier_flags apply to ADM classifiers only")
    return net.to(device).float().eval().requires_grad_(False), kind, desc


def _probe_classes(clf: nn.Module, kind: str, spec: str, image_size: int, dev: torch.device) -> int:
    """Run the classifier once on a zero image: its class count, or a clear error."""
    x = torch.zeros(1, 3, image_size, image_size, device=dev)
    try:
        with torch.no_grad():
            out = clf(x, torch.zeros(1, device=dev, dtype=torch.long)) if kind == "adm" else clf(x)
    except Exception as err:  # any failure here means the classifier does not fit the images
        raise ValueError(
            f"classifier {spec!r} fails on a [1, 3, {image_size}, {image_size}] image batch "
            f"(the diffusion model's size): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"classifier {spec!r} must return logits [B, N]; got {shape}")
    return int(out.shape[1])


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

    classifier, kind, num_classes = None, None, 1000 if class_cond else None
    if cfg.classifier is not None:
        classifier, kind, desc = _load_classifier(cfg, dev, size)
        n_clf = _probe_classes(classifier, kind, cfg.classifier, size, dev)
        if class_cond and n_clf != num_classes:
            raise ValueError(
                f"classifier {cfg.classifier!r} has {n_clf} classes but the class-conditional "
                f"diffusion model has {num_classes}: the labels must mean the same classes"
            )
        num_classes = n_clf
        info["classifier"] = {**desc, "kind": kind, "num_classes": n_clf}
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
        adm = kind == "adm"
        guide = ClassifierGuide(
            classifier,
            build_objective(cfg),
            cfg.scale,
            input="xt" if adm else "x0",
            time_aware=adm,
        )
    return Components(
        net, model, process, sigmas, denoiser, classifier, kind, guide, size, num_classes, dev, info
    )


# -- samples ------------------------------------------------------------------------------------


def sample_labels(
    mode: str, seed: int, indices: Sequence[int], num_classes: int | None
) -> NDArray[np.int64] | None:
    """Labels of samples ``indices``: each a function of (mode, seed, index) alone.

    ``uniform``: i.i.d. uniform, from a generator seeded by (seed, i, label stream);
    ``balanced``: block b = i // N of N consecutive indices holds a seeded permutation of the
    N classes (class counts differ by at most one for any prefix of whole blocks);
    a class id: every sample. ``None`` when there are no classes (unconditional, unguided).
    """
    if num_classes is None:
        return None
    if mode == "uniform":
        out = [
            np.random.default_rng(np.random.SeedSequence([seed, i, _LABEL_STREAM])).integers(
                num_classes
            )
            for i in indices
        ]
        return np.asarray(out, dtype=np.int64).reshape(-1)
    if mode == "balanced":
        perms: dict[int, NDArray[np.int64]] = {}
        out = []
        for i in indices:
            b = i // num_classes
            if b not in perms:
                rng = np.random.default_rng(np.random.SeedSequence([seed, b, _LABEL_STREAM, 1]))
                perms[b] = rng.permutation(num_classes)
            out.append(perms[b][i % num_classes])
        return np.asarray(out, dtype=np.int64).reshape(-1)
    return np.full(len(indices), int(mode), dtype=np.int64)


def sample_batch(
    comp: Components,
    cfg: SampleConfig,
    indices: Sequence[int],
    labels: NDArray[np.int64] | Tensor | None,
    callback: Callable[[StepRecord], None] | None = None,
) -> Tensor:
    """Draw samples ``indices`` (x_0 in about [−1, 1], NCHW float32 on the run's device).

    Sample i's noise comes from :class:`~fguide.samplers.SampleNoise` seeded by (seed, i).
    """
    noise = SampleNoise(cfg.seed, indices)
    z = noise.initial((3, comp.image_size, comp.image_size), device=comp.device)
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long, device=comp.device)
    with torch.no_grad():  # guidance enables grad for its own classifier pass
        if cfg.sampler == "ddpm":
            return ddpm(
                comp.model,
                z,
                comp.process,
                labels=y,
                guide=comp.guide,
                noise=noise,
                callback=callback,
                clip_denoised=cfg.clip_denoised,
                sine_factor=cfg.sine_factor or 0.0,
                variance_tracking=cfg.variance_tracking or "per_sample",  # type: ignore[arg-type]
            )
        if cfg.sampler == "ddim":
            return ddim(
                comp.model,
                z,
                comp.process,
                labels=y,
                guide=comp.guide,
                noise=noise,
                callback=callback,
                clip_denoised=cfg.clip_denoised,
                eta=cfg.eta or 0.0,
            )
        assert comp.denoiser is not None and comp.sigmas is not None
        return heun(
            comp.denoiser,
            z,
            comp.sigmas,
            labels=y,
            guide=comp.guide,
            callback=callback,
            sine_factor=cfg.sine_factor or 0.0,
            guidance_input=cfg.guidance_input or "x",  # type: ignore[arg-type]
        )


def plan_shards(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """The shards [i0, i1) covering [0, num_samples): fixed blocks of ``shard_size``."""
    return [(i, min(i + shard_size, num_samples)) for i in range(0, num_samples, shard_size)]


# -- trajectory statistics (mergeable over batches, shards and ranks) -------------------------

TrajState = dict[str, NDArray[Any]]


def _recorder_state(rec: TrajectoryRecorder | None) -> TrajState:
    return rec.state() if rec is not None else {"steps": np.zeros(0, dtype=np.int64)}


def _merge_states(states: Iterable[TrajState]) -> TrajState:
    """Merge per-step statistics in the given order (so equal inputs give equal floats)."""
    merged: TrajectoryRecorder | None = None
    for s in states:
        if len(s["steps"]) == 0:
            continue
        rec = TrajectoryRecorder.from_state(s)
        if merged is None:
            merged = rec
        elif merged.steps != rec.steps:
            raise ValueError("trajectory statistics with different steps cannot be merged")
        else:
            merged.merge(rec)
    return _recorder_state(merged)


class _Kept:
    """Callback filter: passes the first ``keep`` samples of each record (drops tilt padding)."""

    def __init__(self, inner: Callable[[StepRecord], None], keep: int):
        self.inner, self.keep = inner, keep

    def __call__(self, rec: StepRecord) -> None:
        k = self.keep
        res = rec.guidance
        if res is not None:
            res = GuidanceResult(
                res.grad[:k],
                res.logits[:k],
                res.labels[:k],
                None if res.weights is None else res.weights[:k],
            )
        self.inner(dataclasses.replace(rec, t=rec.t[:k], x=rec.x[:k], x0=rec.x0[:k], guidance=res))


# -- files ---------------------------------------------------------------------------------------


def _npz_entry(
    zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterable[Any]
) -> None:
    """Write ``name.npy`` into ``zf`` from chunks (the rows of a C-order array), streaming."""
    info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    rows = 0
    with zf.open(info, "w", force_zip64=True) as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for chunk in chunks:
            arr = np.ascontiguousarray(chunk, dtype=dtype)
            rows += arr.shape[0] if arr.ndim else 1
            fh.write(arr.tobytes())
    if shape and rows != shape[0]:
        raise ValueError(f"{name}: wrote {rows} rows for an array of {shape[0]}")


def _write_npz(f: IO[bytes], arrays: Mapping[str, NDArray[Any]]) -> None:
    """``np.savez`` layout (stored zip of ``.npy`` files) with fixed timestamps."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            _npz_entry(zf, name, arr.shape, arr.dtype, [arr])


def _npz_bytes(arrays: Mapping[str, NDArray[Any]]) -> bytes:
    buf = io.BytesIO()
    _write_npz(buf, arrays)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> Any:
    """The JSON round trip of ``obj`` (tuples → lists, Paths → str), for comparisons."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _shard_name(i0: int, i1: int) -> str:
    return f"shard-{i0:08d}-{i1:08d}"


@dataclass
class _ShardFiles:
    npz: Path
    traj: Path
    side: Path

    @classmethod
    def of(cls, out: Path, i0: int, i1: int) -> _ShardFiles:
        d, name = out / "shards", _shard_name(i0, i1)
        return cls(d / f"{name}.npz", d / f"{name}.traj.npz", d / f"{name}.json")

    def remove(self) -> None:
        for p in (self.side, self.npz, self.traj):  # sidecar first: it is what marks "done"
            p.unlink(missing_ok=True)


def _shard_status(out: Path, i0: int, i1: int, identity_sha: str) -> tuple[str, str]:
    """(``ok`` | ``missing`` | ``corrupt``, reason) for shard [i0, i1)."""
    files = _ShardFiles.of(out, i0, i1)
    if not files.side.exists():
        leftover = files.npz.exists() or files.traj.exists()
        return (
            ("corrupt", "no sidecar (interrupted while written)") if leftover else ("missing", "")
        )
    try:
        side = json.loads(files.side.read_text())
    except (OSError, ValueError) as err:
        return "corrupt", f"unreadable sidecar ({err})"
    if side.get("identity_sha256") != identity_sha:
        raise ConfigMismatchError(
            f"{files.side} belongs to a run with another configuration "
            f"(identity {side.get('identity_sha256', '?')[:12]}…, this run "
            f"{identity_sha[:12]}…); use another output folder or delete that run"
        )
    if side.get("samples") != [i0, i1]:
        return "corrupt", f"sidecar range {side.get('samples')} != [{i0}, {i1}]"
    for path, key in ((files.npz, "sha256"), (files.traj, "trajectory_sha256")):
        if not path.is_file():
            return "corrupt", f"{path.name} missing"
        if sha256_file(path) != side.get(key):
            return "corrupt", f"{path.name}: checksum mismatch (truncated or modified)"
    return "ok", ""


def _write_shard(
    out: Path,
    i0: int,
    i1: int,
    images: NDArray[np.uint8],
    labels: NDArray[np.int64] | None,
    traj: TrajState,
    meta: dict[str, Any],
) -> dict[str, Any]:
    files = _ShardFiles.of(out, i0, i1)
    files.side.unlink(missing_ok=True)
    arrays: dict[str, NDArray[Any]] = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels
    data, tdata = _npz_bytes(arrays), _npz_bytes(traj)
    atomic_write(files.npz, lambda f: f.write(data))
    atomic_write(files.traj, lambda f: f.write(tdata))
    side = {
        "samples": [i0, i1],
        "count": i1 - i0,
        "file": files.npz.name,
        "sha256": _sha(data),
        "trajectory_file": files.traj.name,
        "trajectory_sha256": _sha(tdata),
        **meta,
    }
    atomic_write_json(files.side, side)  # last: the shard is complete once this exists
    return side


def _grid_png(images: NDArray[np.uint8], columns: int = 8) -> Callable[[IO[bytes]], None]:
    from PIL import Image

    n, h, w, _ = images.shape
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    canvas = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[k]
    return lambda f: Image.fromarray(canvas).save(f, format="PNG")


# -- distributed --------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False

    @classmethod
    def from_env(cls, device: str) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        owned = False
        if not dist.is_initialized():
            use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
            if use_cuda:
                torch.cuda.set_device(local % torch.cuda.device_count())
            dist.init_process_group("nccl" if use_cuda else "gloo")
            owned = True
        return cls(dist.get_rank(), dist.get_world_size(), local, owned)

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, err: BaseException | None) -> None:
        """Collective: raise on every rank if any rank failed (``err`` re-raised where it was)."""
        errors = self.all_gather(None if err is None else f"{type(err).__name__}: {err}")
        if err is not None:
            raise err
        for r, msg in enumerate(errors):
            if msg is not None:
                raise DistributedRunError(f"rank {r} failed: {msg}")

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _log(dist: _Dist, msg: str) -> None:
    if dist.rank == 0:
        print(f"fguide sample: {msg}", file=sys.stderr, flush=True)


# -- the run --------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    """What a run did. ``complete`` is False when it stopped early (``max_shards``)."""

    out: Path
    complete: bool
    num_samples: int
    shards: list[tuple[int, int]]
    generated: list[tuple[int, int]]
    """Shards generated by this run (all ranks), in index order."""
    regenerated: list[tuple[int, int]]
    """Shards found corrupt or incomplete and generated again."""
    samples: Path | None
    manifest: Path


def _identity(cfg: SampleConfig, comp: Components, hashes: Mapping[str, str | None]) -> dict:
    """What determines the samples: compared on every rerun into the same folder."""
    run_only = {
        "out", "model", "classifier_weights", "num_samples", "batch_size", "device", "grid",
        "max_shards", "progress", "config_name", "model_preset", "model_flags",
    }  # fmt: skip
    settings = {k: v for k, v in cfg.to_json().items() if k not in run_only}
    if cfg.variance_tracking == "first_sample":
        settings["batch_size"] = cfg.batch_size  # EluCD's σ²_max couples a batch
    return _canonical(
        {
            "format": _FORMAT,
            **settings,
            "resolved": comp.info,
            "num_classes": comp.num_classes,
            "image_size": comp.image_size,
            "model_sha256": hashes["model"],
            "classifier_weights_sha256": hashes.get("classifier"),
        }
    )


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _prepare(
    cfg: SampleConfig, identity: dict, plan: list[tuple[int, int]], dist: _Dist
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Rank 0: check the folder against ``identity``; return (to generate, corrupt) shards."""
    out = cfg.out
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError as err:
            raise ValueError(f"{manifest_path} is unreadable ({err}); remove it to go on") from None
        if old.get("format") != _FORMAT:
            raise ConfigMismatchError(f"{manifest_path} is not an fguide sample run manifest")
        if old.get("identity") != identity:
            changes = _diff(old.get("identity"), identity)
            raise ConfigMismatchError(
                f"{out} holds a run with a different configuration; refusing to mix samples. "
                f"Changed: {'; '.join(changes[:8])}{' …' if len(changes) > 8 else ''}. "
                "Rerun with the same settings to continue it, or use another --out."
            )
    shards_dir = out / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    leftovers = [*shards_dir.glob(".*.tmp")]  # temporary files of writes cut short by a kill
    for name in ("samples.npz", "manifest.json", "grid.png", "trajectory.json"):
        leftovers += out.glob(f".{name}.*.tmp")
    for tmp in leftovers:
        tmp.unlink(missing_ok=True)
    identity_sha = _sha(json.dumps(identity, sort_keys=True).encode())
    todo, corrupt = [], []
    for i0, i1 in plan:
        status, why = _shard_status(out, i0, i1, identity_sha)
        if status != "ok":
            if status == "corrupt":
                _log(dist, f"shard [{i0}, {i1}) is incomplete or corrupt ({why}); regenerating")
                corrupt.append((i0, i1))
            _ShardFiles.of(out, i0, i1).remove()
            todo.append((i0, i1))
    manifest = {
        "format": _FORMAT,
        "status": "running",
        "identity": identity,
        "identity_sha256": identity_sha,
        "config": cfg.to_json(),
        "provenance": provenance(world_size=dist.world),
    }
    atomic_write_json(manifest_path, manifest)
    return todo, corrupt


def _generate_shard(
    comp: Components, cfg: SampleConfig, i0: int, i1: int, on_batch: Callable[[int], None]
) -> tuple[NDArray[np.uint8], NDArray[np.int64] | None, TrajState]:
    group = cfg.tilt_group if cfg.t_tilt is not None else None
    end = i1 if group is None else -(-i1 // group) * group  # complete the last tilt group
    batch = cfg.batch_size if group is None else max(1, cfg.batch_size // group) * group
    labels = sample_labels(cfg.labels, cfg.seed, range(i0, end), comp.num_classes)
    record = comp.guide is not None or comp.classifier_kind in ("resnet", "import")
    images, states = [], []
    for b0 in range(i0, end, batch):
        idx = list(range(b0, min(b0 + batch, end)))
        keep = min(len(idx), i1 - b0)
        lab = None if labels is None else labels[b0 - i0 : b0 - i0 + len(idx)]
        rec = None
        callback: Callable[[StepRecord], None] | None = None
        if record and lab is not None:
            y_keep = torch.as_tensor(lab[:keep], device=comp.device)
            rec = (
                TrajectoryRecorder()
                if comp.guide is not None
                else TrajectoryRecorder(labels=y_keep, classifier=comp.classifier)
            )
            callback = rec if keep == len(idx) else _Kept(rec, keep)
        try:
            x = sample_batch(comp, cfg, idx, lab, callback)
        except NonFiniteGuidanceError as err:
            raise NonFiniteSamplesError(
                err.step, err.t, [idx[p] for p in err.samples], (i0, i1)
            ) from None
        except ValueError as err:  # e.g. non-finite logits: name the samples globally
            raise ValueError(
                f"{err} (in the batch of sample indices {idx[0]}..{idx[-1]}: batch position "
                f"p is sample {idx[0]} + p)"
            ) from None
        images.append(to_uint8_nhwc(x[:keep]))
        states.append(_recorder_state(rec))
        on_batch(keep)
    return (
        np.concatenate(images),
        None if labels is None else labels[: i1 - i0],
        _merge_states(states),
    )


def _finalize(
    cfg: SampleConfig,
    comp: Components,
    plan: list[tuple[int, int]],
    identity_sha: str,
    records: list[dict[str, Any]],
    dist: _Dist,
) -> tuple[bool, Path | None]:
    """Rank 0: merge complete shards into ``samples.npz``, the grid, trajectory and manifest."""
    out = cfg.out
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    sides = []
    for i0, i1 in plan:
        f = _ShardFiles.of(out, i0, i1)
        sides.append(json.loads(f.side.read_text()) if f.side.exists() else None)
    missing = [p for p, s in zip(plan, sides, strict=True) if s is None]
    by_range = {tuple(r["samples"]): r for r in records}
    shard_entries = [
        {
            "file": f"shards/{s['file']}",
            "samples": s["samples"],
            "sha256": s["sha256"],
            "trajectory_sha256": s["trajectory_sha256"],
            **{k: s.get(k) for k in ("rank", "world_size", "device", "batch_size", "seconds")},
            "generated_now": tuple(s["samples"]) in by_range,
        }
        for s in sides
        if s is not None
    ]
    manifest.update(num_samples=cfg.num_samples, shard_size=cfg.shard_size, shards=shard_entries)
    manifest["seeding"] = (
        f"sample i: noise from SeedSequence([{cfg.seed}, i]), label from "
        f"SeedSequence([{cfg.seed}, i, {_LABEL_STREAM}]) ('balanced': per block of "
        "num_classes indices); shard 'samples' [i0, i1) is its range of i"
    )
    if cfg.t_tilt is not None:
        manifest["tilt_groups"] = f"index blocks [j*{cfg.tilt_group}, (j+1)*{cfg.tilt_group})"
    if missing:
        manifest["status"] = "incomplete"
        manifest["missing_shards"] = [list(p) for p in missing]
        atomic_write_json(manifest_path, manifest)
        return False, None

    size = comp.image_size
    with_labels = comp.num_classes is not None
    labels: list[NDArray[np.int64]] = []
    first: list[NDArray[np.uint8]] = []
    states: list[TrajState] = []

    def image_chunks() -> Iterator[NDArray[np.uint8]]:
        shown = 0
        for (i0, i1), side in zip(plan, sides, strict=True):
            assert side is not None
            f = _ShardFiles.of(out, i0, i1)
            data, tdata = f.npz.read_bytes(), f.traj.read_bytes()
            if _sha(data) != side["sha256"] or _sha(tdata) != side["trajectory_sha256"]:
                raise ValueError(f"{f.npz}: checksum mismatch while merging; rerun to regenerate")
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                images = z["arr_0"]
                if with_labels:
                    labels.append(z["arr_1"])
            if images.shape != (i1 - i0, size, size, 3) or images.dtype != np.uint8:
                raise ValueError(f"{f.npz}: images {images.dtype} {images.shape} unexpected")
            with np.load(io.BytesIO(tdata), allow_pickle=False) as z:
                states.append({k: z[k] for k in z.files})
            if shown < cfg.grid:
                first.append(images[: cfg.grid - shown])
                shown += len(first[-1])
            yield images

    def write(fh: IO[bytes]) -> None:
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            shape = (cfg.num_samples, size, size, 3)
            _npz_entry(zf, "arr_0", shape, np.dtype(np.uint8), image_chunks())
            if with_labels:
                _npz_entry(zf, "arr_1", (cfg.num_samples,), np.dtype(np.int64), iter(labels))

    samples = atomic_write(out / "samples.npz", write)
    if first:
        atomic_write(out / "grid.png", _grid_png(np.concatenate(first)))
    traj = TrajectoryRecorder.from_state(_merge_states(states)).to_dict()
    traj["run"] = {
        "method": cfg.method,
        "config_name": cfg.config_name,
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "num_samples": cfg.num_samples,
        "identity_sha256": identity_sha,
    }
    atomic_write_json(out / "trajectory.json", traj)
    manifest.pop("missing_shards", None)
    manifest.update(
        status="complete",
        samples={
            "file": "samples.npz",
            "sha256": sha256_file(samples),
            "images": [cfg.num_samples, size, size, 3],
            "labels": with_labels,
        },
        grid="grid.png" if first else None,
        trajectory="trajectory.json",
    )
    atomic_write_json(manifest_path, manifest)
    return True, samples


def run_sampling(cfg: SampleConfig) -> SampleResult:
    """Run (or continue) the sampling run ``cfg`` describes; see the module docstring.

    Under ``torchrun`` every process calls this; it initialises ``torch.distributed`` (gloo on
    CPU, NCCL on CUDA) when needed and returns the same :class:`SampleResult` on every rank.
    """
    cfg = resolve_config(cfg)
    dist = _Dist.from_env(cfg.device)
    try:
        return _run(cfg, dist)
    finally:
        dist.close()


def _run(cfg: SampleConfig, dist: _Dist) -> SampleResult:
    comp: Components | None = None
    err: BaseException | None = None
    try:
        comp = build_components(cfg, _resolve_device(cfg.device, dist.local_rank))
    except Exception as e:  # every rank must learn of a failure, or the others would hang
        err = e
    dist.agree(err)
    assert comp is not None
    plan = plan_shards(cfg.num_samples, cfg.shard_size)

    payload: tuple[str, Any] = ("ok", None)
    if dist.rank == 0:
        try:
            hashes = {"model": sha256_file(cfg.model)}
            if cfg.classifier_weights is not None:
                hashes["classifier"] = sha256_file(cfg.classifier_weights)
            identity = _identity(cfg, comp, hashes)
            todo, corrupt = _prepare(cfg, identity, plan, dist)
            identity_sha = _sha(json.dumps(identity, sort_keys=True).encode())
            payload = ("ok", (todo, corrupt, identity_sha))
        except Exception as e:
            err = e
            payload = ("error", f"{type(e).__name__}: {e}")
    payload = dist.broadcast(payload)
    if err is not None:
        raise err
    if payload[0] == "error":
        raise DistributedRunError(f"rank 0 failed: {payload[1]}")
    todo, corrupt, identity_sha = payload[1]
    todo = [tuple(p) for p in todo]
    mine = todo[dist.rank :: dist.world]
    if cfg.max_shards is not None:
        mine = mine[: cfg.max_shards]
    _log(
        dist,
        f"{len(plan) - len(todo)} of {len(plan)} shards already complete; generating "
        f"{len(todo)} on {dist.world} process(es) into {cfg.out}",
    )
    if cfg.variance_tracking == "first_sample":
        _log(dist, "variance_tracking=first_sample couples each batch (EluCD's reference mode)")
    if comp.device.type == "cpu" and cfg.precision == "fp16":
        _log(dist, "fp16 convolutions are very slow on CPU; consider --precision fp32 or bf16")

    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    total = sum(i1 - i0 for i0, i1 in mine)
    bar = tqdm(
        total=total,
        unit="img",
        desc=f"sampling (rank 0 of {dist.world})" if dist.world > 1 else "sampling",
        disable=not cfg.progress or dist.rank != 0 or total == 0,
        file=sys.stderr,
    )
    err = None
    try:
        for i0, i1 in mine:
            t0 = time.perf_counter()
            images, labels, traj = _generate_shard(comp, cfg, i0, i1, bar.update)
            meta = {
                "identity_sha256": identity_sha,
                "rank": dist.rank,
                "world_size": dist.world,
                "device": str(comp.device),
                "batch_size": cfg.batch_size,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            records.append(_write_shard(cfg.out, i0, i1, images, labels, traj, meta))
    except Exception as e:
        err = e
    finally:
        bar.close()
    gathered = dist.all_gather((None if err is None else f"{type(err).__name__}: {err}", records))
    if err is not None:
        raise err
    for r, (msg, _) in enumerate(gathered):
        if msg is not None:
            raise DistributedRunError(f"rank {r} failed: {msg}")
    all_records = sorted((r for _, recs in gathered for r in recs), key=lambda r: r["samples"])

    outcome: tuple[str, Any] = ("ok", (False, None))
    if dist.rank == 0:
        try:
            outcome = ("ok", _finalize(cfg, comp, plan, identity_sha, all_records, dist))
        except Exception as e:
            err = e
            outcome = ("error", f"{type(e).__name__}: {e}")
    outcome = dist.broadcast(outcome)
    if err is not None:
        raise err
    if outcome[0] == "error":
        raise DistributedRunError(f"rank 0 failed while merging: {outcome[1]}")
    complete, samples = outcome[1]
    if not complete:
        _log(dist, "stopped before every shard was written; rerun the same command to continue")
    return SampleResult(
        out=cfg.out,
        complete=complete,
        num_samples=cfg.num_samples,
        shards=plan,
        generated=[(int(r["samples"][0]), int(r["samples"][1])) for r in all_records],
        regenerated=[(int(a), int(b)) for a, b in corrupt],
        samples=None if samples is None else Path(samples),
        manifest=cfg.out / "manifest.json",
    )
