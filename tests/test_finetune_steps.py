"""fguide.finetune_steps: the loss and its gradient, accumulated over micro-batches.

Expected values are autograd gradients of the loss written out in the test, in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fguide.finetune_config import FinetuneConfig
from fguide.finetune_steps import accumulate_gradients


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
    for other in grads[1:]:
        for g_full, g in zip(grads[0], other, strict=True):
            torch.testing.assert_close(g, g_full, rtol=1e-5, atol=1e-7)
    net.zero_grad()
    accumulate_gradients(net, x, None, y, ece_weight=0.0)
    assert not torch.allclose(net[3].weight.grad, grads[0][2])  # the sECE term counts


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
        assert stats.loss == pytest.approx(float(loss.detach()), rel=1e-12)
        for p, g in zip(net.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="calibration_loss"):
        FinetuneConfig(calibration_loss="ece").validate()
