"""ECE binning, Smooth ECE value and gradient, reliability diagrams, trajectory calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tolerances import assert_close

from fguide.metrics import (
    TrajectoryCalibration,
    confidence_and_correct,
    ece,
    reliability_diagram,
    smooth_ece_loss,
)
from fguide.metrics.calibration import calibration_loss_fn, soft_binned_ece_loss

F64 = torch.float64


def _reference_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """Loop over bins with the explicit membership rule (b-1)/B < c <= b/B, 0 in bin 1."""
    total = 0.0
    for b in range(1, n_bins + 1):
        lo, hi = (b - 1) / n_bins, b / n_bins
        member = (conf > lo) & (conf <= hi)
        if b == 1:
            member |= conf == 0
        if member.any():
            gap = abs(correct[member].mean() - conf[member].mean())
            total += member.sum() / len(conf) * gap
    return total


def test_bin_edges_are_right_closed() -> None:
    # Confidence exactly 0.3 (a float64 edge 3/10) belongs to bin 3 = (0.2, 0.3].
    probs = np.array(
        [
            [0.3, 0.25, 0.25, 0.2],  # conf 0.3 -> bin 3
            [0.0, 0.0, 0.0, 0.0],  # conf 0 -> bin 1
            [1.0, 0.0, 0.0, 0.0],  # conf 1 -> bin 10
            [0.1, 0.1, 0.1, 0.7],  # conf 0.7 -> bin 7 (0.7 == 7/10 in float64)
            [0.7000000000000001, 0.2999999999999999, 0.0, 0.0],  # just above 0.7 -> bin 8
        ]
    )
    stats = reliability_diagram(probs, np.zeros(5, dtype=np.int64), n_bins=10, kind="probs")
    expected = np.zeros(10, dtype=np.int64)
    expected[[2, 0, 9, 6, 7]] = 1
    np.testing.assert_array_equal(stats.count, expected)
    assert stats.edges[3] == 0.3
    assert stats.mean_confidence[2] == 0.3
    assert np.isnan(stats.accuracy[1]) and np.isnan(stats.mean_confidence[1])


def test_ece_hand_built_values() -> None:
    # Perfect calibration: 10 samples at confidence 0.7, 7 correct -> ECE 0.
    probs = np.tile([0.7, 0.2, 0.1], (10, 1))
    labels = np.array([0] * 7 + [1] * 3)
    # ECE: a sum over 10 samples of confidences and correctness, all of size ≤ 1
    assert_close(ece(probs, labels), 0.0, F64, depth=10, scale=1.0)
    # Two bins: 4 samples at 0.9 with 2 correct (gap 0.4), 6 at 0.55 with 6 correct (gap 0.45).
    probs = np.array([[0.9, 0.1]] * 4 + [[0.55, 0.45]] * 6)
    labels = np.array([0, 0, 1, 1] + [0] * 6)
    assert_close(ece(probs, labels), 0.4 * 0.4 + 0.6 * 0.45, F64, depth=10, scale=1.0)
    # Ties go to the lowest index: logits [1, 1, 0] predict class 0.
    conf, correct = confidence_and_correct(np.array([[1.0, 1.0, 0.0]] * 2), np.array([0, 1]))
    np.testing.assert_array_equal(correct, [True, False])
    assert_close(conf, np.full(2, 0.5 / (1 + 0.5 * np.exp(-1.0))), F64, depth=4)  # softmax


def test_ece_matches_reference_loop_and_logits_equal_probs() -> None:
    g = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(500, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (500,), generator=g)
    probs = torch.softmax(logits, dim=1)
    conf = probs.max(dim=1).values.numpy()
    correct = (logits.argmax(dim=1) == labels).numpy()
    depth = 500 + 7  # sums over 500 samples of softmaxes over 7 classes, terms of size ≤ 1
    for n_bins in (1, 5, 10, 15):
        value = ece(logits, labels, n_bins)
        assert_close(value, _reference_ece(conf, correct, n_bins), F64, depth, scale=1.0)
        assert_close(ece(probs, labels, n_bins), value, F64, depth, scale=1.0)  # probabilities
        by_kind = ece(probs.numpy(), labels.numpy(), n_bins, kind="probs")
        assert_close(by_kind, value, F64, depth, scale=1.0)
    assert ece(logits, labels, 10) > 0.05  # the random classifier is badly calibrated
    with pytest.raises(ValueError, match="n_bins"):
        ece(logits, labels, 0)
    with pytest.raises(ValueError, match="labels"):
        ece(logits, labels[:-1])


def test_smooth_ece_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    logits64 = 2.0 * torch.randn(64, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (64,), generator=g)
    labels[:20] = logits64[:20].argmax(dim=1)  # a mix of correct and wrong predictions
    beta = 1e-4

    # Float64 reference written differently: p̂ from log-softmax at the arg-max index.
    ref_logits = logits64.clone().requires_grad_(True)
    m = ref_logits.detach().argmax(dim=1)
    p_hat = torch.exp(ref_logits.gather(1, m[:, None])[:, 0] - ref_logits.logsumexp(dim=1))
    a = (m == labels).double()
    ref_loss = torch.sqrt((p_hat - a) ** 2 + beta).mean()
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits)

    x = logits64.clone().requires_grad_(True)
    loss = smooth_ece_loss(x, labels, beta)
    (grad,) = torch.autograd.grad(loss, x)
    # a mean over 64 samples of softmaxes over 10 classes; the gradient runs it back
    depth = 64 + 10
    assert_close(loss, ref_loss, F64, depth, scale=1.0)
    assert_close(grad, ref_grad, F64, 2 * depth)
    # Closed form: dL/df_k = (1/n) (p̂ − a)/sqrt((p̂ − a)² + β) · p̂ (1[k = m] − p_k).
    p = torch.softmax(logits64, dim=1)
    ph = p.max(dim=1).values
    coef = (ph - a) / torch.sqrt((ph - a) ** 2 + beta) * ph / 64
    closed = coef[:, None] * (torch.nn.functional.one_hot(m, 10).double() - p)
    assert_close(grad, closed, F64, 2 * depth)
    # float32 logits: same value and gradient to float32 precision.
    x32 = logits64.float().requires_grad_(True)
    loss32 = smooth_ece_loss(x32, labels, beta)
    (grad32,) = torch.autograd.grad(loss32, x32)
    assert_close(loss32, ref_loss, torch.float32, depth, scale=1.0)
    assert_close(grad32, ref_grad, torch.float32, 2 * depth)
    # beta -> the value is mean sqrt(gap² + β) >= sqrt(β), and a_i is not differentiated.
    assert loss.item() >= beta**0.5
    assert torch.autograd.gradcheck(
        lambda z: smooth_ece_loss(z, labels, beta), (x.detach().requires_grad_(True),)
    )


def test_reliability_stats() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(300, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 5, (300,), generator=g)
    stats = reliability_diagram(logits, labels, n_bins=8)
    conf, correct = confidence_and_correct(logits, labels)
    assert stats.count.sum() == 300
    b = np.clip(np.ceil(conf * 8).astype(int), 1, 8) - 1  # no conf here sits on an edge
    for i in range(8):
        if stats.count[i]:
            assert stats.count[i] == (b == i).sum()
            # bin means over ≤ 300 values of size ≤ 1
            assert_close(stats.mean_confidence[i], conf[b == i].mean(), F64, 300, scale=1.0)
            assert_close(stats.accuracy[i], correct[b == i].mean(), F64, 300, scale=1.0)
    assert stats.ece == ece(logits, labels, 8)
    json.dumps(stats.to_dict())  # the figure: tests/test_plots.py


def test_trajectory_calibration() -> None:
    g = torch.Generator().manual_seed(3)
    traj = TrajectoryCalibration(n_bins=10)
    per_step: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for step, sharp in ((9, 0.5), (5, 2.0), (0, 6.0)):
        for _ in range(2):  # two batches per step
            logits = sharp * torch.randn(40, 6, generator=g)
            labels = torch.randint(0, 6, (40,), generator=g)
            traj.update(step, logits, labels)
            per_step.setdefault(step, ([], []))
            per_step[step][0].append(logits)
            per_step[step][1].append(labels)
    assert traj.steps == [0, 5, 9]
    eces = []
    for step in traj.steps:
        logits = torch.cat(per_step[step][0])
        labels = torch.cat(per_step[step][1])
        s = traj.step_stats(step)
        p = torch.softmax(logits.double(), dim=1)
        conf = p.max(dim=1).values
        assert s["n"] == 80
        # means over 80 samples of softmaxes over 6 classes (computed from float32 logits:
        # the same rounded inputs on both sides), values of size ≤ 1
        depth = 80 + 6
        assert_close(s["ece"], ece(logits, labels), F64, depth, scale=1.0)
        accuracy = (logits.argmax(1) == labels).double().mean()
        assert_close(s["accuracy"], accuracy, F64, depth, scale=1.0)
        assert_close(s["mean_confidence"], conf.mean(), F64, depth, scale=1.0)
        target = p[torch.arange(80), labels].mean()
        assert_close(s["mean_target_prob"], target, F64, depth, scale=1.0)
        top = conf.sort(descending=True).values[:20].mean()
        assert_close(s["top25_mean_confidence"], top, F64, depth, scale=1.0)
        eces.append(s["ece"])
    assert_close(traj.integral_ece, float(np.mean(eces)), F64, depth=3, scale=1.0)
    d = json.loads(json.dumps(traj.to_dict()))
    assert [s["step"] for s in d["steps"]] == [0, 5, 9]
    assert d["integral_ece"] == traj.integral_ece
    # Sharper (later) steps are more confident.
    assert d["steps"][0]["mean_confidence"] > d["steps"][2]["mean_confidence"]


# -- the soft-binned ECE loss (a loss whose minimiser is calibrated) ---------------------------


def _constant_confidence_logits(p: torch.Tensor, n: int, n_classes: int = 10) -> torch.Tensor:
    """Logits whose softmax is [p, (1−p)/(N−1), ...] for all n rows (differentiable in p)."""
    rest = ((1 - p) / (n_classes - 1)).expand(n_classes - 1)
    return torch.log(torch.cat([p.reshape(1), rest])).expand(n, n_classes)


def _soft_ece_closed_form(p: float, acc: float, n_bins: int, softness: float, beta: float) -> float:
    """Every sample at confidence p, a fraction acc correct: g_b = m_b (p − acc)."""
    centres = (np.arange(n_bins) + 0.5) / n_bins
    z = -((p - centres) ** 2) / (2 * (softness / n_bins) ** 2)
    m = np.exp(z - z.max())
    m /= m.sum()
    return float(np.sum(np.sqrt((m * (p - acc)) ** 2 + beta) - np.sqrt(beta)))


def test_soft_binned_ece_tends_to_binned_ece() -> None:
    rng = np.random.default_rng(3)
    n, n_bins = 400, 10
    # Confidences away from the bin edges (the soft and hard bins differ only there).
    conf = (rng.integers(1, n_bins, n) + rng.uniform(0.1, 0.9, n)) / n_bins
    conf = np.clip(conf, 0.15, 0.99)
    probs = np.zeros((n, 4))
    probs[:, 0] = conf
    probs[:, 1:] = ((1 - conf) / 3)[:, None]
    labels = np.where(rng.uniform(size=n) < conf**2, 0, 1)  # miscalibrated: acc = conf²
    logits = torch.log(torch.from_numpy(probs))
    y = torch.from_numpy(labels)
    hard = ece(probs, labels, n_bins, kind="probs")
    assert hard > 0.05
    # Memberships at ≥ 0.01 from an edge with width 1e-4: exp(−5000) = 0, so the difference is
    # the rounding of sums over 400 samples and 10 bins.
    sharp = soft_binned_ece_loss(logits, y, 0.0, n_bins=n_bins, softness=1e-3)
    assert_close(sharp, hard, F64, depth=400 + n_bins, scale=1.0)
    # beta -> 0 converges too (each bin's sqrt(g² + β) is within sqrt(β) of |g|), and a soft
    # membership gives a different (smaller) value.
    beta = 1e-12
    near = soft_binned_ece_loss(logits, y, beta, n_bins=n_bins, softness=1e-3).item()
    assert abs(near - hard) <= n_bins * beta**0.5
    soft = soft_binned_ece_loss(logits, y, 0.0, n_bins=n_bins, softness=1.0).item()
    assert 0 < soft < hard - 1e-3


def test_soft_binned_ece_constant_confidence_closed_form_and_gradient() -> None:
    n, acc, beta, softness = 20, 0.7, 1e-6, 0.5
    y = torch.tensor([0] * 14 + [1] * 6)
    for p0 in (0.35, 0.62, 0.7, 0.83, 0.97):
        p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
        loss = soft_binned_ece_loss(_constant_confidence_logits(p, n), y, beta, softness=softness)
        (grad,) = torch.autograd.grad(loss, p)
        closed = _soft_ece_closed_form(p0, acc, 10, softness, beta)
        h = 1e-6
        fd = (
            _soft_ece_closed_form(p0 + h, acc, 10, softness, beta)
            - _soft_ece_closed_form(p0 - h, acc, 10, softness, beta)
        ) / (2 * h)
        # the loss and its closed form: sums over 20 samples and 10 bins of exponentials
        assert_close(loss, closed, F64, depth=20 + 10, scale=1.0)
        # not a rounding bound: the central difference's own error (truncation h² f‴/6 and
        # cancellation eps·|f|/h, ≈ 2e-10 here) is far below this
        assert abs(grad.item() - fd) < 1e-6 * max(1.0, abs(fd))


def test_calibrated_confidence_minimises_soft_ece_but_not_smooth_ece() -> None:
    # 70 % of the samples correct at one constant confidence p: the calibrated p is 0.7.
    y = torch.tensor([0] * 7 + [1] * 3)
    grid = np.linspace(0.2, 0.995, 160)

    def losses(p0: float) -> tuple[float, float, float, float]:
        out = []
        for fn in (soft_binned_ece_loss, smooth_ece_loss):
            p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
            loss = fn(_constant_confidence_logits(p, 10), y)
            (g,) = torch.autograd.grad(loss, p)
            out += [loss.item(), g.item()]
        return out[0], out[1], out[2], out[3]

    values = np.array([losses(p) for p in grid])
    assert abs(grid[np.argmin(values[:, 0])] - 0.7) <= grid[1] - grid[0]
    assert grid[np.argmin(values[:, 2])] == grid[-1]  # Smooth ECE: as confident as possible
    soft_lo, soft_lo_g, smooth_lo, smooth_lo_g = losses(0.6)
    _, soft_at_g, _, smooth_at_g = losses(0.7)
    _, soft_hi_g, _, smooth_hi_g = losses(0.8)
    assert soft_lo_g < 0 < soft_hi_g  # pushed towards 0.7 from both sides
    # Stationary at calibration: 0 up to the rounding of the gaps g (sums over 10 samples and
    # 10 bins of values ≤ 1), which d sqrt(g² + β)/dg = g / sqrt(β) scales by 1/sqrt(β).
    beta = 1e-6  # soft_binned_ece_loss's default
    assert_close(soft_at_g, 0.0, F64, depth=2 * (10 + 10), scale=beta**-0.5)
    assert smooth_lo_g < 0 and smooth_at_g < -0.3 and smooth_hi_g < 0  # pushed towards 1


def test_calibrated_sample_is_stationary_for_soft_ece_only() -> None:
    # Three groups of 10 samples at confidences 0.4, 0.6, 0.9 with exactly 4, 6, 9 correct:
    # calibrated at every confidence, so every soft bin's gap is 0 whatever the softness.
    rows, labels = [], []
    for p, k in ((0.4, 4), (0.6, 6), (0.9, 9)):
        probs = [p] + [(1 - p) / 4] * 4
        rows += [probs] * 10
        labels += [0] * k + [1] * (10 - k)
    logits = torch.log(torch.tensor(rows, dtype=torch.float64)).requires_grad_(True)
    y = torch.tensor(labels)
    for softness in (0.3, 1.0, 3.0):
        loss = soft_binned_ece_loss(logits, y, softness=softness)
        (g,) = torch.autograd.grad(loss, logits)
        depth = 30 + 10  # sums over 30 samples and 10 bins (the gradient: twice), size ≤ 1
        assert_close(loss, 0.0, F64, depth, scale=1.0)
        assert_close(g, torch.zeros_like(g), F64, 2 * depth, scale=1.0)
    (g_smooth,) = torch.autograd.grad(smooth_ece_loss(logits, y), logits)
    assert g_smooth.abs().max().item() > 1e-3
    # Shift every confidence up (over-confident): the soft-ECE gradient is no longer zero and
    # lowers the arg-max logit (descent lowers the confidence).
    over = (
        torch.log(
            torch.tensor(
                [[min(r[0] + 0.08, 0.99)] + [(1 - min(r[0] + 0.08, 0.99)) / 4] * 4 for r in rows]
            )
        )
        .double()
        .requires_grad_(True)
    )
    (g_over,) = torch.autograd.grad(soft_binned_ece_loss(over, y), over)
    assert (g_over[:, 0] > 0).all()


def test_calibration_loss_lookup_and_errors() -> None:
    assert calibration_loss_fn("smooth_ece") is smooth_ece_loss
    assert calibration_loss_fn("soft_binned_ece") is soft_binned_ece_loss
    with pytest.raises(ValueError, match="calibration_loss"):
        calibration_loss_fn("ece")
    z, y = torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="softness"):
        soft_binned_ece_loss(z, y, softness=0.0)
    with pytest.raises(ValueError, match="n_bins"):
        soft_binned_ece_loss(z, y, n_bins=0)
    with pytest.raises(ValueError, match="beta"):
        soft_binned_ece_loss(z, y, -1.0)
    with pytest.raises(ValueError, match="labels"):
        soft_binned_ece_loss(z, torch.zeros(2, dtype=torch.long))


def test_update_confidences_equals_update_from_logits() -> None:
    from fguide.metrics.calibration import TrajectoryCalibration

    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(40, 6)) * 3, rng.integers(0, 6, 40)
    a, b = TrajectoryCalibration(), TrajectoryCalibration()
    a.update(2, logits, labels)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    b.update_confidences(2, p.max(1), p.argmax(1) == labels, float(p[np.arange(40), labels].sum()))
    assert a.steps == b.steps == [2]
    # the same softmax over 6 classes written twice, then sums over 40 samples
    depth = 40 + 6
    assert_close(b.per_step_ece(), a.per_step_ece(), F64, depth, scale=1.0)
    stats_a, stats_b = a.step_stats(2), b.step_stats(2)
    assert stats_a.keys() == stats_b.keys()
    for key, value in stats_a.items():
        assert_close(stats_b[key], value, F64, depth, scale=max(1.0, abs(value)), msg=key)
