"""Improved precision and recall (Kynkäänniemi et al.) with ADM's ManifoldEstimator semantics.

METHODS.md section 6, k = 3 by default. All distances are *squared* Euclidean distances by
the norm expansion d(u, v) = max(‖u‖² − 2 u·v + ‖v‖², 0) (a NaN stays NaN). The radius r_x of a
point x is its (k+1)-th smallest distance within its own set, x itself included (so its k-th
neighbour). With R the reference and S the sample features:

    precision = |{s ∈ S : ∃ r ∈ R, d(s, r) ≤ r_r}| / |S|
    recall    = |{r ∈ R : ∃ s ∈ S, d(r, s) ≤ r_s}| / |R|

Distances are computed in blocks of at most ``block_size`` × ``block_size`` (ADM: 10000), so
50k × 2048 features fit in memory, with torch so that a GPU can be used. Modes:

- ``"float32"`` (default) and ``"float64"``: every block in that dtype;
- ``"float16"``: ADM's scheme, a block in float16 (features rounded to float16), recomputed in
  float32 when it has a non-finite value (squared norms above 65504 overflow float16).

Only the inside/outside decisions are the contract; radii differ between modes by round-off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = ["DistanceMode", "PrecisionRecall", "manifold_radii", "precision_recall"]

DistanceMode = Literal["float32", "float64", "float16"]
_MODES = ("float32", "float64", "float16")


@dataclass(frozen=True)
class PrecisionRecall:
    """Precision, recall, the per-point decisions behind them and the (squared) radii."""

    precision: float
    recall: float
    sample_in_ref_manifold: NDArray[np.bool_] = field(repr=False)
    ref_in_sample_manifold: NDArray[np.bool_] = field(repr=False)
    radii_ref: NDArray[np.float64] = field(repr=False)
    radii_sample: NDArray[np.float64] = field(repr=False)
    mode: str = "float32"
    fallback_blocks: int = 0  # float16 blocks recomputed in float32

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "mode": self.mode,
            "fallback_blocks": self.fallback_blocks,
        }


class _Features:
    """One feature set on the device, in the working dtype(s), with squared norms."""

    def __init__(self, x: torch.Tensor, mode: str) -> None:
        self.n = x.shape[0]
        self.x = x  # float32 or float64: the direct / fallback computation
        self.norm = (x * x).sum(dim=1)
        self.x16: torch.Tensor | None = None
        self.norm16: torch.Tensor | None = None
        if mode == "float16":
            self.x16 = x.half()
            # Squared norms in float16, as ADM: above 65504 they become inf, which is what
            # triggers the float32 recomputation of the block.
            self.norm16 = (self.x16 * self.x16).sum(dim=1)


def _sq_distances(
    u: torch.Tensor, v: torch.Tensor, nu: torch.Tensor, nv: torch.Tensor
) -> torch.Tensor:
    d = torch.addmm(nu[:, None], u, v.T, alpha=-2.0)  # ‖u‖² − 2 u·v
    d += nv[None, :]
    return d.clamp_min_(0.0)  # clamp_min propagates NaN: a NaN block must stay non-finite


class _Blocks:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.fallbacks = 0

    def __call__(self, a: _Features, ia: slice, b: _Features, ib: slice) -> torch.Tensor:
        """Squared distances of a's rows ia to b's rows ib (float32, or float64 in that mode)."""
        if self.mode == "float16":
            assert a.x16 is not None and a.norm16 is not None
            assert b.x16 is not None and b.norm16 is not None
            d = _sq_distances(a.x16[ia], b.x16[ib], a.norm16[ia], b.norm16[ib])
            if bool(torch.isfinite(d).all()):
                return d.float()
            self.fallbacks += 1
        return _sq_distances(a.x[ia], b.x[ib], a.norm[ia], b.norm[ib])


def _slices(n: int, block: int) -> list[slice]:
    return [slice(s, min(s + block, n)) for s in range(0, n, block)]


def _radii(f: _Features, k: int, block_size: int, dist: _Blocks) -> torch.Tensor:
    """(k+1)-th smallest within-set distance of every row, streaming over blocks.

    Each row keeps its k+1 smallest distances so far. The within-set distance matrix is
    symmetric, so only blocks i ≤ j are computed; block (i, j) also serves rows of j through
    its transpose (~40% fewer products at 50k rows in blocks of 10k).
    """
    best = torch.full((f.n, k + 1), float("inf"), dtype=f.x.dtype, device=f.x.device)

    def fold(rows: slice, d: torch.Tensor) -> None:
        kk = min(k + 1, d.shape[1])
        cand = torch.cat([best[rows], d.topk(kk, dim=1, largest=False).values], dim=1)
        best[rows] = cand.topk(k + 1, dim=1, largest=False).values

    sl = _slices(f.n, block_size)
    for i, si in enumerate(sl):
        for sj in sl[i:]:
            d = dist(f, si, f, sj).to(best.dtype)
            fold(si, d)
            if sj != si:
                fold(sj, d.T)
    return best[:, k]


def _prepare(features: Any, name: str, mode: str, device: torch.device, k: int) -> _Features:
    x = torch.as_tensor(features).detach()
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] < k + 1:
        raise ValueError(f"{name} needs at least k + 1 = {k + 1} rows, got {x.shape[0]}")
    # ADM casts the activations to float32; float64 mode keeps (or widens to) float64.
    dtype = torch.float64 if mode == "float64" else torch.float32
    x = x.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contain non-finite values")
    return _Features(x, mode)


def _check_args(k: int, mode: str, block_size: int) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


@torch.no_grad()
def manifold_radii(
    features: Any,
    k: int = 3,
    *,
    mode: DistanceMode = "float32",
    block_size: int = 10000,
    device: str | torch.device | None = None,
) -> NDArray[np.float64]:
    """Squared radius of every row: its (k+1)-th smallest squared distance in its own set."""
    _check_args(k, mode, block_size)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    f = _prepare(features, "features", mode, dev, k)
    return _radii(f, k, block_size, _Blocks(mode)).double().cpu().numpy()


@torch.no_grad()
def precision_recall(
    ref_features: Any,
    sample_features: Any,
    k: int = 3,
    *,
    mode: DistanceMode = "float32",
    block_size: int = 10000,
    device: str | torch.device | None = None,
) -> PrecisionRecall:
    """Improved precision and recall of ``sample_features`` against ``ref_features``.

    Inputs are [N, D] arrays or tensors (ADM uses the 2048-d pool features, 10000 reference
    rows). ``device`` is where the distances are computed (default CPU).
    """
    _check_args(k, mode, block_size)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    ref = _prepare(ref_features, "ref_features", mode, dev, k)
    sam = _prepare(sample_features, "sample_features", mode, dev, k)
    if ref.x.shape[1] != sam.x.shape[1]:
        raise ValueError(
            f"feature dimensions differ: ref {ref.x.shape[1]}, sample {sam.x.shape[1]}"
        )
    dist = _Blocks(mode)
    r_ref = _radii(ref, k, block_size, dist)
    r_sam = _radii(sam, k, block_size, dist)
    sample_in = torch.zeros(sam.n, dtype=torch.bool, device=dev)
    ref_in = torch.zeros(ref.n, dtype=torch.bool, device=dev)
    for si in _slices(ref.n, block_size):
        for sj in _slices(sam.n, block_size):
            d = dist(ref, si, sam, sj).to(r_ref.dtype)  # [refs, samples]
            sample_in[sj] |= (d <= r_ref[si, None]).any(dim=0)
            ref_in[si] |= (d <= r_sam[None, sj]).any(dim=1)
    return PrecisionRecall(
        precision=float(sample_in.double().mean()),
        recall=float(ref_in.double().mean()),
        sample_in_ref_manifold=sample_in.cpu().numpy(),
        ref_in_sample_manifold=ref_in.cpu().numpy(),
        radii_ref=r_ref.double().cpu().numpy(),
        radii_sample=r_sam.double().cpu().numpy(),
        mode=mode,
        fallback_blocks=dist.fallbacks,
    )
