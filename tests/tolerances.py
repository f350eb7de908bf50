"""The one rule for how far a floating-point result may be from its expected value.

Model. A computation in ``dtype`` rounds every intermediate result to that dtype's spacing, about
``eps(dtype) · |value|`` (``eps`` = 2⁻¹⁰ float16, 2⁻⁷ bfloat16, 2⁻²³ float32, 2⁻⁵² float64). Each
*stage* of the computation (a layer of a network: its reductions, bias, normalisation and
activation; a step of a sampler; one formula) adds a few such roundings on the scale of the values
it handles, and later stages carry them forward. Roundings of different stages are independent
and of either sign, so after ``depth`` stages their sum grows like √depth (the probabilistic
rounding-error bound λ·√n·u of Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019), not like the
worst case depth·u that no machine reaches and that, at float16, would allow almost any error:

    tol = ulps · eps(dtype) · scale · √depth

where

* ``scale`` is max|expected|, the magnitude of the compared values (pass ``scale=`` where the
  intermediates are larger than the result, e.g. a result obtained by cancellation);
* ``depth`` counts the stages in sequence: a network's weight layers, each rounding its sum
  over fan_in terms ⌈log₂ fan_in⌉ times (:func:`network_depth`; :func:`layer_count` where the
  sums run in a wider dtype than the result; twice either for a gradient, which runs the graph
  back), times the network evaluations of a sampler; n for a sum or mean of n terms; the
  elementwise operations of a formula;
* ``ulps`` (default 4) is λ: the few roundings inside one stage (each ≤ ½ ulp), the reference's
  own rounding when another implementation computed it in the same dtype, and the margin that
  makes the bound hold with high probability.

The tolerance is absolute (rtol = 0): the error of an element comes from the magnitudes around it,
not from its own size, so small elements get no tighter bound than large ones. Nothing here comes
from one machine's output; a test that needs more than the model gives must say why (``ulps=`` or
``scale=`` with a comment). Exact computations (integers, copies, the same kernels on the same
input) are compared exactly, not through this module. Functions that are not continuous in their
input (the gradient of a ReLU network jumps where a pre-activation crosses 0, and rounding moves
pre-activations near 0 across it) have no rounding bound: compare them where they are smooth.

Set ``FGUIDE_TOL_REPORT=path`` to append, for each comparison, the test and the fraction of its
tolerance the error used: the margins on the machine at hand.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

EPS = {
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
    torch.float32: 2.0**-23,
    torch.float64: 2.0**-52,
}
ULPS = 4.0

_NUMPY = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
_NUMPY[np.dtype(np.float64)] = torch.float64


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return _NUMPY[np.dtype(dtype)]


def eps(dtype: Any) -> float:
    """The spacing of ``dtype`` at 1 (machine epsilon): 2⁻¹⁰, 2⁻⁷, 2⁻²³ or 2⁻⁵²."""
    return EPS[_torch_dtype(dtype)]


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64)
    return torch.tensor(np.array(value, dtype=np.float64))  # a copy: read-only arrays too


def magnitude(expected: Any) -> float:
    """max|expected| over every element (0 for an empty value)."""
    t = _as_tensor(expected)
    return t.abs().max().item() if t.numel() else 0.0


def tol(
    expected: Any,
    dtype: Any,
    depth: float = 1,
    ulps: float = ULPS,
    scale: float | None = None,
) -> float:
    """ulps · eps(dtype) · scale · √depth, with scale = max|expected| unless given (module doc)."""
    if depth < 1 or ulps <= 0:
        raise ValueError(f"depth must be ≥ 1 and ulps > 0, got depth={depth}, ulps={ulps}")
    s = magnitude(expected) if scale is None else scale
    return ulps * eps(dtype) * s * math.sqrt(depth)


def network_depth(module: torch.nn.Module) -> int:
    """Rounding stages on a forward pass of ``module``, the ``depth`` of its output: each weight
    layer (a module owning a matrix or kernel: convolution, linear map, attention projection)
    sums fan_in products, which pairwise or blocked summation rounds ⌈log₂ fan_in⌉ times in
    sequence. Counting every layer bounds the longest path. Where the sums run in a wider dtype
    than the result (float16 layers accumulating in float32), :func:`layer_count` instead."""
    return _depth(module, per_layer=False)


def layer_count(module: torch.nn.Module) -> int:
    """Weight layers in ``module``: one rounding stage each where the layer's sums run in a wider
    dtype than its result (float16 layers accumulating in float32)."""
    return _depth(module, per_layer=True)


def _depth(module: torch.nn.Module, per_layer: bool) -> int:
    total = 0
    for m in module.modules():
        kernels = [p for p in m.parameters(recurse=False) if p.dim() >= 2]
        if kernels:
            fan_in = kernels[0][0].numel()
            total += 1 if per_layer else max(1, math.ceil(math.log2(max(fan_in, 2))))
    return max(1, total)


def _report(error: float, bound: float, unit: float, depth: float, name: str) -> None:
    """One line per comparison: fraction of the tolerance used, error in ulps of the scale
    (eps · scale), depth, test, what was compared."""
    path = os.environ.get("FGUIDE_TOL_REPORT")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        used = error / bound if bound > 0 else (0.0 if error == 0 else math.inf)
        ulps = error / unit if unit > 0 else math.inf
        with open(path, "a") as f:
            f.write(f"{used:.4g}\t{ulps:.4g}\t{depth:g}\t{test}\t{name}\n")


def assert_close(
    actual: Any,
    expected: Any,
    dtype: Any,
    depth: float = 1,
    ulps: float = ULPS,
    scale: float | None = None,
    msg: str | None = None,
) -> None:
    """Every element of ``actual`` within :func:`tol` of ``expected`` (compared in float64).

    ``dtype`` is the precision the result was computed in (the less precise side). Shapes must
    match; NaNs fail.
    """
    a, e = _as_tensor(actual), _as_tensor(expected)
    name = msg or "value"
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    s = magnitude(e) if scale is None else scale
    bound = tol(e, dtype, depth, ulps, s)
    diff = (a - e).abs()
    error = diff.max().item() if a.numel() else 0.0
    _report(error, bound, eps(dtype) * s, depth, name)
    if not error <= bound:  # also fails on NaN
        index = np.unravel_index(int(diff.nan_to_num(math.inf).argmax()), tuple(a.shape))
        raise AssertionError(
            f"{name}: max |actual - expected| = {error:.4g} at {tuple(int(i) for i in index)} "
            f"exceeds {bound:.4g} = {ulps:g} ulps * eps({_torch_dtype(dtype)}) * scale {s:.4g} "
            f"* sqrt(depth {depth:g})"
        )
