"""What one fine-tuning step and one held-out evaluation compute (METHODS.md section 4).

For a batch of n samples with logits f_i and labels y_i the training loss is

    L = CE + λ · L_cal,   CE = (1/n) Σ_i −log softmax(f_i)_{y_i},

with L_cal the calibration term named by ``calibration_loss``
(:data:`fguide.metrics.calibration.CALIBRATION_LOSSES`): the paper's Smooth ECE
L_sECE = (1/n) Σ_i sqrt((p̂_i − a_i)² + β), p̂_i = max_k softmax(f_i)_k, a_i = 1[argmax f_i =
y_i] (no gradient), or the soft-binned ECE. Both CE and L_sECE are means of per-sample terms, so
a batch split into micro-batches of sizes n_j accumulates Σ_j (n_j/n) L(micro-batch j): exactly
the full batch's gradient (up to float summation order), as ADM's ``classifier_train.py``
weights its micro-batches. (The soft-binned ECE is not a per-sample mean: micro-batching then
changes the loss; use it without ``microbatch``.)

What the classifier sees (``input``): ``noisy`` x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε with t
uniform over the training steps, called as f(x_t, t); ``clean`` x0; ``denoised`` the detached
x̂0 = clip(x̂0(x_t, t), −1, 1) of a diffusion model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

from fguide import rng as streams
from fguide.accel import autocast
from fguide.finetune.config import ClassifierInput, Precision
from fguide.finetune.data import TrainLoader
from fguide.metrics.calibration import calibration_loss_fn, reliability_diagram, smooth_ece_loss
from fguide.schedules import Process

__all__ = [
    "BatchStats",
    "X0Estimator",
    "accumulate_gradients",
    "call_classifier",
    "classifier_inputs",
    "evaluate_held_out",
    "training_loss",
]

X0Estimator = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""(x_t, t, y) -> x̂0: a diffusion model's clean-image estimate (``"denoised"`` input); y may
be None for an unconditional model."""


def training_loss(
    logits: Tensor,
    labels: Tensor,
    ece_weight: float,
    beta: float,
    calibration_loss: str = "smooth_ece",
) -> tuple[Tensor, Tensor, Tensor]:
    """(L, CE, L_cal) with L = CE + λ L_cal, computed in float32 or wider.

    ``calibration_loss`` names L_cal (:func:`fguide.metrics.calibration.calibration_loss_fn`).
    With λ = 0, L_cal is computed outside the graph (it is still logged): the backward pass
    is then exactly plain cross-entropy training's.
    """
    term = calibration_loss_fn(calibration_loss)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    ce = F.cross_entropy(logits, labels)
    if ece_weight == 0:
        with torch.no_grad():
            return ce, ce, term(logits, labels, beta)
    cal = term(logits, labels, beta)
    return ce + ece_weight * cal, ce, cal


calibration_loss = training_loss
"""Former name of :func:`training_loss` (kept for callers of ``fguide.finetune``)."""


def call_classifier(module: nn.Module, x: Tensor, t: Tensor | None) -> Tensor:
    out = module(x) if t is None else module(x, t)
    if not isinstance(out, Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"classifier output must be logits [B, N], got {shape}")
    return out


def classifier_inputs(
    x0: Tensor,
    labels: Tensor,
    kind: ClassifierInput,
    process: Process | None,
    generator: torch.Generator | None,
    denoiser: X0Estimator | None,
) -> tuple[Tensor, Tensor | None]:
    """(input, timesteps or None): x_t and t for "noisy", detached x̂0 for "denoised"."""
    if kind == "clean":
        return x0, None
    assert process is not None
    t = torch.randint(0, process.num_steps, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = process.q_sample(x0, t, noise)
    if kind == "noisy":
        return x_t, process.model_timesteps(t)
    assert denoiser is not None
    with torch.no_grad():
        return denoiser(x_t, process.model_timesteps(t), labels).detach().to(x0.dtype), None


@dataclass
class BatchStats:
    """Batch means of one training step (weighted over its micro-batches) and its logits."""

    loss: float
    ce: float
    calibration: float  # L_cal, the calibration term (Smooth ECE by default)
    logits: Tensor  # detached, float32, CPU
    labels: Tensor


def accumulate_gradients(
    module: nn.Module,
    x: Tensor,
    t: Tensor | None,
    labels: Tensor,
    *,
    ece_weight: float = 1.0,
    beta: float = 1e-4,
    calibration_loss: str = "smooth_ece",
    microbatch: int | None = None,
    precision: Precision = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> BatchStats:
    """Add ∇L of the batch to the parameters' ``.grad``, micro-batch by micro-batch.

    Micro-batch j of n_j samples back-propagates (n_j/n) L_j, so the accumulated gradient is
    the full batch's ∇L (both terms of L are per-sample means). With ``scaler`` the weighted
    loss is scaled first (fp16).
    """
    n = x.shape[0]
    step = n if microbatch is None else min(microbatch, n)
    parts, all_logits = [], []
    for i in range(0, n, step):
        sl = slice(i, min(i + step, n))
        w = (sl.stop - sl.start) / n
        with autocast(x.device, precision):
            logits = call_classifier(module, x[sl], None if t is None else t[sl])
        loss, ce, sece = training_loss(logits, labels[sl], ece_weight, beta, calibration_loss)
        weighted = loss * w
        (scaler.scale(weighted) if scaler is not None else weighted).backward()
        parts.append(w * torch.stack([loss, ce, sece]).detach().double())
        all_logits.append(logits.detach().float())
    # One device sync per step, not one per micro-batch.
    loss_sum, ce_sum, sece_sum = torch.stack(parts).sum(0).tolist()
    logits_cpu = torch.cat(all_logits).cpu()
    return BatchStats(loss_sum, ce_sum, sece_sum, logits_cpu, labels.detach().cpu())


# -- evaluation --------------------------------------------------------------------------------

_T_BUCKETS = 4


def evaluate_held_out(
    module: nn.Module,
    loader: TrainLoader,
    indices: NDArray[np.int64],
    *,
    kind: ClassifierInput,
    process: Process | None,
    denoiser: X0Estimator | None,
    device: torch.device,
    precision: Precision,
    batch_size: int,
    seed: int,
    n_bins: int,
    beta: float,
    calibration_loss: str = "smooth_ece",
) -> dict[str, Any]:
    """ECE, accuracy, NLL, Smooth ECE (and the ``calibration_loss`` term when it is another)
    and the reliability diagram on ``indices``.

    Noisy inputs use per-sample (t, ε) seeded by (seed, sample index), so the before and
    after evaluations see the same x_t whatever the batch size; for them the result also has
    ECE and accuracy per quarter of the t range.
    """
    was_training = module.training
    module.eval()
    logits_all, labels_all, t_all = [], [], []
    try:
        with torch.no_grad():
            for start in range(0, len(indices), batch_size):
                idx = indices[start : start + batch_size]
                x0, y = loader.load(idx.tolist(), [None] * len(idx))
                x0, y = x0.to(device), y.to(device)
                t_in: Tensor | None = None
                if kind == "clean":
                    x_in = x0
                else:
                    assert process is not None
                    ts, noises = [], []
                    for i in idx:
                        g = streams.generator(seed, streams.FINETUNE_EVAL, int(i))
                        ts.append(torch.randint(0, process.num_steps, (1,), generator=g))
                        noises.append(torch.randn(x0.shape[1:], generator=g))
                    t_host = torch.cat(ts)
                    t = t_host.to(device)
                    x_t = process.q_sample(x0, t, torch.stack(noises).to(device, x0.dtype))
                    t_all.append(t_host)
                    if kind == "noisy":
                        x_in, t_in = x_t, process.model_timesteps(t)
                    else:
                        assert denoiser is not None
                        x_in = denoiser(x_t, process.model_timesteps(t), y).to(x0.dtype)
                with autocast(device, precision):
                    logits = call_classifier(module, x_in, t_in)
                logits_all.append(logits.float().cpu())
                labels_all.append(y.cpu())
    finally:
        module.train(was_training)
    logits, labels = torch.cat(logits_all), torch.cat(labels_all)
    stats = reliability_diagram(logits, labels, n_bins, kind="logits")
    result: dict[str, Any] = {
        "n": len(labels),
        "ece": stats.ece,
        "accuracy": float((logits.argmax(1) == labels).double().mean()),
        "mean_confidence": float(torch.softmax(logits.double(), 1).max(1).values.mean()),
        "nll": float(F.cross_entropy(logits.double(), labels)),
        "smooth_ece": float(smooth_ece_loss(logits.double(), labels, beta)),
        "reliability": stats.to_dict(),
    }
    if calibration_loss != "smooth_ece":
        term = calibration_loss_fn(calibration_loss)
        result[calibration_loss] = float(term(logits.double(), labels, beta))
    if t_all and process is not None:
        t_cat = torch.cat(t_all)
        edges = np.linspace(0, process.num_steps, _T_BUCKETS + 1).round().astype(int)
        buckets = []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            m = (t_cat >= int(lo)) & (t_cat < int(hi))
            if m.any():
                s = reliability_diagram(logits[m], labels[m], n_bins, kind="logits")
                acc = float((logits[m].argmax(1) == labels[m]).double().mean())
                buckets.append(
                    {
                        "t_range": [int(lo), int(hi) - 1],
                        "n": int(m.sum()),
                        "ece": s.ece,
                        "accuracy": acc,
                    }
                )
        result["by_t"] = buckets
    return result
