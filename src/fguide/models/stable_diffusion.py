"""Stable Diffusion pipelines (SD 1.x/2.x and SDXL) as fguide models: a UNet2DConditionModel
with classifier-free guidance on per-sample text conditioning, sampled by fguide's DDIM, DDPM
and DPM-Solver++(2M), and guided through the VAE decoder.

A folder in the layout ``StableDiffusionPipeline.save_pretrained`` or
``StableDiffusionXLPipeline.save_pretrained`` writes is read offline and from safetensors only
(pickled ``.bin`` weights are refused, as for DiT; :mod:`fguide.models.sd_folder`); the safety
checker and feature extractor are not used.

Conventions (METHODS.md notation; z the latent state, ẑ0 its clean estimate):

- **Text**: :mod:`fguide.models.sd_text` (as the pipelines' ``encode_prompt``); sample i takes
  prompt i mod n (:meth:`SDModel.conditioning`).
- **CFG**: ε = ε_u + s (ε_c − ε_u), ε_u on the negative prompt's conditioning, both from one
  UNet call on the doubled batch (unconditional half first), as the pipelines compute it.
  ``v_prediction`` UNets (SD 2.x 768): ε = √ᾱ_k v + √(1 − ᾱ_k) z after CFG on v.
- **Samplers**: :mod:`fguide.models.sd_schedules` (timesteps and targets as diffusers'
  schedulers); DDIM and DDPM are :func:`fguide.ddim` / :func:`fguide.ddpm`, DPM-Solver++(2M)
  :func:`fguide.samplers_dpm.dpmpp_2m`.
- **Guidance** (:func:`build_sd_sampling`): g = ∇_{ẑ0} S(C(clip(Dec(ẑ0))), y) at ẑ0 of the
  CFG ε, by one vector-Jacobian product through guide and decoder
  (:class:`~fguide.models.hf_diffusers.DecodedClassifier`, micro-batched by
  :class:`~fguide.models.latent_guidance.MicrobatchGuide`); DDIM and DPM-Solver shift the score,
  ε̃ = ε − √(1 − ᾱ_t) γ g; DDPM shifts the mean, μ' = μ + (Σ + a_t) γ g.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fguide import defaults
from fguide.accel import Precision, param_dtype, with_precision
from fguide.guidance import ClassifierFn
from fguide.models import hf_diffusers as hd
from fguide.models.latent_guidance import MicrobatchGuide
from fguide.models.sd_folder import (
    SD_LAYOUT,
    SDKind,
    check_index,
    check_unet,
    latent_size,
    load_text_encoder,
    load_tokenizer,
    load_vae,
    scheduler_config,
    sd_pipeline_files,
    sd_pipeline_kind,
)
from fguide.models.sd_schedules import SDSchedule, sd_schedule
from fguide.models.sd_text import PromptEmbeds, PromptEncoder
from fguide.objectives import Objective
from fguide.samplers import ddim, ddpm
from fguide.samplers_dpm import dpmpp_2m

__all__ = [
    "SD_LAYOUT",
    "SDEps",
    "SDModel",
    "SDSampling",
    "build_sd_sampling",
    "load_sd_pipeline",
    "sd_pipeline_files",
    "sd_pipeline_kind",
]

# -- the ε-model -----------------------------------------------------------------------------------


class SDEps:
    """A ``UNet2DConditionModel`` as an EpsModel with classifier-free guidance.

    ``cond`` holds one conditioning row per sample of the batch the sampler runs (labels are
    not read: they are the guide's targets), ``uncond`` one row (the negative prompt, for all
    samples) or one per sample. ε = ε_u + s (ε_c − ε_u) from one call on the doubled batch;
    s = 1 (or no ``uncond``) runs the conditional half only. ``alphas_cumprod`` (training ᾱ)
    turns a v-prediction into ε. The input is cast to the UNet's dtype and the output back.
    """

    def __init__(
        self,
        unet: nn.Module,
        cond: PromptEmbeds,
        uncond: PromptEmbeds | None = None,
        cfg_scale: float = 1.0,
        alphas_cumprod: np.ndarray | None = None,
    ):
        if not np.isfinite(cfg_scale):
            raise ValueError(f"--cfg-scale must be finite; got {cfg_scale}")
        if cfg_scale != 1.0 and uncond is None:
            raise ValueError(
                "classifier-free guidance (--cfg-scale != 1) needs the unconditional "
                "(negative prompt) conditioning"
            )
        self.net, self.cond, self.uncond, self.cfg_scale = unet, cond, uncond, float(cfg_scale)
        self._abar = (
            None if alphas_cumprod is None else torch.from_numpy(np.asarray(alphas_cumprod))
        )
        self._abar_on: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # copied once

    def _unet(self, x: Tensor, t: Tensor, emb: PromptEmbeds) -> Tensor:
        dt = param_dtype(self.net, x.dtype)
        kw = emb.to(x.device, dt).unet_kwargs()
        return self.net(x.to(dt), t, **kw).sample.to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        b = len(x)
        if len(self.cond) != b:
            raise ValueError(f"the conditioning has {len(self.cond)} rows for a batch of {b}")
        if self.cfg_scale == 1.0 or self.uncond is None:
            out = self._unet(x, t, self.cond)
        else:
            u = self.uncond if len(self.uncond) == b else self.uncond.rows([0] * b)
            both = self._unet(
                torch.cat([x, x]), torch.cat([t, t]), PromptEmbeds.cat([u, self.cond])
            )
            eps_u, eps_c = both.chunk(2)
            out = eps_u + self.cfg_scale * (eps_c - eps_u)
        if self._abar is None:
            return out
        table = self._abar_on.get((x.device, x.dtype))
        if table is None:
            table = self._abar_on[(x.device, x.dtype)] = self._abar.to(x.device, x.dtype)
        abar = table[t.long()].reshape(-1, *([1] * (x.ndim - 1)))
        return abar.sqrt() * out + (1 - abar).sqrt() * x  # ε from v


# -- the loaded pipeline ---------------------------------------------------------------------------


@dataclass
class SDModel:
    """A loaded SD/SDXL pipeline folder: UNet, VAE decoder, prompt encoder, training betas."""

    kind: SDKind
    unet: nn.Module
    decoder: hd.LatentDecoder
    text: PromptEncoder
    betas: np.ndarray
    scheduler_config: dict[str, Any]
    prediction_type: str
    state_shape: tuple[int, int, int]
    image_size: int
    path: str = ""
    configs: dict[str, Any] = field(default_factory=dict, repr=False)

    def encode(self, prompts: Sequence[str] | str, what: str = "--prompt") -> PromptEmbeds:
        """One conditioning row per prompt (see :mod:`fguide.models.sd_text`)."""
        return self.text.encode(prompts, what)

    def negative(self, negative_prompt: str | None, like: PromptEmbeds) -> PromptEmbeds:
        """The unconditional row: the negative prompt, "" or SDXL's zeros."""
        return self.text.encode_negative(negative_prompt, like)

    @staticmethod
    def conditioning(prompts: PromptEmbeds, sample_ids: Sequence[int] | Tensor) -> PromptEmbeds:
        """The rows of samples ``sample_ids``: sample i takes prompt i mod n."""
        ids = torch.as_tensor(sample_ids, dtype=torch.long)
        return prompts.rows(ids % len(prompts))

    def eps_model(
        self, cond: PromptEmbeds, uncond: PromptEmbeds | None = None, cfg_scale: float = 1.0
    ) -> SDEps:
        abar = np.cumprod(1.0 - self.betas) if self.prediction_type == "v_prediction" else None
        return SDEps(self.unet, cond, uncond, cfg_scale, abar)

    def schedule(
        self, sampler: str, steps: int, overrides: dict[str, Any] | None = None
    ) -> SDSchedule:
        """Timesteps and process of ``sampler`` as the folder's scheduler config configures
        diffusers' scheduler of that name (:mod:`fguide.models.sd_schedules`)."""
        where = f"{self.path}/scheduler/scheduler_config.json"
        return sd_schedule(self.betas, self.scheduler_config, sampler, steps, overrides, where)

    def guidance_classifier(
        self, classifier: ClassifierFn, clip: hd.ClipMode = "straight_through"
    ) -> hd.DecodedClassifier:
        """C∘clip∘Dec: the guide seen as a function of the latent x̂0."""
        return hd.DecodedClassifier(self.decoder, classifier, clip)

    def to_image(self, z: Tensor, microbatch: int | None = None) -> Tensor:
        """Final latents → images in about [−1, 1]."""
        return self.decoder.decode(z, microbatch)

    def info(self) -> dict[str, Any]:
        """JSON-able description for manifests."""
        return {
            "kind": self.kind,
            "path": self.path,
            "state_shape": list(self.state_shape),
            "image_size": self.image_size,
            "prediction_type": self.prediction_type,
            "num_train_steps": len(self.betas),
            "scaling_factor": self.decoder.scaling_factor,
            "configs": self.configs,
        }


def load_sd_pipeline(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
) -> SDModel:
    """Load an SD 1.x/2.x or SDXL pipeline folder (:data:`SD_LAYOUT`) offline.

    ``image_size`` (default: the UNet's ``sample_size`` × the VAE's factor, as the pipelines'
    default height and width) fixes the latent shape and SDXL's time ids. An SDXL VAE with
    ``force_upcast`` stays in float32 when ``dtype`` is float16, as the pipeline upcasts it.
    """
    root = Path(path)
    kind, index = check_index(root)
    sched, betas, pred = scheduler_config(root)
    dev = torch.device(device)
    import diffusers  # deferred: importing diffusers takes seconds
    import transformers

    unet = hd.load_component(diffusers.UNet2DConditionModel, root, "unet", dev, dtype)
    vae = load_vae(diffusers.AutoencoderKL, root, dev, dtype)
    encoders = [load_text_encoder(transformers.CLIPTextModel, root, "text_encoder", dev, dtype)]
    tokenizers = [load_tokenizer(root, "tokenizer")]
    if kind == "sdxl":
        cls2 = transformers.CLIPTextModelWithProjection
        encoders.append(load_text_encoder(cls2, root, "text_encoder_2", dev, dtype))
        tokenizers.append(load_tokenizer(root, "tokenizer_2"))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = latent_size(unet, vae, factor, image_size, root)
    check_unet(unet, vae, encoders, kind, root)
    text = PromptEncoder(
        kind,
        tokenizers,
        encoders,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        time_ids=(latent * factor, latent * factor, 0, 0, latent * factor, latent * factor),
    )
    configs = {"model_index": index, "scheduler": sched, "unet": dict(unet.config)}
    configs["vae"] = dict(vae.config)
    return SDModel(
        kind=kind,
        unet=unet,
        decoder=hd.LatentDecoder(vae),
        text=text,
        betas=betas,
        scheduler_config=sched,
        prediction_type=pred,
        state_shape=(int(unet.config.in_channels), latent, latent),
        image_size=latent * factor,
        path=str(root),
        configs=hd.jsonable(configs),
    )


# -- one call for the sampling command -----------------------------------------------------------


@dataclass
class SDSampling:
    """A configured SD sampler: :meth:`sample` runs it, :attr:`to_image` decodes."""

    model: SDEps
    schedule: SDSchedule
    guide: Any
    eta: float
    sine_factor: float
    to_image: Callable[[Tensor], Tensor]

    def sample(
        self,
        z: Tensor,
        *,
        labels: Tensor | None = None,
        noise: Callable[[Tensor], Tensor] | None = None,
        callback: Callable[[Any], None] | None = None,
    ) -> Tensor:
        """The final latents from z (standard normal, the state's shape)."""
        s = self.schedule
        common: dict[str, Any] = dict(
            labels=labels, guide=self.guide, noise=noise, callback=callback
        )
        if s.sampler == "ddim":
            return ddim(
                self.model, z, s.process, clip_denoised=s.clip_denoised, eta=self.eta, **common
            )
        if s.sampler == "ddpm":
            return ddpm(
                self.model,
                z,
                s.process,
                clip_denoised=s.clip_denoised,
                sine_factor=self.sine_factor,
                **common,
            )
        return dpmpp_2m(self.model, z, s.process, first_order_final=s.first_order_final, **common)


def build_sd_sampling(
    sd: SDModel,
    cond: PromptEmbeds,
    *,
    sampler: str = "dpmpp-2m",
    steps: int = 50,
    cfg_scale: float = 7.5,
    negative: PromptEmbeds | None = None,
    eta: float = defaults.ETA,
    scheduler_overrides: dict[str, Any] | None = None,
    classifier: ClassifierFn | None = None,
    objective: Objective | None = None,
    scale: float = 1.0,
    sine_factor: float = defaults.SINE_FACTOR,
    microbatch: int | None = None,
    clip: hd.ClipMode = "straight_through",
    classifier_precision: Precision = "fp32",
) -> SDSampling:
    """The sampler, CFG model and guide for one batch whose conditioning rows are ``cond``
    (:meth:`SDModel.conditioning`); ``negative`` the unconditional row (default: ""/zeros).

    With a ``classifier`` (any image classifier on [−1, 1] images, a CLIP head, a reward head)
    and an ``objective``: g through C∘clip∘Dec at x̂0 of the CFG ε, γ = ``scale``,
    ``microbatch`` samples per backward, ``classifier_precision`` autocast for decoder and
    guide (module docstring for how each sampler applies g; DDPM's sine boost a_t uses
    ``sine_factor``)."""
    if cfg_scale != 1.0 and negative is None:
        negative = sd.negative(None, cond)
    model = sd.eps_model(cond, negative, cfg_scale)
    guide = None
    if classifier is not None:
        if objective is None:
            raise ValueError("objective is required with a classifier")
        clf = with_precision(sd.guidance_classifier(classifier, clip), classifier_precision)
        guide = MicrobatchGuide(clf, objective, scale, microbatch)
    return SDSampling(
        model=model,
        schedule=sd.schedule(sampler, steps, scheduler_overrides),
        guide=guide,
        eta=float(eta),
        sine_factor=float(sine_factor),
        to_image=lambda z: sd.to_image(z, microbatch),
    )
