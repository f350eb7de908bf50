"""The guide boundary: a float32 guide steers a float64 state in every sampler, and the
scalar backward that computes Jᵀc equals the vector-Jacobian product bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import fguide
from fguide.guidance import coefficient_vjp
from fguide.models.resnet import resnet

EPS32 = torch.finfo(torch.float32).eps
STEPS = 5


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Softplus(), nn.Linear(16, 5))


def _sample(name: str, z: Tensor, guide: fguide.ClassifierGuide | None) -> Tensor:
    labels = torch.tensor([0, 3])
    if name == "ddpm" or name == "ddim":
        proc = fguide.make_process("linear", 1000, str(STEPS), "fixed_small")
        sampler = fguide.ddpm if name == "ddpm" else fguide.ddim
        return sampler(lambda x, t, y: 0.1 * x, z, proc, labels=labels, guide=guide)
    churn = 10.0 if name == "heun-churn" else 0.0
    noise = fguide.SampleNoise(seed=1, indices=range(2)) if churn else None
    return fguide.heun(
        lambda x, s, y: x / (1 + s.reshape(-1, 1, 1, 1) ** 2),  # exact for N(0, I) data
        z,
        fguide.karras_sigmas(STEPS),
        labels=labels,
        guide=guide,
        noise=noise,
        s_churn=churn,
    )


@pytest.mark.parametrize("name", ["ddpm", "ddim", "heun", "heun-churn"])
def test_float64_state_with_a_float32_guide(name: str) -> None:
    clf32 = _classifier()
    clf64 = copy.deepcopy(clf32).double()
    obj = fguide.objective("base")
    scale = 0.05 if name.startswith("heun") else 1.0
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mixed = _sample(name, z, fguide.ClassifierGuide(clf32, obj, scale))
    exact = _sample(name, z, fguide.ClassifierGuide(clf64, obj, scale))
    unguided = _sample(name, z, None)
    assert mixed.dtype == torch.float64
    # The float32 gradient differs from the float64 one by round-off: a few float32 ulps per
    # operation over the classifier's depth (two dot products of 48 and 16 terms) and the
    # steps; the guidance itself moves the samples by two orders of magnitude more.
    tol = 4 * (48 + 16) * STEPS * EPS32 * float(exact.abs().max())
    assert float((mixed - exact).abs().max()) <= tol
    assert float((exact - unguided).abs().max()) > 100 * tol


def test_the_gradient_comes_back_in_the_state_dtype() -> None:
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    res = fguide.evaluate_guidance(_classifier(), x, torch.tensor([1, 4]), fguide.objective("base"))
    assert res.grad.dtype == torch.float64 and res.logits.dtype == torch.float32


def _resnet(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return resnet("resnet18", 10, softplus_beta=3.0).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scalar_backward_equals_the_vector_jacobian_product_bitwise(dtype: torch.dtype) -> None:
    net = _resnet(dtype)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 16, 16, generator=gen, dtype=dtype).requires_grad_(True)
    coeff = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    (expected,) = torch.autograd.grad(net(x), x, grad_outputs=coeff.to(dtype))
    assert torch.equal(coefficient_vjp(net(x), x, coeff), expected)
