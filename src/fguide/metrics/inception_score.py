"""Inception Score from the FID Inception's 1008-way logits (ADM's evaluator, METHODS.md 6).

With p_i = softmax(logits_i) over all 1008 outputs, the rows are cut into consecutive splits
of ``split_size`` (ADM: 5000; a short last split counts as much as a full one). For a split s,
p̄_s = mean_{i∈s} p_i and IS_s = exp(mean_{i∈s} KL(p_i ‖ p̄_s)); IS = mean_s IS_s.
Everything is float64 (ADM: float32, ~1e−7 relative away).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = ["InceptionScore", "inception_score", "inception_score_splits"]


@dataclass(frozen=True)
class InceptionScore:
    """IS (mean over splits), the per-split scores and the per-row KL(p_i ‖ p̄_split)."""

    score: float
    split_scores: list[float]
    kl_per_row: NDArray[np.float64] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"inception_score": self.score, "split_scores": list(self.split_scores)}


def inception_score_splits(logits: Any, split_size: int = 5000) -> InceptionScore:
    """IS with its split scores and per-row KL terms, from logits [N, C] (C = 1008 for ADM)."""
    if isinstance(split_size, bool) or not isinstance(split_size, int) or split_size < 1:
        raise ValueError(f"split_size must be a positive integer, got {split_size!r}")
    f = torch.as_tensor(logits).detach().to(device="cpu", dtype=torch.float64)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"logits must be [N, C] with N >= 1, got shape {tuple(f.shape)}")
    if not bool(torch.isfinite(f).all()):
        raise ValueError("logits contain non-finite values")
    # log_softmax, not log(softmax): p·log p must stay finite where p underflows to 0.
    logp = torch.log_softmax(f, dim=1)
    p = logp.exp()
    kl = torch.empty(f.shape[0], dtype=torch.float64)
    scores: list[float] = []
    for start in range(0, f.shape[0], split_size):
        sl = slice(start, min(start + split_size, f.shape[0]))
        lp = logp[sl]
        log_mean = torch.logsumexp(lp, dim=0) - math.log(lp.shape[0])  # log p̄_split
        kl[sl] = (p[sl] * (lp - log_mean)).sum(dim=1)
        scores.append(math.exp(float(kl[sl].mean())))
    return InceptionScore(score=float(np.mean(scores)), split_scores=scores, kl_per_row=kl.numpy())


def inception_score(logits: Any, split_size: int = 5000) -> float:
    """IS = mean over consecutive splits of exp(mean_i KL(p_i ‖ p̄_split)), float64."""
    return inception_score_splits(logits, split_size).score
