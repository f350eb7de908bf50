"""fguide.accel: precision wrappers, channels_last, timed compilation, batch-size choice (CPU)."""

from __future__ import annotations

import pytest
import tolerances
import torch
from tolerances import layer_count, network_depth

import fguide
from fguide.accel import (
    PRECISIONS,
    auto_batch_size,
    choose_batch_size,
    compile_model,
    free_memory,
    precision_dtype,
    to_channels_last,
    with_precision,
)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.SiLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 5),
    )


def test_with_precision_runs_reduced_and_returns_the_input_dtype() -> None:
    net, x = _net(), torch.randn(4, 3, 4, 4)
    assert with_precision(net, "fp32") is net
    ref = net(x)
    seen: list[torch.dtype] = []
    net[0].register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if precision == "fp16" and not torch.backends.mkldnn.is_available():
            continue
        out = with_precision(net, precision)(x)
        assert out.dtype == torch.float32 and seen[-1] == dtype  # computed in that dtype ...
        assert not torch.equal(out, ref)
        # ... to that dtype's rounding: the input's cast, then one rounding per layer
        tolerances.assert_close(out, ref, dtype, depth=1 + layer_count(net), msg=precision)
    with pytest.raises(ValueError, match="precision"):
        with_precision(net, "fp8")  # type: ignore[arg-type]


def test_precision_names_are_their_dtypes() -> None:
    assert PRECISIONS == {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    assert precision_dtype("fp32") == torch.float32
    assert precision_dtype("fp16") == torch.float16
    assert precision_dtype("bf16") == torch.bfloat16


def test_a_reduced_precision_classifier_still_gives_the_guidance_gradient() -> None:
    net, x0 = _net(), torch.randn(4, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 3])
    obj = fguide.objective("js", alpha=0.09, eps=0.1)
    ref = fguide.guidance_gradient(net, x0, labels, obj)
    got = fguide.guidance_gradient(with_precision(net, "bf16"), x0, labels, obj)
    assert got.dtype == torch.float32 and not torch.equal(got, ref)
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1))
    assert (cos > 0.99).all()


def test_channels_last_converts_weights_and_input_without_changing_the_output() -> None:
    net, x = _net(), torch.randn(2, 3, 4, 4)
    ref = net(x)
    seen = []
    net[0].register_forward_pre_hook(
        lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last))
    )
    wrapped = to_channels_last(net)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    # the same sums in another memory order
    tolerances.assert_close(wrapped(x), ref, torch.float32, depth=network_depth(net))
    assert seen == [True]


def test_compile_model_reports_its_compile_time() -> None:
    net, x = _net(), torch.randn(2, 3, 4, 4)
    compiled = compile_model(net, backend="eager")
    assert compiled.compile_seconds is None
    assert torch.equal(compiled(x), net(x))  # the eager backend runs the same kernels
    assert compiled.compile_seconds is not None and compiled.compile_seconds > 0
    eager = compile_model(net, backend="eager", example=(x,))
    assert eager.compile_seconds is not None
    net.num_classes = 5
    assert compiled.num_classes == 5  # the module's attributes stay reachable
    # eager(): the module itself, no compilation (the batch-size probe's other shapes)
    lazy = compile_model(net, backend="eager")
    calls: list[int] = []
    net.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    with lazy.eager():
        assert torch.equal(lazy(x[:1]), net(x[:1]))
    assert lazy.compile_seconds is None and calls == [1, 1]
    lazy(x)
    assert lazy.compile_seconds is not None


def test_auto_batch_size_is_the_largest_batch_that_fits() -> None:
    # fixed 100 + b * 10 <= 0.5 * 2000 -> b = 90, rounded down to a multiple of 8 -> 88
    assert auto_batch_size(10, 2000, fixed_bytes=100, headroom=0.5, multiple_of=8) == 88
    assert auto_batch_size(10, 2000, fixed_bytes=100, headroom=0.5) == 90
    assert auto_batch_size(10, 2000, headroom=1.0, max_batch=64) == 64
    assert auto_batch_size(1e9, 2000) == 1  # nothing fits: still one sample
    assert auto_batch_size(10, 2000, headroom=1.0, multiple_of=512) == 200  # fewer than 512
    with pytest.raises(ValueError, match="per_sample_bytes"):
        auto_batch_size(0, 100)


def test_choose_batch_size_fits_a_line_through_two_probes() -> None:
    calls: list[int] = []

    def fake_peak(fn, device):  # type: ignore[no-untyped-def]
        before = len(calls)
        fn()
        return 300 + 40 * calls[before]  # fixed 300 bytes + 40 per sample

    b = choose_batch_size(
        calls.append, "cpu", probe=(2, 5), free_bytes=10_000, headroom=1.0, peak_bytes=fake_peak
    )
    assert calls == [2, 5]
    assert b == 240  # floor((10000 - 300) / 40) = 242 -> multiple of 8
    assert free_memory("cpu") > 0
    with pytest.raises(ValueError, match="CUDA"):
        fguide.accel.measure_peak_bytes(lambda: None, "cpu")
