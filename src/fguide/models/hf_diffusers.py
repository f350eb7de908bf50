"""diffusers pipelines as fguide models: DiT with classifier-free guidance in a VAE's latent space,
unconditional (or class-conditional) ``UNet2DModel`` pixel models, latent classifier guidance
through the VAE decoder, and EluCD's Algorithm 3 (CFG + off-the-shelf classifier guidance).

diffusers supplies the networks (``DiTTransformer2DModel``, ``AutoencoderKL``, ``UNet2DModel``);
fguide supplies the schedule, the samplers, the guidance objectives and the diagnostics. A
pipeline folder in the ``save_pretrained`` layout (``model_index.json`` and one subfolder per
component) is read offline (``local_files_only``) and from safetensors only (never pickles).

Conventions (METHODS.md notation; z the latent state, ẑ0 its clean estimate):

- **DiT output** is [ε, v] (2C channels, ADM's ``learned_range``): log Σ = frac · log β_t +
  (1 − frac) · log β̃_t with frac = (v + 1)/2, as the DiT reference (ADM's diffusion code) reads
  it. ``DiTPipeline`` instead drops v and uses its scheduler's fixed variance; fguide samples as
  the DiT reference does (learned variance, ADM respacing, ``clip_denoised=False``).
- **DiT network**: computed as DiT's own code does (its timestep features and LayerNorm eps;
  ``dit_network="diffusers"`` keeps diffusers' own: :mod:`fguide.models.dit_network`).
- **CFG**: ε = ε_u + s (ε_c − ε_u) with ε_c = ε(z, t, y), ε_u = ε(z, t, ∅), ∅ the null class
  (index ``num_embeds_ada_norm``); v is the conditional half's. diffusers guides every latent
  channel; the DiT reference guides channels 0..2 only (``cfg_channels=3``).
- **Decoding**: x = Dec(z / scaling_factor (+ shift_factor)), an image in about [−1, 1].
- **Latent guidance**: g = ∇_{ẑ0} S(C(Dec(ẑ0)), y): the classifier C sees the decoded image
  clipped to [−1, 1] (the gradient passes the clip unchanged, as EluCD's gradient with respect to
  the clipped x̂0 does), then one vector-Jacobian product through classifier and decoder.
- **Algorithm 3** (EluCD's CFG + classifier guidance), micro-batched guidance passes and the
  sampler's parts of a pipeline (:func:`~fguide.models.latent_guidance.build_pipeline_sampling`)
  live in :mod:`fguide.models.latent_guidance`, which imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from fguide.accel import param_dtype
from fguide.guidance import ClassifierFn
from fguide.models.dit_network import check_dit_network, set_dit_network
from fguide.models.hf_files import (
    SCHEDULER_RULES,
    check_diffusers_component,
    check_fields,
    read_json_object,
)
from fguide.schedules import Process, VarianceType, betas_for, process_from_betas

__all__ = [
    "ELUCD_DIT_XL2_256",
    "DecodedClassifier",
    "DiTEps",
    "LatentDecoder",
    "PipelineModel",
    "UNetEps",
    "is_pipeline_dir",
    "jsonable",
    "load_component",
    "load_pipeline_model",
    "pipeline_files",
    "process_from_betas",
    "read_pipeline_json",
    "scheduler_betas",
]

ClipMode = Literal["straight_through", "clamp", "none"]


ELUCD_DIT_XL2_256: dict[str, Any] = {
    # DiT's own FID-50K setting (DiT paper; facebookresearch/DiT sample_ddp.py): FID 2.27
    "model": "facebook/DiT-XL-2-256 (diffusers layout, safetensors), VAE sd-vae-ft-ema",
    "respacing": "250",
    "cfg_scale": 1.5,
    "cfg_channels": 3,  # DiT guides ε's first three latent channels "for exact reproducibility"
    "clip_denoised": False,
    "variance": "learned_range",
    # EluCD Table 9: + off-the-shelf ResNet-101 → FID 2.12. EluCD's DiT code and its DiT
    # hyper-parameters are not public (its README: "will release ... soon"); the values below
    # are EluCD's DDPM ones (Softplus 3, τ1 1, τ2 0.5, γ_sine 0.3), carried over as fguide's
    # reading, and G has no published value: sweep it on a validation seed.
    "classifier": "resnet101",
    "softplus_beta": 3.0,
    "tau1": 1.0,
    "tau2": 0.5,
    "sine_factor": 0.3,
    "guidance": "algorithm3",
    "scale": None,
    "fid_reference": {"cfg_only": 2.27, "elucd_resnet101": 2.12, "samples": 50000},
}
"""fguide's configuration for EluCD's Table 9 row (which values are EluCD's: see the comments)."""


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# -- schedules ----------------------------------------------------------------------------------


def scheduler_betas(config: dict[str, Any], where: str = "scheduler config") -> np.ndarray:
    """β_1..β_T (float64) of a diffusers scheduler config, the way the model was trained.

    ``linear``: linspace(β_start, β_end, T) (equal to ADM's linear schedule for the DiT and DDPM
    defaults 1e−4, 0.02, T = 1000); ``scaled_linear``: linspace(√β_start, √β_end, T)²;
    ``squaredcos_cap_v2``: the cosine schedule of METHODS.md §1 (β capped at 0.999);
    ``trained_betas``: as given. diffusers builds these in float32; fguide keeps float64 like
    ADM. Anything else (and ε-free parameterisations, thresholding, zero-terminal-SNR rescaling,
    a clip range other than 1) is refused with the key that causes it.
    """
    check_fields(config, SCHEDULER_RULES, where)
    t = int(config.get("num_train_timesteps", 1000))
    pred = config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise ValueError(f"{where}: prediction_type {pred!r} is not supported (only 'epsilon')")
    for key in ("thresholding", "rescale_betas_zero_snr"):
        if config.get(key):
            raise ValueError(f"{where}: {key}=true is not supported")
    if float(config.get("clip_sample_range", 1.0)) != 1.0:
        raise ValueError(f"{where}: clip_sample_range must be 1.0 (fguide clips x̂0 to [-1, 1])")
    if config.get("trained_betas") is not None:
        given = config["trained_betas"]
        if not (isinstance(given, list) and len(given) == t and all(_num(b) for b in given)):
            raise ValueError(f"{where}: trained_betas must be a list of {t} numbers")
        betas = np.asarray(given, dtype=np.float64)
    else:
        kind = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if kind == "linear":
            betas = np.linspace(start, end, t, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, t, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = betas_for("cosine", t)
        else:
            raise ValueError(
                f"{where}: beta_schedule {kind!r} is not supported "
                "(linear, scaled_linear, squaredcos_cap_v2 or trained_betas)"
            )
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"{where}: betas must lie in (0, 1)")
    return betas


# -- networks as EpsModels ----------------------------------------------------------------------


class DiTEps:
    """A ``DiTTransformer2DModel`` as an EpsModel, with classifier-free guidance.

    Returns [ε, v]: ε = ε_u + s (ε_c − ε_u) on the first ``cfg_channels`` channels (all when
    None; the DiT reference uses 3) and ε_c elsewhere, v the conditional v. s = 1 runs the
    conditional pass only. The input is cast to the network's dtype and the output back.
    """

    def __init__(
        self,
        net: Any,
        null_class: int,
        cfg_scale: float = 1.0,
        cfg_channels: int | None = None,
    ):
        if not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be finite; got {cfg_scale}")
        c = int(net.config.in_channels)
        if cfg_channels is not None and not 1 <= cfg_channels <= c:
            raise ValueError(f"cfg_channels must lie in [1, {c}]; got {cfg_channels}")
        self.net, self.null_class = net, int(null_class)
        self.cfg_scale, self.cfg_channels, self.channels = float(cfg_scale), cfg_channels, c

    def raw(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """The network's output for (x, t, labels), in x's dtype."""
        dt = param_dtype(self.net, x.dtype)
        out = self.net(x.to(dt), timestep=t, class_labels=labels).sample
        return out.to(x.dtype)

    def cond_uncond(self, x: Tensor, t: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(ε_c with v_c, ε_u with v_u) from one network call on the doubled batch."""
        null = torch.full_like(labels, self.null_class)
        out = self.raw(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        return out[: len(x)], out[len(x) :]

    def combine(self, cond: Tensor, uncond: Tensor) -> Tensor:
        """[ε_u + s(ε_c − ε_u) on the guided channels, ε_c on the others, v_c]."""
        k = self.channels if self.cfg_channels is None else self.cfg_channels
        guided = uncond[:, :k] + self.cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            raise ValueError("the DiT model is class-conditional: labels are required")
        if self.cfg_scale == 1.0:
            return self.raw(x, t, labels)
        return self.combine(*self.cond_uncond(x, t, labels))


class UNetEps:
    """A ``UNet2DModel`` as an EpsModel (labels only when the network has class embeddings)."""

    def __init__(self, net: Any):
        self.net = net
        self.class_cond = getattr(net.config, "num_class_embeds", None) is not None

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        dt = param_dtype(self.net, x.dtype)
        if self.class_cond:
            if labels is None:
                raise ValueError("the UNet2DModel is class-conditional: labels are required")
            return self.net(x.to(dt), t, class_labels=labels).sample.to(x.dtype)
        return self.net(x.to(dt), t).sample.to(x.dtype)


# -- the decoder and the classifier on decoded latents ------------------------------------------


class LatentDecoder(nn.Module):
    """x = Dec(z / scaling_factor + shift_factor): an ``AutoencoderKL``'s decoder on latents."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = None if shift is None else float(shift)

    def forward(self, z: Tensor) -> Tensor:
        dt = param_dtype(self.vae, z.dtype)
        # (1 / s) * z, not z / s: DiTPipeline's rounding, so that parity is exact
        lat = 1 / self.scaling_factor * z.to(dt)
        if self.shift_factor is not None:
            lat = lat + self.shift_factor
        vae: Any = self.vae  # a diffusers AutoencoderKL
        return vae.decode(lat).sample.to(z.dtype)

    @torch.no_grad()
    def decode(self, z: Tensor, microbatch: int | None = None) -> Tensor:
        """Dec of a batch of final latents, ``microbatch`` at a time (no gradient)."""
        step = microbatch or len(z)
        return torch.cat([self(z[s : s + step]) for s in range(0, len(z), step)])


def _clip(x: Tensor, mode: ClipMode) -> Tensor:
    if mode == "none":
        return x
    if mode == "clamp":
        return x.clamp(-1, 1)
    # forward: the clipped image; backward: identity (∂S/∂x at the clipped image, pulled back)
    return x + (x.clamp(-1, 1) - x).detach()


class DecodedClassifier(nn.Module):
    """f(ẑ0) = C(clip(Dec(ẑ0))): an image classifier seen as a classifier of latents.

    ``fguide.guidance_gradient(DecodedClassifier(decoder, clf), ẑ0, y, objective)`` is
    ∇_{ẑ0} S(C(Dec(ẑ0)), y) by one backward pass through classifier and decoder. ``clip``:
    ``"straight_through"`` (default; C sees the image clipped to [−1, 1], the gradient passes
    the clip unchanged), ``"clamp"`` (zero gradient where clipped) or ``"none"``.
    """

    def __init__(
        self, decoder: LatentDecoder, classifier: ClassifierFn, clip: ClipMode = "straight_through"
    ):
        super().__init__()
        if clip not in ("straight_through", "clamp", "none"):
            raise ValueError(f"clip must be straight_through, clamp or none; got {clip!r}")
        self.decoder, self.clip = decoder, clip
        # a plain callable is kept out of the module tree (it need not be an nn.Module)
        self._classifier = [classifier]

    @property
    def classifier(self) -> ClassifierFn:
        return self._classifier[0]

    def forward(self, z: Tensor) -> Tensor:
        x = _clip(self.decoder(z), self.clip)
        clf = self.classifier
        if isinstance(clf, nn.Module):
            x = x.to(param_dtype(clf, x.dtype))
        return clf(x)


# -- pipeline folders ---------------------------------------------------------------------------


def is_pipeline_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder with a ``model_index.json`` (a diffusers pipeline)."""
    return (Path(path) / "model_index.json").is_file()


def pipeline_files(path: str | Path) -> list[Path]:
    """The files that define a pipeline folder's model (configs and safetensors weights), sorted:
    what a run's identity should checksum."""
    root = Path(path)
    files = [root / "model_index.json"]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files += sorted(f for f in sub.iterdir() if f.suffix in (".json", ".safetensors"))
    return files


def read_pipeline_json(path: Path) -> dict[str, Any]:
    """A pipeline folder's JSON file (``model_index.json``, a component's config), checked
    and bounded as :func:`fguide.models.hf_files.read_json_object` does."""
    what = f"the {path.stem} of a diffusers pipeline folder"
    return read_json_object(path, what, exempt=("trained_betas",))


def load_component(cls: Any, root: Path, sub: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The diffusers component ``root/sub`` (a ``cls``: transformer, UNet, VAE), offline, from
    safetensors only, its config and weights checked first; eval mode, no gradients."""
    folder = root / sub
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{folder}: no .safetensors weights (fguide never loads pickled .bin files; convert "
            "them with safetensors first)"
        )
    check_diffusers_component(cls, folder)  # config values, weight keys and shapes, first
    try:
        net = cls.from_pretrained(
            root,
            subfolder=sub,
            local_files_only=True,
            use_safetensors=True,
            torch_dtype=dtype,
            low_cpu_mem_usage=False,  # no `accelerate` needed
        )
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(f"{folder}: diffusers cannot load it ({reason})") from err
    return net.to(device=device).eval().requires_grad_(False)


@dataclass
class PipelineModel:
    """A loaded diffusers pipeline folder: the network, the VAE decoder (latent models), the
    training betas and what fguide needs to sample it."""

    kind: Literal["dit", "unet"]
    net: nn.Module
    betas: np.ndarray
    state_shape: tuple[int, int, int]
    """(C, H, W) of the sampler state (latents for DiT, pixels for UNet2DModel)."""
    image_size: int
    variance_type: VarianceType
    clip_denoised: bool
    num_classes: int | None
    decoder: LatentDecoder | None = None
    null_class: int | None = None
    path: str = ""
    configs: dict[str, Any] = field(default_factory=dict, repr=False)
    dit_network: str | None = None
    """DiT: ``dit`` (computes as DiT's own code) or ``diffusers`` (:mod:`.dit_network`)."""

    def process(self, respacing: str = "") -> Process:
        """The ADM-respaced process (``"250"`` is DiT's sampling setting)."""
        return process_from_betas(self.betas, respacing, self.variance_type)

    def eps_model(
        self, cfg_scale: float = 1.0, cfg_channels: int | None = None
    ) -> DiTEps | UNetEps:
        """The EpsModel: DiT with CFG scale s (1 = conditional only) or the UNet."""
        if self.kind == "unet":
            if cfg_scale != 1.0:
                raise ValueError(f"cfg_scale applies to DiT pipelines only; {self.path} is a UNet")
            return UNetEps(self.net)
        assert self.null_class is not None
        return DiTEps(self.net, self.null_class, cfg_scale, cfg_channels)

    def guidance_classifier(
        self, classifier: ClassifierFn, clip: ClipMode = "straight_through"
    ) -> ClassifierFn:
        """The classifier on the sampler's x̂0: C∘clip∘Dec for latent models, C for pixel ones."""
        if self.decoder is None:
            return classifier
        return DecodedClassifier(self.decoder, classifier, clip)

    def to_image(self, x: Tensor, microbatch: int | None = None) -> Tensor:
        """Final state → image in about [−1, 1] (decoded for latent models)."""
        return x if self.decoder is None else self.decoder.decode(x, microbatch)

    def info(self) -> dict[str, Any]:
        """JSON-able description for manifests."""
        return {
            "kind": self.kind,
            "path": self.path,
            "state_shape": list(self.state_shape),
            "image_size": self.image_size,
            "variance_type": self.variance_type,
            "clip_denoised": self.clip_denoised,
            "num_classes": self.num_classes,
            "null_class": self.null_class,
            "num_train_steps": len(self.betas),
            "dit_network": self.dit_network,
            "scaling_factor": None if self.decoder is None else self.decoder.scaling_factor,
            "configs": self.configs,
        }


def load_pipeline_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    dit_network: str = "dit",
) -> PipelineModel:
    """Load a diffusers pipeline folder (``DiTPipeline`` or ``DDPMPipeline`` layout) offline.

    DiT (``transformer/``, ``vae/``, ``scheduler/``): a ``DiTTransformer2DModel`` whose output
    is [ε, v] when out_channels = 2 × in_channels (``learned_range``), class-conditional with
    the null class ``num_embeds_ada_norm``, an ``AutoencoderKL`` decoder, ``clip_denoised``
    False (latents are not in [−1, 1]); ``dit_network`` ``"dit"`` (default) makes the network
    compute as DiT's own code, ``"diffusers"`` keeps diffusers' (:mod:`.dit_network`).
    UNet (``unet/``, ``scheduler/``): a ``UNet2DModel``; its variance is learned when
    out_channels = 2 × in_channels, else the scheduler's
    ``variance_type`` (fixed_small, fixed_large); ``clip_denoised`` is the scheduler's
    ``clip_sample``. The betas come from ``scheduler/scheduler_config.json``
    (:func:`scheduler_betas`).
    """
    check_dit_network(dit_network)
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model: pipeline folder not found: {root}")
    if not is_pipeline_dir(root):
        raise ValueError(f"model: {root} has no model_index.json (not a diffusers pipeline folder)")
    index = read_pipeline_json(root / "model_index.json")
    sched_file = root / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise FileNotFoundError(f"{sched_file}: missing (the betas are read from it)")
    sched = read_pipeline_json(sched_file)
    betas = scheduler_betas(sched, str(sched_file))
    dev = torch.device(device)
    configs: dict[str, Any] = {"model_index": index, "scheduler": sched}
    import diffusers  # deferred: importing diffusers takes seconds

    if "transformer" in index:
        net = load_component(diffusers.DiTTransformer2DModel, root, "transformer", dev, dtype)
        set_dit_network(net, dit_network)
        if "vae" not in index:
            raise ValueError(f"{root}: a DiT pipeline needs a vae/ component")
        vae = load_component(diffusers.AutoencoderKL, root, "vae", dev, dtype)
        net_config = net.config
        c, size = int(net_config.in_channels), int(net_config.sample_size)
        out_c = int(net_config.out_channels or c)
        if out_c not in (c, 2 * c):
            raise ValueError(f"{root}/transformer: out_channels {out_c} is neither {c} nor {2 * c}")
        if int(vae.config.latent_channels) != c:
            raise ValueError(
                f"{root}: the VAE has {vae.config.latent_channels} latent channels, the "
                f"transformer {c}"
            )
        num_classes = int(net_config.num_embeds_ada_norm)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        configs.update(transformer=dict(net_config), vae=dict(vae.config))
        return PipelineModel(
            kind="dit",
            net=net,
            betas=betas,
            state_shape=(c, size, size),
            image_size=size * factor,
            variance_type="learned_range" if out_c == 2 * c else _fixed_variance(sched, sched_file),
            clip_denoised=False,
            num_classes=num_classes,
            decoder=LatentDecoder(vae),
            null_class=num_classes,
            path=str(root),
            configs=jsonable(configs),
            dit_network=dit_network,
        )
    if "unet" in index:
        net = load_component(diffusers.UNet2DModel, root, "unet", dev, dtype)
        net_config = net.config
        c = int(net_config.in_channels)
        size = net_config.sample_size
        if not isinstance(size, int):  # [h, w] (checked by check_diffusers_component)
            if len(set(size)) != 1:
                raise ValueError(f"{root}/unet: non-square sample_size {size} is not supported")
            size = int(size[0])
        out_c = int(net_config.out_channels)
        if out_c not in (c, 2 * c):
            raise ValueError(f"{root}/unet: out_channels {out_c} is neither {c} nor {2 * c}")
        n_cls = getattr(net_config, "num_class_embeds", None)
        configs.update(unet=dict(net_config))
        return PipelineModel(
            kind="unet",
            net=net,
            betas=betas,
            state_shape=(c, size, size),
            image_size=size,
            variance_type="learned_range" if out_c == 2 * c else _fixed_variance(sched, sched_file),
            clip_denoised=bool(sched.get("clip_sample", True)),
            num_classes=None if n_cls is None else int(n_cls),
            path=str(root),
            configs=jsonable(configs),
        )
    raise ValueError(
        f"{root}/model_index.json: neither a 'transformer' (DiT) nor a 'unet' component"
    )


def _fixed_variance(sched: dict[str, Any], where: Path) -> VarianceType:
    v = sched.get("variance_type", "fixed_small")
    mapping: dict[str, VarianceType] = {
        "fixed_small": "fixed_small",
        "fixed_small_log": "fixed_small",
        "fixed_large": "fixed_large",
    }
    if v not in mapping:
        raise ValueError(
            f"{where}: variance_type {v!r} is not supported for a model without learned variance "
            "(fixed_small, fixed_small_log, fixed_large)"
        )
    return mapping[v]


def jsonable(obj: Any) -> Any:
    """``obj`` with only JSON types (dicts with string keys, lists, scalars), for manifests."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
