"""Process: arrays as attributes, device tensors cached per (device, dtype), int or per-sample t."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import assert_close, magnitude

from fguide.schedules import make_process


def test_tensors_are_cached_per_device_and_dtype_and_equal_the_arrays() -> None:
    proc = make_process("cosine", 4000, "25", "learned_range", rescale_timesteps=True)
    s64 = proc.tensors("cpu", torch.float64)
    assert proc.tensors("cpu", torch.float64) is s64  # built once
    s32 = proc.tensors("cpu", torch.float32)
    assert s32 is not s64 and s32.alphas_cumprod.dtype == torch.float32
    ac = np.cumprod(1.0 - proc.betas)  # from the betas, independently of Process
    np.testing.assert_array_equal(s64.alphas_cumprod.numpy(), ac)
    np.testing.assert_array_equal(proc["alphas_cumprod"], ac)
    np.testing.assert_allclose(s64.timesteps.numpy(), proc.timestep_map / 4.0, rtol=0)
    assert make_process("linear", 1000, "10").tensors().timesteps.dtype == torch.int64
    with pytest.raises(KeyError, match="no array 'alphas_cumprod_next'"):
        proc["alphas_cumprod_next"]


def test_int_and_per_sample_steps_give_the_same_values() -> None:
    proc = make_process("linear", 1000, "10", "learned_range")
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    out = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    for t in (0, 4, 9):
        a = proc.p_mean_variance(out, x, t)
        b = proc.p_mean_variance(out, x, torch.full((3,), t))
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            torch.testing.assert_close(getattr(a, key), getattr(b, key), atol=0, rtol=0)
        # the closed forms, by hand from the numpy arrays
        x0 = (
            np.sqrt(1 / proc.alphas_cumprod[t]) * x
            - np.sqrt(1 / proc.alphas_cumprod[t] - 1) * out[:, :3]
        )
        # sqrt(1/ᾱ) x − sqrt(1/ᾱ − 1) ε: terms up to sqrt(1/ᾱ_t) max(|x|, |ε|), cancelled
        scale = float(np.sqrt(1 / proc.alphas_cumprod[t])) * max(magnitude(x), magnitude(out))
        assert_close(a.pred_xstart, x0.clamp(-1, 1), torch.float64, depth=4, scale=scale)
    with pytest.raises(ValueError, match="6 channels"):
        proc.p_mean_variance(out[:, :3], x, 0)
