"""fguide.finetune.steps: the loss and its gradient, accumulated over micro-batches.

Expected values are autograd gradients of the loss written out in the test, in float64.
"""

from __future__ import annotations

import pytest
import tolerances
import torch
from tolerances import network_depth
from torch import nn

from fguide.finetune.config import FinetuneConfig
from fguide.finetune.steps import accumulate_gradients, classifier_inputs
from fguide.schedules import make_process


def test_microbatches_give_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 5))
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 5, (10,))
    grads = []
    for micro in (None, 4, 1):  # chunks 10; 4, 4, 2; ten of 1
        net.zero_grad()
        stats = accumulate_gradients(net, x, None, y, ece_weight=1.0, microbatch=micro)
        grads.append([p.grad.clone() for p in net.parameters()])  # type: ignore[union-attr]
        assert stats.logits.shape == (10, 5)
    # forward and back through the net, then the sum over 10 samples in another grouping
    depth = 2 * network_depth(net) + 10
    for other in grads[1:]:
        for g_full, g in zip(grads[0], other, strict=True):
            tolerances.assert_close(g, g_full, torch.float32, depth)
    net.zero_grad()
    accumulate_gradients(net, x, None, y, ece_weight=0.0)
    differs = (net[3].weight.grad - grads[0][2]).abs().max()
    assert differs > tolerances.tol(grads[0][2], torch.float32, depth)  # the sECE term counts


def test_calibration_loss_option_and_lambda_enter_the_gradient() -> None:
    # Expected: autograd of CE + λ·L_cal written out here (metrics functions, float64), for a
    # λ that is neither 0 nor 1, against accumulate_gradients' micro-batched accumulation.
    from fguide.metrics.calibration import smooth_ece_loss, soft_binned_ece_loss

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    x, y = torch.randn(16, 3, 2, 2, dtype=torch.float64), torch.randint(0, 4, (16,))
    for name, fn in (("smooth_ece", smooth_ece_loss), ("soft_binned_ece", soft_binned_ece_loss)):
        lam, beta = 0.37, 1e-3
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + lam * fn(logits, y, beta)
        expected = torch.autograd.grad(loss, list(net.parameters()))
        net.zero_grad()
        stats = accumulate_gradients(
            net, x, None, y, ece_weight=lam, beta=beta, calibration_loss=name
        )
        # the loss's sums over 16 samples and 4 classes, forward and back through the net
        depth = 2 * (network_depth(net) + 16 + 4)
        tolerances.assert_close(stats.loss, loss, torch.float64, depth)
        for p, g in zip(net.parameters(), expected, strict=True):
            tolerances.assert_close(p.grad, g, torch.float64, depth)
    with pytest.raises(ValueError, match="calibration_loss"):
        FinetuneConfig(calibration_loss="ece").validate()


def test_denoised_input_is_the_estimate_from_the_noised_image() -> None:
    """input "denoised": the denoiser sees x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε (t and ε the
    generator's first draws), the model timesteps and the labels; the classifier gets its
    estimate, detached."""
    process = make_process("linear", 1000)
    x0 = torch.rand(3, 3, 4, 4, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([2, 0, 1])
    seen: dict[str, torch.Tensor] = {}

    def denoiser(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None
        seen.update(x_t=x_t.clone(), t=t.clone(), y=y.clone())
        return (0.5 * x_t).requires_grad_()

    gen = torch.Generator().manual_seed(4)
    out, t_none = classifier_inputs(x0, labels, "denoised", process, gen, denoiser)
    draws = torch.Generator().manual_seed(4)
    t = torch.randint(0, 1000, (3,), generator=draws)
    eps = torch.randn(x0.shape, generator=draws, dtype=torch.float64)
    abar = torch.from_numpy(process.alphas_cumprod)[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    tolerances.assert_close(seen["x_t"], x_t, torch.float64, depth=3)
    assert torch.equal(seen["t"], t) and torch.equal(seen["y"], labels)
    assert t_none is None and not out.requires_grad
    assert torch.equal(out, 0.5 * seen["x_t"])
