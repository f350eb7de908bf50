"""Fréchet distance (FID, sFID) with ADM's definitions and an exact trace term.

METHODS.md section 6: with μ, Σ the mean and covariance (np.cov, N−1) of two feature sets,

    FID = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr sqrt(Σ1 Σ2).

sFID is the same function on the 2023-d spatial features. ADM evaluates the trace term with
``scipy.linalg.sqrtm`` (slow, ~1e−5 relative on rank-deficient covariances); fguide computes
it exactly:

- from statistics, tr sqrt(Σ1 Σ2) = Σ_i sqrt(λ_i(Σ1^½ Σ2 Σ1^½)) (Σ1 Σ2 is similar to that
  symmetric PSD matrix, so its eigenvalues are real and non-negative). The eigenvalues are
  taken from Gᵀ Σ2 G with Σ1 = G Gᵀ a pivoted Cholesky factor (G = Σ1^½ Q, Q orthonormal:
  same non-zero eigenvalues), one symmetric eigenvalue problem of the size of rank Σ1;
  negative round-off is clamped to 0;
- from features, tr sqrt(Σ1 Σ2) = ‖A Bᵀ‖_* / sqrt((N1 − 1)(N2 − 1)) with A, B the centred
  features (the eigenvalues of Σ1 Σ2 are the squared singular values of A Bᵀ up to that factor).

μ is accumulated in float64 (ADM keeps it in float32: a deliberate ~1e−8 relative difference).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.linalg.lapack
from numpy.typing import NDArray

__all__ = [
    "FIDComparabilityWarning",
    "FeatureStats",
    "frechet_distance",
    "frechet_distance_from_features",
    "trace_sqrt_product",
    "warn_if_incomparable",
]

F64 = NDArray[np.float64]

# ADM's regulariser for a non-finite sqrtm product, and its tolerance on the imaginary part of
# the diagonal of sqrtm(Σ1 Σ2).
_ADM_EPS = 1e-6
_ADM_IMAG_TOL = 1e-3


class FIDComparabilityWarning(UserWarning):
    """FIDs computed on different sample counts are being compared (FID is biased in N)."""


def _as_float64_2d(x: Any, name: str) -> F64:
    if hasattr(x, "detach"):  # torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [N, D], got shape {arr.shape}")
    return arr


class FeatureStats:
    """Streaming mean and covariance of feature rows, mergeable across processes.

    Keeps n, the float64 mean μ and the centred scatter M = Σ_i (x_i − μ)(x_i − μ)ᵀ. Rows are
    buffered (as float64) into blocks of ``block_rows``; each block is centred on its own mean and
    folded in with Chan et al.'s pairwise update M = M_a + M_b + δ δᵀ n_a n_b / n
    (δ = μ_b − μ_a). That avoids the cancellation of the raw Σ x xᵀ − n μ μᵀ form, makes
    :meth:`merge` the same operation as a block fold, and keeps the D×D work per block (the
    outer product, the adds) negligible next to the block's Gram matrix even when the
    features arrive in ADM's batches of 64. The Gram matrix is a BLAS symmetric rank-k update
    (upper triangle, half a GEMM); ``cov`` is M / (n − 1), np.cov's convention, symmetrised
    from the upper triangle.
    """

    def __init__(self, dim: int | None = None, block_rows: int = 4096) -> None:
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.dim = dim
        self.block_rows = block_rows
        self._count = 0
        self._mean: F64 | None = None
        self._scatter: F64 | None = None
        self._buffer: F64 | None = None  # [block_rows, D] float64, filled up to _pending_rows
        self._pending_rows = 0

    def _fold(self, n_b: int, mean_b: F64, scatter_b: F64, *, own: bool = False) -> None:
        """Fold (n_b, μ_b, M_b) in; ``own``: scatter_b is a fresh array this object may keep."""
        if self._mean is None or self._scatter is None or self._count == 0:
            self._count = n_b
            self._mean = mean_b.copy()
            # Fortran order: the rank-1 update below works in place on it (BLAS dsyr).
            self._scatter = scatter_b if own else np.array(scatter_b, dtype=np.float64, order="F")
            return
        n_a = self._count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean += delta * (n_b / n)
        self._scatter += scatter_b
        # M += δ δᵀ n_a n_b / n on the upper triangle, in place
        self._scatter = _syr(n_a * n_b / n, delta, a=self._scatter, lower=0, overwrite_a=1)
        self._count = n

    def _flush(self) -> None:
        if self._pending_rows == 0 or self._buffer is None:
            return
        x = self._buffer[: self._pending_rows]
        self._pending_rows = 0
        mean_b = x.mean(axis=0)
        x -= mean_b  # centred in place: the buffer is ours and is refilled afterwards
        # xᵀx by BLAS dsyrk: the upper triangle only, half the flops of a GEMM (np.cov's
        # product). x.T is Fortran-ordered [D, n]: no copy. _scatter keeps its upper triangle.
        self._fold(x.shape[0], mean_b, _syrk(1.0, x.T, lower=0, trans=0), own=True)

    def _check_dim(self, d: int) -> None:
        if self.dim is None:
            self.dim = d
        elif d != self.dim:
            raise ValueError(f"feature dimension mismatch: accumulator has {self.dim}, got {d}")

    def update(self, features: Any) -> FeatureStats:
        """Add a batch of rows [B, D] (numpy or torch, any float dtype); returns self."""
        if hasattr(features, "detach"):  # torch tensor, possibly on a GPU
            features = features.detach().cpu().numpy()
        x = np.asarray(features)
        if x.ndim != 2:
            raise ValueError(f"features must be a 2-d array [N, D], got shape {x.shape}")
        self._check_dim(x.shape[1])
        if not np.isfinite(x).all():
            raise ValueError("features contain non-finite values")
        if self._buffer is None:
            self._buffer = np.empty((self.block_rows, x.shape[1]), dtype=np.float64)
        start = 0
        while start < x.shape[0]:
            take = min(x.shape[0] - start, self.block_rows - self._pending_rows)
            # The assignment converts to float64 on the fly (no separate float64 copy).
            self._buffer[self._pending_rows : self._pending_rows + take] = x[start : start + take]
            self._pending_rows += take
            start += take
            if self._pending_rows == self.block_rows:
                self._flush()
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold another accumulator in (e.g. from another process); returns self."""
        other._flush()
        if other._count and other._mean is not None and other._scatter is not None:
            self._check_dim(other._mean.shape[0])
            self._flush()
            self._fold(other._count, other._mean, other._scatter)
        return self

    @property
    def count(self) -> int:
        """Number of rows seen, N."""
        return self._count + self._pending_rows

    @property
    def mean(self) -> F64:
        """μ, float64 [D]."""
        self._flush()
        if self._mean is None or self._count == 0:
            raise ValueError("FeatureStats is empty")
        return self._mean.copy()

    @property
    def cov(self) -> F64:
        """Σ = M / (N − 1), float64 [D, D] (needs N ≥ 2)."""
        self._flush()
        if self._scatter is None or self._count < 2:
            raise ValueError(f"covariance needs at least 2 rows, have {self._count}")
        return _symmetric_from_upper(self._scatter) / (self._count - 1)

    def state_dict(self) -> dict[str, Any]:
        """Plain arrays (count, mean, scatter M) for saving or sending to another process."""
        self._flush()
        scatter = None if self._scatter is None else _symmetric_from_upper(self._scatter)
        return {"count": self._count, "mean": self._mean, "scatter": scatter}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FeatureStats:
        out = cls()
        if state["count"]:
            mean = np.asarray(state["mean"], dtype=np.float64)
            out._check_dim(mean.shape[0])
            out._fold(int(state["count"]), mean, np.asarray(state["scatter"], dtype=np.float64))
        return out


_syrk = scipy.linalg.blas.dsyrk
_syr = scipy.linalg.blas.dsyr


def _symmetric_from_upper(m: F64) -> F64:
    """The symmetric matrix whose upper triangle (with the diagonal) is m's (the scatter is
    accumulated there only: exact symmetry)."""
    out = np.triu(m)
    out += out.T  # doubles the diagonal: restored below
    np.fill_diagonal(out, np.diagonal(m))
    return out


def _check_finite(arr: F64, name: str) -> None:
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _psd_factor(sigma: F64, name: str) -> F64:
    """G [D, r] with Σ = G Gᵀ, r = numerical rank, by pivoted Cholesky (LAPACK dpstrf).

    dpstrf stops when the largest remaining pivot is below D·eps·max diag Σ, which gives the
    rank of the rank-deficient covariances that are normal at 2048-d (N ≤ D), and costs D³/3
    instead of an eigendecomposition's ~9D³. For a PSD Σ the neglected Schur complement
    R = Σ − G Gᵀ has entries below that tolerance; if Σ has an eigenvalue −ν < 0, R has one
    ≤ −ν, so R is examined when it is larger, and a material −ν (sqrt(ν) > 1e−3, the
    imaginary part ADM's sqrtm check rejects) raises.
    """
    d = sigma.shape[0]
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(sigma, lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky of {name} failed (LAPACK info {info})")
    g = np.zeros((d, rank), dtype=np.float64)
    g[piv - 1] = np.tril(c)[:, :rank]  # P Σ Pᵀ = L Lᵀ, so Σ = (Pᵀ L)(Pᵀ L)ᵀ
    if rank < d:
        max_diag = float(np.max(np.diag(sigma)))
        tol = d * np.finfo(np.float64).eps * max(max_diag, 0.0)
        resid = sigma - g @ g.T
        if np.abs(resid).max() > 100 * tol:
            nu = -float(scipy.linalg.eigh(resid, eigvals_only=True, subset_by_index=(0, 0))[0])
            if nu > 0 and math.sqrt(nu) > _ADM_IMAG_TOL and nu > 1e-9 * abs(max_diag):
                raise ValueError(
                    f"{name} has a negative eigenvalue of about {-nu:.3e}: not positive "
                    "semi-definite (ADM's sqrtm would return a material imaginary part here)"
                )
    return g


def _trace_sqrt_product(sigma1: F64, sigma2: F64) -> float:
    g1 = _psd_factor(sigma1, "sigma1")
    g2 = _psd_factor(sigma2, "sigma2")
    # With Σ1 = G Gᵀ, Σ1 Σ2 has the non-zero eigenvalues of the symmetric PSD Gᵀ Σ2 G, which
    # are those of Σ1^½ Σ2 Σ1^½ (G = Σ1^½ Q for an orthonormal Q). Use the lower-rank side.
    g, other = (g1, sigma2) if g1.shape[1] <= g2.shape[1] else (g2, sigma1)
    m = g.T @ other @ g
    w = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True, check_finite=False)
    if w.size == 0:
        return 0.0
    lam_max = max(float(w[-1]), 0.0)
    if w[0] < 0 and math.sqrt(-w[0]) > _ADM_IMAG_TOL and -w[0] > 1e-9 * lam_max:
        raise ValueError(f"sigma1^1/2 sigma2 sigma1^1/2 has a negative eigenvalue {w[0]:.3e}")
    # Negative round-off clamps to 0; eigenvalues below r·eps·λ_max are round-off too, and
    # keeping them would add sqrt(round-off) per null direction to the trace.
    w = np.where(w > m.shape[0] * np.finfo(np.float64).eps * lam_max, w, 0.0)
    return float(np.sqrt(w).sum())


def trace_sqrt_product(sigma1: Any, sigma2: Any) -> float:
    """tr sqrt(Σ1 Σ2) = Σ_i sqrt(λ_i(Σ1^½ Σ2 Σ1^½)), by a symmetric eigendecomposition."""
    d = np.asarray(sigma1).shape[0]
    _, s1, _, s2 = _validate_stats(np.zeros(d), sigma1, np.zeros(d), sigma2)
    return _trace_sqrt_product(s1, s2)


def _validate_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> tuple[F64, F64, F64, F64]:
    m1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    m2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,):
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {m1.shape}, {m2.shape}")
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"sigma1 and sigma2 must be [{d}, {d}] to match mu, got {s1.shape}, {s2.shape}"
        )
    for arr, name in ((m1, "mu1"), (s1, "sigma1"), (m2, "mu2"), (s2, "sigma2")):
        _check_finite(arr, name)
    return m1, s1, m2, s2


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """FID between N(μ1, Σ1) and N(μ2, Σ2): ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr sqrt(Σ1 Σ2).

    Symmetric in its two arguments. Inputs are cast to float64. Non-finite statistics raise a
    ValueError naming the argument. ADM's fallback is kept: if the trace term comes out
    non-finite (or the eigensolver fails) 1e−6·I is added to both covariances, with a warning;
    a covariance that is materially not PSD (where ADM's sqrtm would have a diagonal imaginary
    part above 1e−3) raises.
    """
    m1, s1, m2, s2 = _validate_stats(mu1, sigma1, mu2, sigma2)
    diff = m1 - m2
    try:
        tr_covmean = _trace_sqrt_product(s1, s2)
        ok = math.isfinite(tr_covmean)
    except np.linalg.LinAlgError:
        ok = False
    if not ok:
        warnings.warn(
            f"tr sqrt(sigma1 sigma2) is not finite; adding {_ADM_EPS}*I to both covariances "
            "(as ADM does)",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(s1.shape[0]) * _ADM_EPS
        tr_covmean = _trace_sqrt_product(s1 + offset, s2 + offset)
        if not math.isfinite(tr_covmean):
            raise ValueError("tr sqrt(sigma1 sigma2) is not finite even after regularisation")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _centred_factor(x: F64) -> tuple[F64, F64]:
    """(μ, F) with A = x − μ and Fᵀ F = Aᵀ A, F having at most min(N, D) rows.

    Any F with Fᵀ F = Aᵀ A is A up to a left partial isometry (A = U F), so A Bᵀ and F_A F_Bᵀ
    have the same singular values. For N ≤ D, F = A (exact to round-off); for N > D the
    pivoted Cholesky factor of the D×D Gram matrix is far cheaper than the N×D matrices.
    """
    mu = x.mean(axis=0)
    a = x - mu
    if a.shape[0] > a.shape[1]:
        a = _psd_factor(a.T @ a, "the features' Gram matrix").T
    return mu, a


def frechet_distance_from_features(features1: Any, features2: Any) -> float:
    """FID from the two feature sets [N1, D] and [N2, D], trace term by a nuclear norm.

    μ_k = mean of the rows (float64), tr Σ_k = ‖A_k‖_F² / (N_k − 1) and
    tr sqrt(Σ1 Σ2) = ‖A1 A2ᵀ‖_* / sqrt((N1 − 1)(N2 − 1)), A_k the centred features: one SVD,
    no matrix square root, exact to round-off when N ≤ D (the rank-deficient case where the
    statistics path is least accurate); for N > D, A_k is replaced by a D-row factor of its
    Gram matrix, with the same singular values.
    """
    x1 = _as_float64_2d(features1, "features1")
    x2 = _as_float64_2d(features2, "features2")
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"feature dimensions differ: {x1.shape[1]} vs {x2.shape[1]}")
    for arr, name in ((x1, "features1"), (x2, "features2")):
        if arr.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows, got {arr.shape[0]}")
        _check_finite(arr, name)
    n1, n2 = x1.shape[0], x2.shape[0]
    mu1, a1 = _centred_factor(x1)
    mu2, a2 = _centred_factor(x2)
    tr1 = float(np.sum(a1 * a1)) / (n1 - 1)
    tr2 = float(np.sum(a2 * a2)) / (n2 - 1)
    sv = scipy.linalg.svdvals(a1 @ a2.T, check_finite=False)
    tr_covmean = float(sv.sum()) / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + tr1 + tr2 - 2.0 * tr_covmean)


def warn_if_incomparable(
    sample_counts: Sequence[int] | dict[str, int], stacklevel: int = 2
) -> bool:
    """Warn (FIDComparabilityWarning) when FIDs to be compared come from different sample
    counts: FID is biased in N, so such values are not comparable. Returns True if it warned.
    """
    if isinstance(sample_counts, dict):
        items = [f"{k}: {v}" for k, v in sample_counts.items()]
        counts = list(sample_counts.values())
    else:
        counts = list(sample_counts)
        items = [str(v) for v in counts]
    if len(set(counts)) > 1:
        warnings.warn(
            "FIDs computed on different sample counts are not comparable (FID is biased in N): "
            + ", ".join(items),
            FIDComparabilityWarning,
            stacklevel=stacklevel,
        )
        return True
    return False
