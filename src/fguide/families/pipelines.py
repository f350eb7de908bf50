"""The diffusers family: a pipeline folder in the ``save_pretrained`` layout (DiT with
classifier-free guidance in a VAE's latent space, or a pixel ``UNet2DModel``), read offline
from safetensors (:mod:`fguide.models.hf_diffusers`), guided by EluCD's Algorithm 3 or the DDPM
mean shift through the decoder (:mod:`fguide.models.latent_guidance`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fguide.accel import compile_model, precision_dtype, with_precision
from fguide.config import SampleConfig, build_guidance_method, build_objective
from fguide.families.base import Components, ModelFamily, attach_guide
from fguide.io.files import sha256_file
from fguide.models.dit_network import check_dit_network
from fguide.params import OwnedFields, ParamError, check_choice

if TYPE_CHECKING:
    from fguide.models.hf_diffusers import PipelineModel

__all__ = ["PipelineFamily", "is_dit_pipeline"]


def is_dit_pipeline(path: Path) -> bool:
    """True when a pipeline folder's ``model_index.json`` names a ``transformer`` (DiT); an
    unreadable index counts as DiT here (the loader then says what is wrong with it)."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return True
    return not isinstance(index, dict) or "transformer" in index


class PipelineFamily(ModelFamily):
    """diffusers pipeline folders (a ``model_index.json``)."""

    name = "diffusers"
    fields = OwnedFields(
        ("cfg_scale", "cfg_channels", "dit_network", "guidance_form", "guidance_microbatch"),
        "diffusers pipeline folders ({model} DIR)",
    )

    def claims(self, model: Path) -> bool:
        """A folder with a ``model_index.json`` that is not a Stable Diffusion pipeline's."""
        from fguide.models.sd_folder import sd_pipeline_kind

        return (
            model.is_dir()
            and (model / "model_index.json").is_file()
            and sd_pipeline_kind(model) is None
        )

    def resolve(self, config: SampleConfig) -> None:
        """DDPM/DDIM only; CFG scale 1; DiT's own network; Algorithm 3 with an explicit G."""
        if config.sampler == "heun":
            raise ParamError("{0}: diffusers pipelines are sampled with ddpm or ddim", "sampler")
        config.cfg_scale = 1.0 if config.cfg_scale is None else float(config.cfg_scale)
        config.clip_denoised = True  # unused: the pipeline's scheduler decides (resolved info)
        if is_dit_pipeline(config.model):
            config.dit_network = check_dit_network(config.dit_network or "dit")
        elif config.dit_network is not None:
            raise ParamError(
                "{0} applies to DiT pipelines (a transformer component)", "dit_network"
            )
        if config.method == "none":
            if config.guidance_form is not None or config.guidance_microbatch is not None:
                raise ParamError(
                    "{0} and {1} need a guided {2}",
                    "guidance_form",
                    "guidance_microbatch",
                    "method",
                )
            return
        if config.guidance_method != "elucd":
            _refuse_elucd_forms(config)
            return
        config.guidance_form = config.guidance_form or "algorithm3"
        check_choice("guidance_form", config.guidance_form, ("algorithm3", "mean"))
        if config.guidance_form == "algorithm3" and config.scale is None:
            raise ParamError(
                "{0}: give {0}, the maximum guidance G of EluCD's Algorithm 3 (EluCD does not "
                "publish its DiT value; choose it by a sweep on a validation seed)",
                "scale",
            )

    def build(self, config: SampleConfig, device: torch.device) -> Components:
        """The pipeline's network, decoder and schedule, with its guide: EluCD's Algorithm 3 or
        the DDPM mean shift through the decoder.

        ``precision`` casts the denoising network's weights (diffusers' ``torch_dtype``; its
        inputs are cast to them and its outputs back to float32); the guidance's decoder and
        classifier run under autocast in ``classifier_precision``; the final decode stays
        float32. ``channels_last`` converts the convolutional networks (UNet2DModel, the VAE);
        ``compile`` compiles the denoising network.
        """
        from fguide.models.hf_diffusers import load_pipeline_model
        from fguide.models.latent_guidance import build_pipeline_sampling

        pm = load_pipeline_model(config.model, device=device)
        if config.precision != "fp32":
            pm.net.to(precision_dtype(config.precision))
        if config.channels_last:
            for module in ([pm.net] if pm.kind == "unet" else []) + (
                [pm.decoder.vae] if pm.decoder is not None else []
            ):
                module.to(memory_format=torch.channels_last)
        info = {"model": {"family": self.name, **pm.info()}}
        comp = Components(
            pm.net, None, None, None, None, None, None, pm.image_size, pm.num_classes, device, info
        )
        attach_guide(config, comp, make_guide=False)
        if pm.decoder is not None:  # statistics see the decoded x̂0, as a guide does
            comp.x0_image = lambda z: pm.to_image(z, config.guidance_microbatch).clamp(-1, 1)
        if config.compile:
            comp.compiled = compile_model(pm.net)
            pm.net = comp.compiled  # type: ignore[assignment]  # called like the module it wraps
        guided = config.method != "none"
        assert comp.classifier is not None or not guided
        if guided and config.guidance_method != "elucd":
            return _with_method(config, comp, pm)
        s = build_pipeline_sampling(
            pm,
            respacing=str(config.steps),
            cfg_scale=config.cfg_scale if config.cfg_scale is not None else 1.0,
            cfg_channels=config.cfg_channels,
            classifier=comp.classifier.module if guided else None,  # type: ignore[union-attr]
            objective=build_objective(config) if guided else None,
            scale=config.scale or 0.0,
            guidance=config.guidance_form or "algorithm3",  # type: ignore[arg-type]
            sine_factor=config.sine_factor or 0.0,
            microbatch=config.guidance_microbatch,
            classifier_precision=config.classifier_precision,  # type: ignore[arg-type]
        )
        comp.model, comp.process, comp.guide = s.model, s.process, s.guide
        comp.state_shape, comp.to_image = s.state_shape, s.to_image
        comp.clip_denoised = s.clip_denoised
        return comp

    def files_sha256(self, model: Path) -> str:
        """SHA-256 over the folder's files: each one's relative name and contents."""
        from fguide.models.hf_diffusers import pipeline_files

        h = hashlib.sha256()
        for f in pipeline_files(model):
            h.update(f"{f.relative_to(model).as_posix()}:{sha256_file(f)}\n".encode())
        return h.hexdigest()


# -- the training-free family (issue 21) ---------------------------------------------------------


def _refuse_elucd_forms(config: SampleConfig) -> None:
    """A training-free method replaces EluCD's guidance forms; its gradients go through the
    ε-network, which the classifier pass's micro-batching does not split."""
    if config.guidance_form is not None:
        raise ParamError(
            "{0} applies to {1} elucd: a training-free method ({v!r}) replaces EluCD's "
            "Algorithm 3 and mean shift",
            "guidance_form",
            "guidance_method",
            v=config.guidance_method,
        )
    if config.guidance_microbatch is not None:
        raise ParamError(
            "{0} applies to {1} elucd: a training-free method ({v!r}) differentiates through "
            "the denoising network, which micro-batching the classifier pass does not bound",
            "guidance_microbatch",
            "guidance_method",
            v=config.guidance_method,
        )


def _with_method(config: SampleConfig, comp: Components, pm: PipelineModel) -> Components:
    """The pipeline's unguided sampling parts (CFG for DiT) with a training-free method as the
    guide: its classifier sees the decoded x̂0 (C∘clip∘Dec, under ``classifier_precision``), so
    the through-denoiser methods differentiate the CFG network and the decoder."""
    from fguide.models.latent_guidance import build_pipeline_sampling

    assert comp.classifier is not None
    s = build_pipeline_sampling(
        pm,
        respacing=str(config.steps),
        cfg_scale=config.cfg_scale if config.cfg_scale is not None else 1.0,
        cfg_channels=config.cfg_channels,
    )
    clf = with_precision(
        pm.guidance_classifier(comp.classifier.module),
        config.classifier_precision,  # type: ignore[arg-type]
    )
    comp.guide = build_guidance_method(config, clf)
    comp.model, comp.process = s.model, s.process
    comp.state_shape, comp.to_image = s.state_shape, s.to_image
    comp.clip_denoised = s.clip_denoised
    return comp
