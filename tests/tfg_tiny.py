"""Tiny deterministic networks for the training-free-guidance references (issue 21).

``tests/reference/generate_tfg_reference.py`` drives TFG's own guidance code
(YWolfeee/Training-Free-Guidance) with these networks and stores the results in
``tests/reference/tfg_reference.pt``; tests rebuild the same networks here from the stored
seeds. Everything is float64; weights follow the fixtures' rule (:func:`fixture_init`: a
generator seeded by crc32(parameter name) + seed), so the reference file stores seeds, not
weights, plus a fingerprint (:func:`fingerprint`) that tells a test at once if the rebuilt
weights differ from the generator's.

- :class:`TinyEps`: an ε-prediction network on 3×8×8 images. It is the exact posterior-mean
  ε of a Gaussian prior N(0, s² I) under the linear-β VP process (so that x̂0 stays O(s) and the
  [−1, 1] clip is only partly active at the middle steps) plus a small time-modulated
  convolutional residual (so that the Jacobian ∂x̂0/∂x_t is not diagonal and DPS-type methods
  differentiate a real network). Called as ``net(x, t)`` (TFG: a 0-d timestep) or
  ``net(x, t, labels)`` (fguide's ``EpsModel``: one timestep per sample); labels are ignored.
- :class:`TinyClassifier`: two stride-2 convolutions with Softplus, mean pooling and a linear
  head to :data:`NUM_CLASSES` logits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from fixture_utils import fixture_init
from torch import Tensor, nn

IMAGE_SHAPE = (3, 8, 8)
NUM_CLASSES = 5
TRAIN_STEPS = 1000
PRIOR_STD = 0.5
"""s: the standard deviation of the Gaussian prior whose exact ε is TinyEps's skip term."""
RESIDUAL_SCALE = 0.3
"""Weight of TinyEps's convolutional residual."""
LOGIT_SCALE = 10.0
"""TinyClassifier's logit multiplier: fixture-init weights alone give an almost flat classifier
(|∇ log p| ~ 0.04 per pixel), too weak for the guidance terms to stand out in a reference."""


def linear_alphas_cumprod(num_steps: int = TRAIN_STEPS) -> np.ndarray:
    """ᾱ_k of ADM's linear β schedule (β from 1e-4·1000/T to 0.02·1000/T), float64."""
    scale = 1000 / num_steps
    betas = np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def _timesteps(t: Tensor | int, batch: int) -> Tensor:
    """One integer training timestep per sample from a 0-d, 1-element or [B] input."""
    t = torch.as_tensor(t).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


class TinyEps(nn.Module):
    """ε(x, t) = sqrt(1 − ᾱ) x / (ᾱ s² + 1 − ᾱ) + r · conv(x, t): Gaussian-prior ε + residual."""

    def __init__(self, width: int = 8, emb: int = 8):
        super().__init__()
        c = IMAGE_SHAPE[0]
        self.emb = emb
        self.conv_in = nn.Conv2d(c, width, 3, padding=1)
        self.time = nn.Linear(emb, 2 * width)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, c, 3, padding=1)
        self.register_buffer(
            "alphas_cumprod", torch.from_numpy(linear_alphas_cumprod()), persistent=False
        )

    def embedding(self, t: Tensor) -> Tensor:
        """Sinusoidal features of t/T, [B, emb]."""
        half = self.emb // 2
        freqs = torch.exp(-math.log(100.0) * torch.arange(half, dtype=torch.float64) / half)
        arg = (t.double() / TRAIN_STEPS)[:, None] * freqs[None] * 2 * math.pi
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)

    def forward(self, x: Tensor, t: Tensor | int, labels: Tensor | None = None) -> Tensor:
        steps = _timesteps(t, x.shape[0]).to(x.device)
        abar = self.alphas_cumprod.to(x)[steps.long()].reshape(-1, 1, 1, 1)
        prior = torch.sqrt(1 - abar) * x / (abar * PRIOR_STD**2 + 1 - abar)
        scale, shift = self.time(self.embedding(steps).to(x)).chunk(2, dim=1)
        h = nn.functional.silu(self.conv_in(x))
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = nn.functional.silu(self.conv_mid(h))
        return prior + RESIDUAL_SCALE * self.conv_out(h)


class TinyClassifier(nn.Module):
    """Logits [B, NUM_CLASSES] of a 3×8×8 image: conv(s2) → Softplus → conv(s2) → Softplus →
    mean → linear, times :data:`LOGIT_SCALE`."""

    def __init__(self, width: int = 6):
        super().__init__()
        c = IMAGE_SHAPE[0]
        self.conv1 = nn.Conv2d(c, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.softplus(self.conv1(x))
        h = nn.functional.softplus(self.conv2(h))
        return LOGIT_SCALE * self.head(h.mean(dim=(2, 3)))


def _init(module: nn.Module, seed: int) -> nn.Module:
    """Fixture-init every parameter (float64), eval mode, no parameter gradients."""
    module = module.double()
    module.load_state_dict(
        {k: fixture_init(k, tuple(v.shape), seed) for k, v in module.state_dict().items()}
    )
    module.eval().requires_grad_(False)
    return module


def eps_net(seed: int) -> TinyEps:
    """The ε-network with fixture-init weights from ``seed``."""
    net = _init(TinyEps(), seed)
    assert isinstance(net, TinyEps)
    return net


def classifier(seed: int) -> TinyClassifier:
    """The classifier with fixture-init weights from ``seed``."""
    net = _init(TinyClassifier(), seed)
    assert isinstance(net, TinyClassifier)
    return net


def fingerprint(module: nn.Module) -> Tensor:
    """Σ w and Σ w² over all parameters (float64): equal weights give equal fingerprints."""
    flat = torch.cat([p.detach().double().reshape(-1) for p in module.parameters()])
    return torch.stack([flat.sum(), flat.pow(2).sum()])


def noise_draws(seed: int, count: int, batch: int) -> Tensor:
    """``count`` standard-normal draws [count, batch, 3, 8, 8] (float64), drawn one after the
    other from one generator seeded by ``seed``: the z of the reference cases' ``noise_fn``."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty((count, batch, *IMAGE_SHAPE), dtype=torch.float64)
    for k in range(count):
        out[k] = torch.randn(out.shape[1:], generator=g, dtype=torch.float64)
    return out
