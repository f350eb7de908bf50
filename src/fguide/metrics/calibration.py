"""Calibration metrics: ECE, the Smooth ECE loss, reliability diagrams, trajectory calibration.

METHODS.md section 4. With p = softmax(f) (temperature 1), confidence p̂ = max_k p_k and
correctness a = 1[argmax = y] (ties: the lowest index):

- ECE (Naeini et al.) over B equal-width bins, bin b = ((b−1)/B, b/B] with edges b/B computed
  in float64 (a confidence of exactly 0.3 is in (0.2, 0.3]; 0 goes in the first bin):
  ECE = Σ_b (|B_b|/n) |acc(B_b) − conf(B_b)| = (1/n) Σ_b |Σ_{i∈B_b} (a_i − p̂_i)|.
- Smooth ECE loss (the paper's eq. 1 / Algorithm 2): L = (1/n) Σ_i sqrt((p̂_i − a_i)² + β),
  β = 1e−4; a_i carries no gradient, the gradient flows through p̂_i. Per sample ≈ |p̂ − a|:
  minimised at the median of correctness, not at calibration.
- Soft-binned ECE loss (fguide's, a loss whose minimiser is calibrated): soft membership
  m_ib = softmax_b(−(p̂_i − c_b)² / (2 (s/B)²)) in bins centred at c_b = (b − ½)/B,
  g_b = (1/n) Σ_i m_ib (p̂_i − a_i), L = Σ_b (sqrt(g_b² + β) − sqrt(β)); → ECE as s, β → 0.
- Trajectory calibration (EluCD Fig. 1): per sampling step, ECE and accuracy of the classifier
  on its guidance input against the target labels; integral ECE = mean over steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = [
    "ClassifierCalibration",
    "LevelCalibration",
    "ReliabilityStats",
    "TrajectoryCalibration",
    "confidence_and_correct",
    "ece",
    "reliability_diagram",
    "reliability_from_confidences",
    "smooth_ece_loss",
    "soft_binned_ece_loss",
    "CALIBRATION_LOSSES",
    "calibration_loss_fn",
]

InputKind = Literal["auto", "logits", "probs"]


def _to_numpy_2d(x: Any, name: str) -> NDArray[np.float64]:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be [n, N] with n >= 1, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _looks_like_probs(x: NDArray[np.float64]) -> bool:
    # Rows of non-negative numbers summing to 1 (float32 round-off allowed) are probabilities.
    return bool((x >= 0).all() and np.allclose(x.sum(axis=1), 1.0, rtol=0.0, atol=1e-5))


def _labels_1d(labels: Any, n: int) -> NDArray[np.int64]:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"labels has {y.shape[0]} entries for {n} rows")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def _log_softmax(x: NDArray[np.float64]) -> NDArray[np.float64]:
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def confidence_and_correct(
    probs_or_logits: Any, labels: Any, kind: InputKind = "auto"
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """(p̂_i, a_i): max softmax probability (float64) and 1[argmax = y_i], lowest index on ties.

    ``kind="auto"`` takes rows of non-negative values summing to 1 as probabilities and
    anything else as logits; pass ``"logits"`` or ``"probs"`` to decide explicitly.
    """
    if kind not in ("auto", "logits", "probs"):
        raise ValueError(f"kind must be 'auto', 'logits' or 'probs', got {kind!r}")
    x = _to_numpy_2d(probs_or_logits, "probs_or_logits")
    y = _labels_1d(labels, x.shape[0])
    is_probs = _looks_like_probs(x) if kind == "auto" else kind == "probs"
    # max_k softmax(f)_k = exp(max_k log_softmax(f)_k), stable for any logit range.
    conf = x.max(axis=1) if is_probs else np.exp(_log_softmax(x).max(axis=1))
    correct = np.argmax(x, axis=1) == y  # np.argmax returns the first maximum
    return conf, correct


def _bin_index(conf: NDArray[np.float64], n_bins: int) -> NDArray[np.intp]:
    """0-based bin of each confidence: bin b (1-based) = ((b−1)/B, b/B], 0 in the first."""
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins  # b/B, computed in float64
    # searchsorted 'left' gives the first edge >= c, i.e. the b with (b−1)/B < c <= b/B.
    idx = np.searchsorted(edges, conf, side="left")
    return np.clip(idx, 1, n_bins) - 1


@dataclass(frozen=True)
class ReliabilityStats:
    """Per-bin statistics of a reliability diagram (bins ((b−1)/B, b/B], b = 1..B)."""

    edges: NDArray[np.float64]
    count: NDArray[np.int64]
    mean_confidence: NDArray[np.float64]  # NaN for an empty bin
    accuracy: NDArray[np.float64]  # NaN for an empty bin
    ece: float

    def to_dict(self) -> dict[str, Any]:
        def clean(a: NDArray[Any]) -> list[float | None]:
            return [None if math.isnan(float(v)) else float(v) for v in a]

        return {
            "edges": [float(v) for v in self.edges],
            "count": [int(v) for v in self.count],
            "mean_confidence": clean(self.mean_confidence),
            "accuracy": clean(self.accuracy),
            "ece": self.ece,
        }


def _bin_sums(
    conf: NDArray[np.float64], correct: NDArray[np.bool_], n_bins: int
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    idx = _bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    # bincount with weights sums in float64 (its stubs say int).
    sum_conf = np.asarray(np.bincount(idx, weights=conf, minlength=n_bins), dtype=np.float64)
    sum_acc = np.asarray(
        np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins), dtype=np.float64
    )
    return count, sum_conf, sum_acc


def _ece_from_sums(
    count: NDArray[np.int64], sum_conf: NDArray[np.float64], sum_acc: NDArray[np.float64]
) -> float:
    # (|B_b|/n)|acc_b − conf_b| = |Σ_{i∈B_b}(a_i − p̂_i)| / n: no division by empty bins.
    return float(np.abs(sum_acc - sum_conf).sum() / count.sum())


def _check_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def reliability_from_confidences(
    conf: NDArray[np.float64], correct: NDArray[np.bool_], n_bins: int = 10
) -> ReliabilityStats:
    """Reliability bins and ECE from per-sample confidences p̂_i and correctness a_i.

    Same bins as :func:`reliability_diagram` (which starts from logits or probabilities); this
    works from streamed (p̂, a) pairs.
    """
    _check_bins(n_bins)
    count, sum_conf, sum_acc = _bin_sums(
        np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=bool), n_bins
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / count, np.nan)
        acc = np.where(count > 0, sum_acc / count, np.nan)
    return ReliabilityStats(
        edges=np.arange(n_bins + 1, dtype=np.float64) / n_bins,
        count=count,
        mean_confidence=mean_conf,
        accuracy=acc,
        ece=_ece_from_sums(count, sum_conf, sum_acc),
    )


def reliability_diagram(
    probs_or_logits: Any, labels: Any, n_bins: int = 10, *, kind: InputKind = "auto"
) -> ReliabilityStats:
    """Per-bin count, mean confidence conf(B_b) and accuracy acc(B_b), plus the ECE."""
    conf, correct = confidence_and_correct(probs_or_logits, labels, kind)
    return reliability_from_confidences(conf, correct, n_bins)


def ece(probs_or_logits: Any, labels: Any, n_bins: int = 10, *, kind: InputKind = "auto") -> float:
    """Expected calibration error Σ_b (|B_b|/n) |acc(B_b) − conf(B_b)| (METHODS.md 4)."""
    return reliability_diagram(probs_or_logits, labels, n_bins, kind=kind).ece


def smooth_ece_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float = 1e-4) -> torch.Tensor:
    """Smooth ECE L = (1/n) Σ_i sqrt((p̂_i − a_i)² + β), differentiable in the logits.

    p̂_i = max_k softmax(f_i)_k carries the gradient (into the arg-max logit's softmax);
    a_i = 1[argmax f_i = y_i] is a constant. Computed in the logits' dtype.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [n, N], got shape {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be [{logits.shape[0]}], got shape {tuple(labels.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    conf = torch.softmax(logits, dim=1).max(dim=1).values
    correct = (logits.detach().argmax(dim=1) == labels).to(logits.dtype)
    return torch.sqrt((conf - correct) ** 2 + beta).mean()


def soft_binned_ece_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 1e-6,
    *,
    n_bins: int = 10,
    softness: float = 0.5,
) -> torch.Tensor:
    """Soft-binned ECE L = Σ_b (sqrt(g_b² + β) − sqrt(β)), a loss whose minimiser is calibrated.

    p̂_i = max_k softmax(f_i)_k (carries the gradient), a_i = 1[argmax f_i = y_i] (constant);
    soft bin membership m_ib = softmax_b(−(p̂_i − c_b)² / (2 (s/B)²)), c_b = (b − ½)/B, s =
    ``softness`` in bin widths; g_b = (1/n) Σ_i m_ib (p̂_i − a_i) = (W_b/n)(conf_b − acc_b)
    with W_b = Σ_i m_ib. As s → 0 the membership becomes the bin ((b−1)/B, b/B] (up to the
    edges) and with β → 0, L → the binned ECE Σ_b (|B_b|/n)|acc_b − conf_b|.

    Why it targets calibration: L ≥ 0 and L = 0 exactly when every soft bin's mean confidence
    equals its mean correctness; a predictor with E[a | p̂] = p̂ makes every g_b vanish in
    expectation, and where every g_b = 0 the gradient is 0 (d sqrt(g² + β)/dg = 0 at g = 0).
    The per-sample Smooth ECE (:func:`smooth_ece_loss`) instead pulls each p̂_i towards its own
    a_i (the median of correctness). Computed in the logits' dtype.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [n, N], got shape {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be [{logits.shape[0]}], got shape {tuple(labels.shape)}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be >= 0, got {beta}")
    _check_bins(n_bins)
    if not (math.isfinite(softness) and softness > 0):
        raise ValueError(f"softness must be > 0 (in bin widths), got {softness}")
    conf = torch.softmax(logits, dim=1).max(dim=1).values
    correct = (logits.detach().argmax(dim=1) == labels).to(logits.dtype)
    centres = (torch.arange(n_bins, dtype=logits.dtype, device=logits.device) + 0.5) / n_bins
    width = softness / n_bins
    member = torch.softmax(-((conf[:, None] - centres) ** 2) / (2 * width**2), dim=1)
    gap = (member * (conf - correct)[:, None]).sum(dim=0) / logits.shape[0]
    return (torch.sqrt(gap**2 + beta) - math.sqrt(beta)).sum()


CALIBRATION_LOSSES = {"smooth_ece": smooth_ece_loss, "soft_binned_ece": soft_binned_ece_loss}
"""Calibration losses by name: ``smooth_ece`` (the paper's), ``soft_binned_ece`` (fguide's)."""


def calibration_loss_fn(name: str) -> Callable[..., torch.Tensor]:
    """The calibration loss called ``name``: ``loss(logits, labels, beta) -> scalar tensor``.

    ``smooth_ece`` (:func:`smooth_ece_loss`, the paper's; β = 1e−4 smooths per-sample gaps) or
    ``soft_binned_ece`` (:func:`soft_binned_ece_loss`; its default β = 1e−6 smooths per-bin
    gaps, which are about B times smaller). Only the second is minimised by a calibrated
    predictor.
    """
    if name not in CALIBRATION_LOSSES:
        raise ValueError(
            f"calibration_loss must be one of {', '.join(CALIBRATION_LOSSES)}; got {name!r}"
        )
    return CALIBRATION_LOSSES[name]


@dataclass
class _StepAccum:
    count: NDArray[np.int64]
    sum_conf: NDArray[np.float64]
    sum_acc: NDArray[np.float64]
    sum_target: float = 0.0
    confidences: list[NDArray[np.float64]] = field(default_factory=list)


class TrajectoryCalibration:
    """Calibration of the guiding classifier along a sampling trajectory.

    Feed it once or more per step with :meth:`update` (step index, the logits the classifier
    produced on its guidance input, the target labels). Per step it reports ECE, accuracy
    (argmax = target), mean confidence p̂, mean target probability p_y, and the mean p̂ of the
    25% most confident samples (the ⌈n/4⌉ largest); ``integral_ece`` is the mean of the
    per-step ECEs over the steps seen.
    """

    def __init__(self, n_bins: int = 10) -> None:
        _check_bins(n_bins)
        self.n_bins = n_bins
        self._steps: dict[int, _StepAccum] = {}

    def update(self, step: int, logits: Any, labels: Any) -> None:
        """Add a batch of (logits [B, N], target labels [B]) observed at sampling step ``step``."""
        x = _to_numpy_2d(logits, "logits")
        y = _labels_1d(labels, x.shape[0])
        logp = _log_softmax(x)
        conf = np.exp(logp.max(axis=1))
        correct = np.argmax(x, axis=1) == y
        target_prob = float(np.exp(logp[np.arange(x.shape[0]), y]).sum())
        self.update_confidences(step, conf, correct, target_prob)

    def update_confidences(
        self, step: int, confidence: Any, correct: Any, target_prob_sum: float
    ) -> None:
        """Add per-sample statistics already computed elsewhere (e.g. on a GPU): confidence
        p̂ = max_k p_k, correctness 1[argmax = y], and Σ_i p_{y_i} over the samples."""
        conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
        hit = np.asarray(correct).reshape(-1).astype(bool)
        if conf.shape != hit.shape:
            raise ValueError(f"confidence {conf.shape} and correct {hit.shape} differ in shape")
        count, sum_conf, sum_acc = _bin_sums(conf, hit, self.n_bins)
        acc = self._steps.get(int(step))
        if acc is None:
            self._steps[int(step)] = _StepAccum(
                count, sum_conf, sum_acc, float(target_prob_sum), [conf]
            )
        else:
            acc.count += count
            acc.sum_conf += sum_conf
            acc.sum_acc += sum_acc
            acc.sum_target += float(target_prob_sum)
            acc.confidences.append(conf)

    @property
    def steps(self) -> list[int]:
        return sorted(self._steps)

    def merge(self, other: TrajectoryCalibration) -> None:
        """Add another accumulator's observations (another batch, shard or process)."""
        if other.n_bins != self.n_bins:
            raise ValueError(f"cannot merge {other.n_bins} bins into {self.n_bins}")
        for k, o in other._steps.items():
            a = self._steps.get(k)
            if a is None:
                self._steps[k] = _StepAccum(
                    o.count.copy(),
                    o.sum_conf.copy(),
                    o.sum_acc.copy(),
                    o.sum_target,
                    list(o.confidences),
                )
            else:
                a.count += o.count
                a.sum_conf += o.sum_conf
                a.sum_acc += o.sum_acc
                a.sum_target += o.sum_target
                a.confidences.extend(o.confidences)

    def state(self) -> dict[str, NDArray[Any]]:
        """The per-step bin sums and confidences as arrays (one row per step), for saving."""
        steps = self.steps
        acc = [self._steps[k] for k in steps]
        return {
            "steps": np.asarray(steps, dtype=np.int64),
            "count": np.stack([a.count for a in acc]).astype(np.int64),
            "sum_conf": np.stack([a.sum_conf for a in acc]),
            "sum_acc": np.stack([a.sum_acc for a in acc]),
            "sum_target": np.asarray([a.sum_target for a in acc], dtype=np.float64),
            "conf": np.stack([np.concatenate(a.confidences) for a in acc]),
        }

    @classmethod
    def from_state(cls, state: dict[str, NDArray[Any]]) -> TrajectoryCalibration:
        """Inverse of :meth:`state`."""
        out = cls(int(state["count"].shape[1]))
        for j, k in enumerate(state["steps"].tolist()):
            out._steps[int(k)] = _StepAccum(
                state["count"][j].copy(),
                state["sum_conf"][j].copy(),
                state["sum_acc"][j].copy(),
                float(state["sum_target"][j]),
                [state["conf"][j]],
            )
        return out

    def step_stats(self, step: int) -> dict[str, float | int]:
        a = self._steps[step]
        n = int(a.count.sum())
        conf = np.sort(np.concatenate(a.confidences))[::-1]
        top = conf[: max(1, math.ceil(n / 4))]
        return {
            "step": step,
            "n": n,
            "ece": _ece_from_sums(a.count, a.sum_conf, a.sum_acc),
            "accuracy": float(a.sum_acc.sum() / n),
            "mean_confidence": float(a.sum_conf.sum() / n),
            "mean_target_prob": a.sum_target / n,
            "top25_mean_confidence": float(top.mean()),
        }

    def per_step_ece(self) -> list[float]:
        return [float(self.step_stats(s)["ece"]) for s in self.steps]

    @property
    def integral_ece(self) -> float:
        """Mean over steps of the per-step ECE (NaN before any update)."""
        e = self.per_step_ece()
        return float(np.mean(e)) if e else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary: settings, per-step statistics, integral ECE."""
        return {
            "n_bins": self.n_bins,
            "steps": [self.step_stats(s) for s in self.steps],
            "integral_ece": self.integral_ece if self._steps else None,
        }


# -- a classifier's calibration per noise level (fguide calibration) -------------------------


@dataclass
class LevelCalibration:
    """Calibration of the classifier at one noise level (t = None: clean images)."""

    t: int | None
    noise_std: float  # sqrt(1 − ᾱ_t); 0 for clean images
    n: int
    ece: float
    smooth_ece: float
    accuracy: float
    mean_confidence: float
    top25_confidence: float
    mean_target_prob: float
    reliability: ReliabilityStats

    @property
    def label(self) -> str:
        return "clean" if self.t is None else f"t={self.t}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "label": self.label,
            "noise_std": self.noise_std,
            "n": self.n,
            "ece": self.ece,
            "smooth_ece": self.smooth_ece,
            "accuracy": self.accuracy,
            "mean_confidence": self.mean_confidence,
            "top25_confidence": self.top25_confidence,
            "mean_target_prob": self.mean_target_prob,
            "reliability": self.reliability.to_dict(),
        }


@dataclass
class ClassifierCalibration:
    """Per-noise-level calibration of a classifier on labelled images."""

    levels: list[LevelCalibration]
    n_bins: int
    beta: float
    time_aware: bool
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": "classifier",
            "n_bins": self.n_bins,
            "smooth_ece_beta": self.beta,
            "time_aware": self.time_aware,
            "classifier_input": "x_t and t" if self.time_aware else "x_t (x0 when clean)",
            "noise_seed": self.seed,
            "levels": [lv.to_dict() for lv in self.levels],
        }
