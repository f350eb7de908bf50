"""The Stable Diffusion family: an SD 1.x/2.x or SDXL pipeline folder in the
``save_pretrained`` layout (:data:`~fguide.models.sd_folder.SD_LAYOUT`), read offline from
safetensors (:mod:`fguide.models.stable_diffusion`): text-to-image with classifier-free
guidance on per-sample prompts (sample i takes prompt i mod n), sampled by DDIM, DDPM or
DPM-Solver++(2M) as diffusers' schedulers of those names step, guided through the VAE decoder.

Every guide kind applies: a ``clip:`` head scores the generation prompts (or the guide prompts;
labels: sample i's prompt index), a ``reward:`` head its scalar, a classifier its classes
(``labels``) on the decoded image.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fguide import defaults
from fguide.accel import compile_model, precision_dtype, with_precision
from fguide.config import SampleConfig, build_objective
from fguide.families.base import Components, ModelFamily, attach_guide
from fguide.guides import find_guide_kind
from fguide.io.files import sha256_file
from fguide.models.clip import read_prompt_file
from fguide.models.sd_folder import sd_pipeline_files, sd_pipeline_kind
from fguide.models.sd_schedules import SD_SAMPLERS
from fguide.params import OwnedFields, ParamError

__all__ = ["StableDiffusionFamily"]


def _prompt_list(c: SampleConfig, prompts: str, prompt_file: str) -> tuple[str, ...] | None:
    """The prompts of fields ``prompts`` or ``prompt_file`` (the file read now: its lines, not
    its name, are part of the run's identity); None when neither is given."""
    given, file = getattr(c, prompts), getattr(c, prompt_file)
    if given and file is not None:
        raise ParamError("give {0} or {1}, not both", prompts, prompt_file)
    if file is not None:
        setattr(c, prompt_file, None)
        return tuple(read_prompt_file(file))
    if given is None:
        return None
    return tuple(str(p) for p in ([given] if isinstance(given, str) else given))


class StableDiffusionFamily(ModelFamily):
    """StableDiffusionPipeline / StableDiffusionXLPipeline folders."""

    name = "stable-diffusion"
    fields = OwnedFields(
        (
            "cfg_scale",
            "guidance_microbatch",
            "negative_prompt",
            "guide_prompts",
            "guide_prompt_file",
        ),
        "Stable Diffusion folders ({model} DIR)",
    )
    reads = ("prompts", "prompt_file")
    default_sampler = defaults.SD_SAMPLER
    samplers = tuple(SD_SAMPLERS)
    # the training-free methods take fguide's ddpm/ddim steps; SD's sampler (per-sample prompt
    # conditioning, CFG, its scheduler's targets) hosts EluCD's mean shift only (README)
    guidance_methods = ("elucd",)
    default_steps = defaults.SD_STEPS

    def claims(self, model: Path) -> bool:
        return sd_pipeline_kind(model) is not None

    def resolve(self, config: SampleConfig) -> None:
        """Prompts (required), guide prompts, CFG scale (the pipeline kind's default), a whole
        number of steps; what SD's schedulers decide is not a setting."""
        c = config
        prompts = _prompt_list(c, "prompts", "prompt_file")
        if not prompts:
            raise ParamError("{0}: no prompts given (a Stable Diffusion run needs {0} or {1})",
                             "prompts", "prompt_file")  # fmt: skip
        c.prompts = prompts
        c.guide_prompts = _prompt_list(c, "guide_prompts", "guide_prompt_file")
        kind = find_guide_kind(c.classifier)
        if c.guide_prompts is not None and (kind is None or not kind.prompt_classes):
            raise ParamError(
                "{0} applies to prompt guides ({1} clip:FOLDER)", "guide_prompts", "classifier"
            )
        if c.target is not None and kind is not None and not kind.prompt_classes:
            _target_as_class(c)
        if not (str(c.steps).strip().isdigit() and int(c.steps) >= 1):  # type: ignore[arg-type]
            raise ParamError(
                "{0}: Stable Diffusion takes a number of inference steps >= 1 (its scheduler "
                "spaces them); got {steps!r}",
                "steps",
                steps=c.steps,
            )
        c.steps = str(int(c.steps))  # type: ignore[arg-type]
        pipeline = sd_pipeline_kind(c.model) or "sd"
        c.cfg_scale = defaults.SD_CFG_SCALE[pipeline] if c.cfg_scale is None else float(c.cfg_scale)
        c.clip_denoised = True  # unused: the scheduler config's clip_sample decides (resolved)
        if c.variance_tracking == "first_sample":
            raise ParamError(
                "{0}: Stable Diffusion's DDPM tracks σ² per sample", "variance_tracking"
            )
        if c.method != "none" and c.classifier is not None and c.scale is None:
            raise ParamError(
                "{0}: give {0}, the guidance scale γ (no value is published for Stable "
                "Diffusion: choose it by a sweep on validation seeds)",
                "scale",
            )
        if c.method == "none" and c.guidance_microbatch is not None:
            raise ParamError("{0} needs a guided {1}", "guidance_microbatch", "method")

    def check_files(self, config: SampleConfig) -> None:
        from fguide.models.sd_folder import check_index

        check_index(Path(config.model))

    def build(self, config: SampleConfig, device: torch.device) -> Components:
        """The pipeline (UNet, VAE, text encoders), its schedule, the prompts encoded once, the
        guide through the decoder, and the per-batch sampler (:attr:`Components.sample_state`).

        ``precision`` is the UNet's, text encoders' and VAE's weight dtype (an SDXL VAE with
        ``force_upcast`` stays float32 in fp16); ``classifier_precision`` the autocast of the
        guidance's decoder and guide; ``channels_last`` converts UNet and VAE; ``compile``
        compiles the UNet.
        """
        from fguide.models.stable_diffusion import load_sd_pipeline

        sd = load_sd_pipeline(
            config.model, device, precision_dtype(config.precision), config.image_size
        )
        if config.channels_last:
            for module in (sd.unet, sd.decoder.vae):
                module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        assert config.prompts is not None and config.steps is not None
        schedule = sd.schedule(config.sampler or defaults.SD_SAMPLER, int(config.steps))
        info = {
            "family": self.name,
            **sd.info(),
            "scheduler_settings": schedule.settings,
            "timesteps": [int(k) for k in schedule.timesteps],
            "clip_sample": schedule.clip_denoised,
            "first_order_final": schedule.first_order_final,
        }
        comp = Components(
            sd.unet, None, schedule.process, None, None, None, None, sd.image_size, None,
            device, {"model": info},
        )  # fmt: skip
        _attach_sd_guide(config, comp)
        if config.compile:
            comp.compiled = compile_model(sd.unet)
            sd.unet = comp.compiled  # type: ignore[assignment]  # called like the module it wraps
        comp.state_shape, comp.clip_denoised = sd.state_shape, schedule.clip_denoised
        comp.to_image = lambda z: sd.to_image(z, config.guidance_microbatch)
        # statistics see what the guide sees: the decoded x̂0 clipped to [−1, 1]
        comp.x0_image = lambda z: sd.to_image(z, config.guidance_microbatch).clamp(-1, 1)
        comp.sample_state = _batch_sampler(config, comp, sd, schedule)
        return comp

    def files_sha256(self, model: Path) -> str:
        """SHA-256 over the files the pipeline loads: each one's relative name and contents."""
        h = hashlib.sha256()
        for f in sd_pipeline_files(model):
            h.update(f"{f.relative_to(model).as_posix()}:{sha256_file(f)}\n".encode())
        return h.hexdigest()


def _target_as_class(c: SampleConfig) -> None:
    """A classifier guide's ``--target``: the class id every sample is guided toward (as
    ``--labels N``)."""
    target = str(c.target).strip()
    if not target.isdigit():
        raise ParamError(
            "{0}: a classifier guide's target is a class id; got {t!r}", "target", t=c.target
        )
    if c.labels != "uniform":
        raise ParamError(
            "{0} fixes every sample's label: do not give {1} as well", "target", "labels"
        )
    c.labels, c.target = target, None


def _attach_sd_guide(config: SampleConfig, comp: Components) -> None:
    """The guide's classifier on the decoded image: a prompt-class guide (CLIP) gets the guide
    prompts, else the generation prompts, and labels i mod n (its prompt index) unless a target
    fixes them; other kinds get no prompts."""
    kind = find_guide_kind(config.classifier)
    if kind is None or not kind.prompt_classes:
        attach_guide(dataclasses.replace(config, prompts=None), comp, make_guide=False)
        return
    prompts = config.guide_prompts or config.prompts
    attach_guide(dataclasses.replace(config, prompts=prompts), comp, make_guide=False)
    if config.target is None:
        if config.labels != "uniform":
            raise ParamError(
                "{0}: a Stable Diffusion run's CLIP guide takes sample i's prompt i mod n "
                "(or one {1}); do not give {0}",
                "labels",
                "target",
            )
        comp.label_mode = "cyclic"


def _batch_sampler(
    config: SampleConfig, comp: Components, sd: Any, schedule: Any
) -> Callable[..., Tensor]:
    """The per-batch sampler: the batch's prompt rows (sample i: prompt i mod n) into the CFG
    ε-model; the prompts, the negative prompt, the schedule and the guide are built once."""
    from fguide.models.latent_guidance import MicrobatchGuide
    from fguide.models.stable_diffusion import SDSampling

    emb = sd.encode(list(config.prompts or ()))
    cfg = float(config.cfg_scale if config.cfg_scale is not None else 1.0)
    negative = sd.negative(config.negative_prompt, emb) if cfg != 1.0 else None
    guide = None
    if config.method != "none":
        assert comp.classifier is not None and comp.guide_kind is not None
        clf = sd.guidance_classifier(comp.classifier.module)
        guide = MicrobatchGuide(
            with_precision(clf, config.classifier_precision),  # type: ignore[arg-type]
            comp.guide_kind.objective(build_objective(config)),
            float(config.scale or 0.0),
            config.guidance_microbatch,
        )
    comp.guide = guide  # type: ignore[assignment]  # a Guide, as the pipelines family's

    def sample(
        z: Tensor,
        ids: Sequence[int],
        noise: Callable[[Tensor], Tensor],
        labels: Tensor | None,
        callback: Callable[..., None] | None,
    ) -> Tensor:
        s = SDSampling(
            model=sd.eps_model(sd.conditioning(emb, ids), negative, cfg),
            schedule=schedule,
            guide=guide,
            eta=float(config.eta or 0.0),
            sine_factor=float(config.sine_factor or 0.0),
            to_image=comp.to_image or sd.to_image,
        )
        return s.sample(z, labels=labels, noise=noise, callback=callback)

    return sample
