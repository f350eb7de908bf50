"""The Gaussian-mixture world: every quantity exact (METHODS.md §8).

K classes in R^d with weights b_k and class k ~ N(μ_k, s² I). Under the VP process
x_t | k ~ N(sqrt(ᾱ_t) μ_k, v_t I), v_t = ᾱ_t s² + 1 − ᾱ_t, so the posterior over classes
r_k(x_t) and the denoiser E[x0 | x_t] are closed forms. The "off-the-shelf" classifier is the
Bayes classifier of the clean mixture sharpened by κ ≥ 1, applied to the x0 estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fguide import rng


@dataclass
class GaussianMixture:
    """Mixture Σ_k b_k N(μ_k, s² I) in R^d (float64 means)."""

    means: Tensor
    s: float = 0.5
    log_weights: Tensor | None = None

    def __post_init__(self) -> None:
        self.means = self.means.double()
        if self.log_weights is None:
            k = self.means.shape[0]
            self.log_weights = torch.full((k,), -math.log(k), dtype=torch.float64)

    @classmethod
    def circle(
        cls, num_classes: int = 8, radius: float = 4.0, s: float = 0.5, dim: int = 2, seed: int = 0
    ) -> GaussianMixture:
        """K equal-weight classes on a circle; for d > 2 the circle's plane is a fixed random
        2-plane of R^d (a seeded orthonormal basis), so no coordinate is special."""
        if dim < 2:
            raise ValueError(f"dim must be >= 2; got {dim}")
        angles = 2 * math.pi * torch.arange(num_classes, dtype=torch.float64) / num_classes
        circle = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        if dim == 2:
            return cls(circle, s)
        g = rng.generator(seed, rng.DEMO_BASIS)
        basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))
        return cls(circle @ basis.T, s)

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def b(self) -> Tensor:
        assert self.log_weights is not None
        return self.log_weights

    def plane(self) -> Tensor:
        """An orthonormal basis [d, 2] of the plane of the means (for 2-D pictures)."""
        centred = self.means - self.means.mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        return vh[:2].T

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Exact draws x0 ~ N(μ_y, s² I) for each label."""
        z = torch.randn(labels.shape[0], self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.s * z

    def noisy_log_joint(self, x: Tensor, abar: Tensor) -> Tensor:
        """log b_k + log N(x; sqrt(ᾱ) μ_k, v I), v = ᾱ s² + 1 − ᾱ, for every class: [B, K]."""
        abar = abar.reshape(-1, 1).to(x)
        v = abar * self.s**2 + 1 - abar
        d2 = sq_distances(x, self.means.to(x), abar.sqrt())
        return self.b.to(x) - d2 / (2 * v) - 0.5 * self.dim * torch.log(2 * math.pi * v)

    def posterior_mean(self, x: Tensor, abar: Tensor) -> Tensor:
        """E[x0 | x_t = x] = Σ_k r_k (μ_k + sqrt(ᾱ) s²/v (x − sqrt(ᾱ) μ_k))."""
        r = _softmax(self.noisy_log_joint(x, abar))
        a = abar.reshape(-1, 1).to(x)
        v = a * self.s**2 + 1 - a
        mu = self.means.to(x)
        mean_mu = r @ mu
        return mean_mu + (a.sqrt() * self.s**2 / v) * (x - a.sqrt() * mean_mu)

    def frechet_to_class(self, samples: Tensor, label: int) -> float:
        """Fréchet distance between the samples' Gaussian fit and the exact N(μ_y, s² I).

        ‖m − μ_y‖² + tr C + d s² − 2 s tr C^{1/2} (the cross term is exact for an isotropic
        target).
        """
        x = samples.double()
        if x.shape[0] < 2:
            return float("nan")
        m = x.mean(0)
        c = torch.cov(x.T).reshape(self.dim, self.dim)
        ev = torch.linalg.eigvalsh(c).clamp_min(0)
        fd = (m - self.means[label]).pow(2).sum() + ev.sum() + self.dim * self.s**2
        return float(fd - 2 * self.s * ev.sqrt().sum())

    def bayes_labels(self, x: Tensor) -> Tensor:
        """argmax_k of the clean-data posterior: the class a sample most plausibly belongs to."""
        return self.noisy_log_joint(x.double(), torch.ones(x.shape[0], dtype=torch.float64)).argmax(
            -1
        )


def frechet_between(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between the Gaussian fits of two sample sets [n, d]:
    ‖m_a − m_b‖² + tr C_a + tr C_b − 2 tr (C_a^{1/2} C_b C_a^{1/2})^{1/2} (symmetric square
    roots by eigendecomposition; float64), floored at 0 (a set against itself rounds to
    ±1e−16)."""
    a, b = a.double(), b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        return float("nan")
    d = a.shape[1]
    ca, cb = torch.cov(a.T).reshape(d, d), torch.cov(b.T).reshape(d, d)
    ev, vec = torch.linalg.eigh(ca)
    root = (vec * ev.clamp_min(0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(root @ cb @ root).clamp_min(0).sqrt().sum()
    fd = (a.mean(0) - b.mean(0)).pow(2).sum() + ca.trace() + cb.trace() - 2 * cross
    return max(float(fd), 0.0)


def _softmax(z: Tensor) -> Tensor:
    """softmax over the last dimension; torch.softmax over the K = 8 classes of thousands of
    rows takes 4–5 times as long as these three kernels (measured, torch 2.13 CPU)."""
    e = (z - z.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def sq_distances(x: Tensor, means: Tensor, c: Tensor | None = None) -> Tensor:
    """‖x_i − c_i μ_k‖² for every row i and class k: [B, K] (c: [B, 1], default 1).

    Expanded as ‖x‖² − 2 c x·μ + c² ‖μ‖², one [B, d] × [d, K] product instead of a [B, K, d]
    difference (the demo batches thousands of rows per step). Cancellation costs about
    ε·‖x‖² absolutely, ~1e−14 for this world's float64 states: far below every quantity
    the demo reports.
    """
    cross = x @ means.T
    mu2 = means.pow(2).sum(-1)
    x2 = x.pow(2).sum(-1, keepdim=True)
    if c is None:
        return x2 - 2 * cross + mu2
    return x2 - 2 * c * cross + c.pow(2) * mu2


class ExactEpsModel:
    """The exact ε-prediction of the mixture: ε̂ = (x_t − sqrt(ᾱ_t) E[x0|x_t]) / sqrt(1 − ᾱ_t).

    Called like an ADM network with the original training timestep (labels ignored: the
    diffusion model is unconditional; guidance supplies the class).
    """

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: np.ndarray):
        self.mixture = mixture
        self.abar = torch.from_numpy(alphas_cumprod)

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        a = self.abar.to(x.device)[t.long()].to(x)
        x0 = self.mixture.posterior_mean(x, a)
        a = a[:, None]
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


class ExactDenoiser:
    """EDM-form exact denoiser D(x, σ) = E[x0 | x/sqrt(1+σ²)] with ᾱ = 1/(1 + σ²)."""

    def __init__(self, mixture: GaussianMixture):
        self.mixture = mixture

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        s = sigma.to(x)
        abar = 1 / (1 + s**2)
        return self.mixture.posterior_mean(x * abar.sqrt()[:, None], abar)


class BayesClassifier(nn.Module):
    """f_k(x) = κ (log b_k − ‖x − μ_k‖² / (2 s²)): the clean mixture's Bayes classifier
    (up to a constant), made overconfident by the sharpness κ ≥ 1."""

    def __init__(self, mixture: GaussianMixture, sharpness: float = 8.0):
        super().__init__()
        if sharpness <= 0:
            raise ValueError(f"sharpness must be > 0; got {sharpness}")
        self.means: Tensor
        self.log_weights: Tensor
        self.register_buffer("means", mixture.means.clone())
        self.register_buffer("log_weights", mixture.b.clone())
        self.s = mixture.s
        self.sharpness = sharpness

    def forward(self, x: Tensor) -> Tensor:
        d2 = sq_distances(x, self.means.to(x))
        return self.sharpness * (self.log_weights.to(x) - d2 / (2 * self.s**2))


class NoisyBayesClassifier(nn.Module):
    """The exact noisy classifier log r_k(x_t) (time-aware: called with the training step)."""

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: np.ndarray):
        super().__init__()
        self.mixture = mixture
        self.abar: Tensor
        self.register_buffer("abar", torch.from_numpy(alphas_cumprod))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.mixture.noisy_log_joint(x, self.abar[t.long()])
