"""Denoiser adapters: ADMModel's label rule, VPAsEDM's σ → t map and its device cache."""

from __future__ import annotations

import numpy as np
import pytest
import tolerances
import torch

from fguide import samplers
from fguide.denoisers import ADMModel, Denoiser, EpsModel, NoiseFn, VPAsEDM, vp_sigmas
from fguide.schedules import make_process


def test_model_types_are_importable_from_samplers_too() -> None:
    assert samplers.EpsModel is EpsModel
    assert samplers.Denoiser is Denoiser and samplers.NoiseFn is NoiseFn


def test_adm_model_requires_labels_only_when_class_conditional() -> None:
    class Net(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y=None):  # type: ignore[no-untyped-def]
            return x + (0 if y is None else y.reshape(-1, 1))

    with pytest.raises(ValueError, match="labels are required"):
        ADMModel(Net())(torch.zeros(2, 3), torch.zeros(2), None)
    assert ADMModel(Net(), class_cond=False)(torch.zeros(2, 3), torch.zeros(2), None).sum() == 0


def test_vp_as_edm_maps_training_sigmas_to_their_steps() -> None:
    abar = make_process("linear", 1000, "")["alphas_cumprod"]
    calls = []

    def eps(x, t, y):  # type: ignore[no-untyped-def]
        calls.append(t)
        return torch.zeros_like(x)

    wrapped = VPAsEDM(eps, abar)
    sig = torch.from_numpy(vp_sigmas(abar))[[0, 10, 500, 999]]
    out = wrapped(torch.ones(4, 2, dtype=torch.float64), sig, None)
    # σ → log σ → the table's interpolation: t on its scale, 999
    steps = torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=torch.float64)
    tolerances.assert_close(calls[0], steps, torch.float64, depth=8, scale=999.0)
    assert torch.equal(out, torch.ones(4, 2, dtype=torch.float64))  # D = x − σ·0
    mid = float(np.exp((np.log(float(sig[1])) + np.log(vp_sigmas(abar)[11])) / 2))
    t_mid = wrapped.sigma_to_t(torch.tensor([mid], dtype=torch.float64))
    tolerances.assert_close(t_mid, [10.5], torch.float64, depth=8, scale=999.0)
    assert list(wrapped._on_device) == [torch.device("cpu")]  # the table is copied once
