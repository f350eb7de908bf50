"""Which calibration loss calibrates? Smooth ECE against the soft-binned ECE, in the digits world.

The off-the-shelf classifier sees x̂0 during guidance. At a fixed diffusion time t its accuracy
on x̂0(x_t) ranges from that on clean images (small t) to chance (t near T). Two regimes are
picked by measuring the accuracy on x̂0 of every ``calib_select_every``-th training image over
a grid of t: the t whose accuracy is nearest each of ``config.calib_accuracy_targets``
(default ≈ 50 % and ≈ 90 %).
In each regime the classifier is fine-tuned on x̂0 of the training split (two fixed noise
draws per image) with CE alone, CE + Smooth ECE (the paper's, λ = 1, β = 1e−4) and
CE + soft-binned ECE (λ = 1, defaults), AdamW, the same seeded batches for every loss, and
measured on x̂0 of the held-out split (two other noise draws): ECE (10 bins), accuracy, NLL,
mean confidence. Per-sample Smooth ECE is minimised at the median of correctness, so where
accuracy exceeds 1/2 it should raise confidence and ECE; the soft-binned ECE should not.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fguide import rng as streams
from fguide.finetune import adm_x0_estimator
from fguide.metrics.calibration import calibration_loss_fn, ece
from fguide.models.loading import load_model
from fguide.schedules import Process
from fguide.worlds.digits import DigitsConfig, DigitsData, clean_classifier, mean_std
from fguide.worlds.digits_train import TrainedWorld, load_unet, training_process

__all__ = [
    "accuracy_by_t",
    "calibration_regime",
    "calibration_settings",
    "choose_regimes",
    "compare_calibration_losses",
    "denoised_bank",
]

LOSSES = ("ce", "smooth_ece", "soft_binned_ece")


def denoised_bank(
    unet: nn.Module, process: Process, x0: Tensor, t: int, draws: int, seed: int
) -> Tensor:
    """x̂0 = clip(x̂0(x_t, t), −1, 1) for ``draws`` seeded noise draws of every image
    (draw-major: [draws · n, C, H, W])."""
    estimate = adm_x0_estimator(unet, process, class_cond=False)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(draws):
            for i in range(0, len(x0), 256):
                xb = x0[i : i + 256]
                tt = torch.full((len(xb),), t, dtype=torch.long)
                x_t = process.q_sample(xb, tt, torch.randn(xb.shape, generator=gen))
                out.append(estimate(x_t, tt, None))
    return torch.cat(out)


def _measure(net: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = net(x).double()
    probs = logits.softmax(dim=1)
    return {
        "ece": ece(logits.numpy(), y.numpy(), 10, kind="logits"),
        "accuracy": float((logits.argmax(dim=1) == y).double().mean()),
        "nll": float(F.cross_entropy(logits, y)),
        "mean_confidence": float(probs.max(dim=1).values.mean()),
    }


def _finetune_once(
    base: nn.Module, x: Tensor, y: Tensor, loss: str, config: DigitsConfig, seed: int
) -> nn.Module:
    net = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(net.parameters(), lr=config.calib_lr, weight_decay=0.0)
    term = None if loss == "ce" else calibration_loss_fn(loss)
    rng = streams.numpy_rng(seed, streams.DIGITS_CALIB)
    batch = min(config.train_batch, len(x))
    for _ in range(config.calib_steps):
        idx = torch.from_numpy(rng.choice(len(x), batch, replace=False))
        logits = net(x[idx])
        total = F.cross_entropy(logits, y[idx])
        if term is not None:  # λ = 1, each loss at its own default β
            total = total + term(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return net.eval()


def accuracy_by_t(world: TrainedWorld, data: DigitsData, config: DigitsConfig) -> dict[int, float]:
    """The off-the-shelf classifier's accuracy on x̂0(x_t) of every ``calib_select_every``-th
    training image (one noise draw) at each t of ``calib_t_grid``: what picks the regimes."""
    unet, process = load_unet(world, config), training_process(config)
    clf = load_model(clean_classifier(), world.files["classifier"]).eval()
    subset = data.train[:: config.calib_select_every]
    x, y = data.x(subset), data.y(subset)
    acc = {}
    for t in config.calib_t_grid:
        bank = denoised_bank(unet, process, x, t, 1, config.seed + 7)
        acc[t] = _measure(clf, bank, y)["accuracy"]
    return acc


def choose_regimes(
    acc_by_t: dict[int, float], targets: tuple[float, ...]
) -> list[tuple[int, float]]:
    """(t, target) for each target accuracy: the grid t nearest it (a t used once, ties to
    the smaller t)."""
    chosen: list[tuple[int, float]] = []
    grid = list(acc_by_t)
    for target in sorted(targets):
        options = [t for t in grid if t not in {c for c, _ in chosen}] or grid
        chosen.append((min(options, key=lambda s: (abs(acc_by_t[s] - target), s)), target))
    return chosen


def calibration_regime(
    world: TrainedWorld, data: DigitsData, config: DigitsConfig, t: int, target: float
) -> dict[str, Any]:
    """One regime of the comparison (a job of its own): fine-tune on x̂0 at ``t`` with each
    loss and seed, measure on held-out x̂0."""
    unet, process = load_unet(world, config), training_process(config)
    clf = load_model(clean_classifier(), world.files["classifier"]).eval()
    train, held = data.train[:: config.calib_fit_every], data.held[:: config.calib_fit_every]
    xb = denoised_bank(unet, process, data.x(train), t, 2, config.seed + 11)
    yb = data.y(train).repeat(2)
    xh = denoised_bank(unet, process, data.x(held), t, 2, config.seed + 13)
    yh = data.y(held).repeat(2)
    res: dict[str, Any] = {"t": t, "target_accuracy": target, "before": _measure(clf, xh, yh)}
    for loss in LOSSES:
        runs = [
            _measure(_finetune_once(clf, xb, yb, loss, config, s), xh, yh)
            for s in config.calib_seeds
        ]
        res[loss] = {"per_seed": runs, **mean_std(runs, runs[0])}
    return res


def calibration_settings(config: DigitsConfig) -> dict[str, Any]:
    return {
        "steps": config.calib_steps,
        "lr": config.calib_lr,
        "batch": config.train_batch,
        "seeds": list(config.calib_seeds),
        "lambda": 1.0,
        "losses": list(LOSSES),
        "noise_draws": 2,
        "regimes_chosen_on_every": config.calib_select_every,
        "fit_and_measured_on_every": config.calib_fit_every,
    }


def compare_calibration_losses(
    world: TrainedWorld, data: DigitsData, config: DigitsConfig
) -> dict[str, Any]:
    """Held-out ECE after CE, CE + Smooth ECE and CE + soft-binned ECE fine-tuning, in a
    low-accuracy and a high-accuracy regime of x̂0 inputs; mean ± std over ``calib_seeds``
    (here, one regime after the other; :func:`fguide.worlds.digits_run.run_digits_world` runs
    the regimes as parallel jobs)."""
    acc = accuracy_by_t(world, data, config)
    regimes = {
        f"t{t}": calibration_regime(world, data, config, t, target)
        for t, target in choose_regimes(acc, config.calib_accuracy_targets)
    }
    return {
        "accuracy_by_t": {str(t): a for t, a in acc.items()},
        "regimes": regimes,
        "settings": calibration_settings(config),
    }
