"""What the samplers call, and adapters that turn networks into it (METHODS.md §1).

- :data:`EpsModel`, :data:`Denoiser`, :data:`NoiseFn`: the model-facing types of the samplers.
- :class:`ADMModel`: an ADM UNet as an :data:`EpsModel` (labels only when the
  network is class-conditional).
- :class:`VPAsEDM`: a VP ε-model as an EDM denoiser D(x, σ) = x − σ ε(x/sqrt(1+σ²), t(σ)),
  with t(σ) interpolated in log σ over the discrete training steps (k-diffusion's discrete-ε
  wrapper).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

EpsModel = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""ADM-style network: (x_t, model timestep, labels) → ε (C channels) or [ε, v] (2C channels)."""
Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""EDM-style denoiser: (x, σ per sample, labels) → D(x, σ), the estimate of the clean sample."""
NoiseFn = Callable[[Tensor], Tensor]
"""Returns a standard-normal draw shaped like its argument."""


class ADMModel:
    """Calls ``net(x, t, y)`` when the network is class-conditional, else ``net(x, t)``."""

    def __init__(self, net: nn.Module, class_cond: bool | None = None):
        self.net = net
        self.class_cond = (
            getattr(net, "num_classes", None) is not None if class_cond is None else class_cond
        )

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        if self.class_cond:
            if labels is None:
                raise ValueError("the diffusion model is class-conditional: labels are required")
            return self.net(x, t, labels)
        return self.net(x, t)


def vp_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_k = sqrt((1 − ᾱ_k)/ᾱ_k) of the training steps."""
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


class VPAsEDM:
    """An ε-prediction VP model seen as an EDM denoiser D(x, σ).

    x_t = x / sqrt(1 + σ²), D = x − σ ε_θ(x_t, t(σ)), t(σ) the fractional training step whose
    log σ interpolates linearly between its neighbours.
    """

    def __init__(self, model: EpsModel, alphas_cumprod: np.ndarray):
        self.model = model
        self.log_sigmas = torch.from_numpy(np.log(vp_sigmas(alphas_cumprod)))
        self._on_device: dict[torch.device, Tensor] = {}

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional training timestep whose σ is ``sigma`` (clamped to the trained range)."""
        ls = self._on_device.get(sigma.device)
        if ls is None:  # cached: no host-to-device copy per call
            ls = self._on_device[sigma.device] = self.log_sigmas.to(sigma.device)
        log_s = sigma.double().log().clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, log_s).clamp(1, len(ls) - 1)
        lo = hi - 1
        w = (log_s - ls[lo]) / (ls[hi] - ls[lo])
        return (lo + w).to(sigma.dtype)

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
        eps = self.model(x / torch.sqrt(1 + s**2), self.sigma_to_t(sigma), labels)
        return x - s * eps[:, : x.shape[1]]
