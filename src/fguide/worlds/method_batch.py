"""Several guidance methods in one sampler call (the Gaussian-mixture demo's batching).

Rows [i·n, (i+1)·n) of the batch are method i's n samples. Every method's samples start from
the same noise and draw the same noise per step (:func:`tiled_noise`), so each block is, up to
float rounding, the run that method would make alone; but the diffusion model, the classifier's
forward and its backward run once per step for all methods instead of once per method, which
leaves a method's own cost at its coefficients c = ∂S/∂f and its metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fguide.guidance import ClassifierFn, GuidanceResult
from fguide.objectives import Objective
from fguide.samplers import StepRecord

__all__ = ["MethodBatchGuide", "split_callback", "tiled_noise"]


class MethodBatchGuide:
    """A sampler guide for method blocks of ``n`` rows: block i is guided by ``objectives[i]``
    (None: unguided, a zero gradient, so the sampler's mean is left exactly as it is), its
    coefficients times ``gains[i]`` (default 1). The gradient is Jᵀc as in
    :func:`fguide.guidance.evaluate_guidance`, with one forward and one backward for all blocks;
    tilted objectives form their groups inside their own block, as they would alone.

    ``scale`` is the sampler's γ for every block. With ``gains`` (a sweep over γ) use
    ``scale=1``: the gradient then carries the gain, and the recorded norms are scaled.
    """

    def __init__(
        self,
        classifier: ClassifierFn,
        objectives: Sequence[Objective | None],
        n: int,
        scale: float = 1.0,
        gains: Sequence[float] | None = None,
    ) -> None:
        if gains is not None and len(gains) != len(objectives):
            raise ValueError(f"{len(gains)} gains for {len(objectives)} objectives")
        self.classifier = classifier
        self.objectives = list(objectives)
        self.n = n
        self.scale = scale
        self.gains = None if gains is None else list(gains)
        self.last: list[GuidanceResult | None] = [None] * len(self.objectives)
        """Each block's result at the last call (None for unguided blocks), for recorders."""

    def __call__(
        self, x_t: Tensor, x0: Tensor, t: Tensor, labels: Tensor, progress: float
    ) -> GuidanceResult:
        n = self.n
        if x0.shape[0] != n * len(self.objectives):
            raise ValueError(
                f"batch of {x0.shape[0]} rows for {len(self.objectives)} blocks of {n}"
            )
        with torch.enable_grad():
            x_in = x0.detach().requires_grad_(True)
            logits = self.classifier(x_in)
            coeffs, weights = self._coefficients(logits.detach(), labels, progress)
            # a scalar backward (no grad_outputs): one vector-Jacobian product for all blocks
            (grad,) = torch.autograd.grad((coeffs.to(logits.dtype) * logits).sum(), x_in)
        logits = logits.detach()
        for i, obj in enumerate(self.objectives):
            b = slice(i * n, (i + 1) * n)
            self.last[i] = (
                None if obj is None else GuidanceResult(grad[b], logits[b], labels[b], weights[i])
            )
        return GuidanceResult(grad=grad, logits=logits, labels=labels)

    def _coefficients(
        self, logits: Tensor, labels: Tensor, progress: float
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Every block's c = ∂S/∂f (times its gain) and tilt weights. Consecutive blocks with
        one untilted objective (a sweep over gains) take one call: their coefficients are
        per row."""
        n = self.n
        coeffs: list[Tensor] = []
        weights: list[Tensor | None] = []
        with torch.no_grad():
            for first, last in _runs(self.objectives):
                obj, rows = self.objectives[first], slice(first * n, (last + 1) * n)
                if obj is None:
                    c, w = torch.zeros_like(logits[rows]), None
                else:
                    c, w = obj.coefficients_and_weights(logits[rows], labels[rows], progress)
                if self.gains is not None:
                    gain = torch.tensor(self.gains[first : last + 1], dtype=c.dtype)
                    c = c * gain.repeat_interleave(n)[:, None]
                coeffs.append(c)
                weights.append(w)
                weights += [None] * (last - first)  # only tilted blocks have weights: alone
        return torch.cat(coeffs), weights


def _runs(objectives: Sequence[Objective | None]) -> list[tuple[int, int]]:
    """(first, last) block index of each run of equal untilted objectives (tilted: alone)."""
    runs: list[tuple[int, int]] = []
    for i, obj in enumerate(objectives):
        tilted = obj is not None and obj.tilt is not None
        if runs and not tilted and objectives[runs[-1][0]] == obj:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def split_callback(
    guide: MethodBatchGuide | None, n: int, callbacks: Sequence[Callable[[StepRecord], None] | None]
) -> Callable[[StepRecord], None]:
    """A sampler callback that hands block i's part of every step to ``callbacks[i]`` (with the
    block's own guidance result from ``guide``, or none)."""

    def call(rec: StepRecord) -> None:
        for i, cb in enumerate(callbacks):
            if cb is None:
                continue
            b = slice(i * n, (i + 1) * n)
            res = None if guide is None else guide.last[i]
            cb(StepRecord(rec.step, rec.num_steps, rec.t[b], rec.x[b], rec.x0[b], res))

    return call


def tiled_noise(
    generator: torch.Generator, n: int, blocks: int, dtype: torch.dtype
) -> Callable[[Tensor], Tensor]:
    """A sampler noise function: one draw of n rows per step, repeated for every block."""

    def draw(like: Tensor) -> Tensor:
        rows = torch.randn((n, *like.shape[1:]), generator=generator, dtype=dtype)
        return rows.repeat(blocks, *([1] * (like.ndim - 1)))

    return draw
