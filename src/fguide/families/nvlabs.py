"""The NVlabs family: an EDM network pickle (``edm-imagenet-64x64-cond-adm.pkl``), read without
running the code embedded in it (:mod:`fguide.models.nvlabs`), sampled by Heun on EDM's σ grid."""

from __future__ import annotations

from pathlib import Path

import torch

from fguide.accel import compile_model, to_channels_last
from fguide.config import SampleConfig
from fguide.denoisers import Denoiser
from fguide.families.base import Components, ModelFamily, attach_guide, karras_grid
from fguide.models.edm import EDMDenoiser
from fguide.models.loading import is_network_pickle
from fguide.models.nvlabs import load_network_pickle
from fguide.params import ParamError

__all__ = ["NVlabsFamily"]


class NVlabsFamily(ModelFamily):
    """EDM's ``EDMPrecond`` networks from NVlabs pickles (Heun by default)."""

    name = "nvlabs"
    default_sampler = "heun"

    def claims(self, model: Path) -> bool:
        return model.is_file() and is_network_pickle(model)

    def build(self, config: SampleConfig, device: torch.device) -> Components:
        """The EDM denoiser (eval mode, no gradients), its σ grid, and the guide."""
        if config.sampler != "heun":
            raise ParamError(
                "{0}: EDM networks are sampled with heun, not {s!r}", "sampler", s=config.sampler
            )
        if config.precision == "bf16":
            raise ParamError(
                "{0}: EDM networks run in fp32 or fp16 (as EDM does), not bf16", "precision"
            )
        net, info = load_network_pickle(config.model)  # eval mode, no gradients
        net = net.to(device)
        net.use_fp16 = config.precision == "fp16"  # EDM: the UNet body in fp16 on CUDA only
        # The whole preconditioned denoiser is compiled: c_in, c_skip, c_out fuse with the UNet.
        compiled = compile_model(net) if config.compile else None
        den_net = EDMDenoiser(net, compiled)
        den: Denoiser = to_channels_last(den_net, net) if config.channels_last else den_net
        kwargs = info["init_kwargs"]
        size, label_dim = int(kwargs["img_resolution"]), int(kwargs.get("label_dim", 0))
        if config.image_size is not None and config.image_size != size:
            raise ParamError(
                "{0}: {given} does not match the EDM network's {size}",
                "image_size",
                given=config.image_size,
                size=size,
            )
        sigmas, sigma_range = karras_grid(config, den_net.sigma_min, den_net.sigma_max)
        desc = {"family": self.name, **{k: v for k, v in info.items() if k != "other_objects"}}
        desc["sigma_range"] = sigma_range
        comp = Components(
            net, None, None, sigmas, den, None, None, size, label_dim or None, device,
            {"model": desc},
        )  # fmt: skip
        comp.compiled = compiled
        return attach_guide(config, comp)
