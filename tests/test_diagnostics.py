"""TrajectoryRecorder: device-side per-step statistics against a host recomputation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tolerances import assert_close

import fguide
from fguide.guidance import GuidanceResult
from fguide.schedules import make_process
from fguide.worlds.gmm import BayesClassifier, ExactEpsModel, GaussianMixture

F64 = torch.float64

MIX = GaussianMixture.circle()


def _host_curves(records: list[fguide.StepRecord], threshold: float) -> dict[str, list]:
    """The curves recomputed from the step records in numpy float64 (independent code)."""
    out: dict[str, list] = {k: [] for k in ("conf", "top", "grad", "van", "w", "ece", "acc", "t")}
    for r in records:
        assert r.guidance is not None
        f = r.guidance.logits.numpy().astype(np.float64)
        y = r.guidance.labels.numpy()
        p = np.exp(f - f.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        conf = p[np.arange(len(y)), y]
        out["conf"].append(conf.mean())
        out["top"].append(np.sort(conf)[::-1][: math.ceil(len(y) / 4)].mean())
        norm = np.sqrt((r.guidance.grad.numpy().reshape(len(y), -1) ** 2).sum(1))
        out["grad"].append(norm.mean())
        out["van"].append((norm < threshold).mean())
        out["w"].append(r.guidance.weights.max().item() if r.guidance.weights is not None else None)
        top1, correct = p.max(1), p.argmax(1) == y
        ece = 0.0
        for b in range(10):  # bins (b/10, (b+1)/10], the first also taking 0
            inside = (top1 > b / 10) & (top1 <= (b + 1) / 10) | ((b == 0) & (top1 == 0))
            ece += abs(correct[inside].sum() - top1[inside].sum()) / len(y)
        out["ece"].append(ece)
        out["acc"].append(correct.mean())
        out["t"].append(r.t.double().mean().item())
    return out


@pytest.mark.parametrize("method", ["js", "tilted"])
def test_recorder_curves_equal_a_host_recomputation(method: str) -> None:
    proc = make_process("linear", 1000, "8", "fixed_small")
    abar = make_process("linear", 1000, "")["alphas_cumprod"]
    labels = torch.tensor([0, 3, 5, 1, 2, 7, 4])
    kw = {"t_tilt": -0.5} if method == "tilted" else {"entropy": True}
    guide = fguide.ClassifierGuide(BayesClassifier(MIX), fguide.objective(method, **kw), 0.05)
    records: list[fguide.StepRecord] = []
    rec = fguide.TrajectoryRecorder(vanish_threshold=20.0)

    def both(r: fguide.StepRecord) -> None:
        records.append(r)
        rec(r)

    fguide.ddpm(
        ExactEpsModel(MIX, abar),
        torch.randn(7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
        proc,
        labels=labels,
        guide=guide,
        callback=both,
        clip_denoised=False,
    )
    assert len(rec._pending) == 8  # nothing read back during the loop
    c = rec.curves()
    assert not rec._pending
    host = _host_curves(records, 20.0)
    assert c["step"] == list(range(8))
    # Means over 7 samples of softmaxes over 8 classes (values ≤ 1), written twice in float64;
    # the gradient norm in float32 (GuidanceResult.grad_norm) over 2 coordinates.
    depth = 7 + 8
    assert_close(c["t"], host["t"], F64, depth=7)
    assert_close(c["confidence_mean"], host["conf"], F64, depth, scale=1.0)
    assert_close(c["confidence_top25"], host["top"], F64, depth, scale=1.0)
    assert_close(c["grad_norm"], host["grad"], torch.float32, depth=7 + 2)
    assert_close(c["vanished_fraction"], host["van"], F64, depth, scale=1.0)
    assert 0 < sum(host["van"]) < 8  # the threshold splits the samples at some steps
    assert_close(c["ece"], host["ece"], F64, depth, scale=1.0)
    assert_close(c["accuracy"], host["acc"], F64, depth, scale=1.0)
    if method == "tilted":
        # the largest weight, read back in float32 ... or float64: float32 bounds both
        assert_close(c["max_tilt_weight"], host["w"], torch.float32, depth=1)
        assert all(w > 1 for w in host["w"])
    else:
        assert c["max_tilt_weight"] == [None] * 8


def test_recorder_state_round_trip_and_merge_after_deferred_reads() -> None:
    proc = make_process("linear", 1000, "5", "fixed_small")
    abar = make_process("linear", 1000, "")["alphas_cumprod"]
    guide = fguide.ClassifierGuide(BayesClassifier(MIX), fguide.objective("base"), 0.05)
    recs = []
    for seed in (0, 1):
        rec = fguide.TrajectoryRecorder()
        fguide.ddpm(
            ExactEpsModel(MIX, abar),
            torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)),
            proc,
            labels=torch.tensor([0, 1, 2, 3]),
            guide=guide,
            callback=rec,
            clip_denoised=False,
        )
        recs.append(rec)
    merged = fguide.TrajectoryRecorder()
    merged.merge(recs[0])  # merging finalizes the pending steps of both sides
    merged.merge(recs[1])
    mean = [
        (a + b) / 2 for a, b in zip(*(r.curves()["confidence_mean"] for r in recs), strict=True)
    ]
    # two means over 4 samples, against their mean: sums of 8 values ≤ 1
    assert_close(merged.curves()["confidence_mean"], mean, F64, depth=8, scale=1.0)
    again = fguide.TrajectoryRecorder.from_state(merged.state())
    assert again.to_dict() == merged.to_dict()


def _crafted_record(rows: slice) -> fguide.StepRecord:
    """Five samples whose numbers are known by hand: softmax(f)_y = c exactly (two classes,
    f = log(c, 1 − c), y = 0), ‖∇S‖ = the first grad entry, tilt weights w."""
    c = torch.tensor([0.93, 0.18, 0.64, 0.77, 0.42], dtype=torch.float64)[rows]
    norm = torch.tensor([0.0, 3e-4, 5e-3, 2.0, 1.5e-3], dtype=torch.float64)[rows]
    w = torch.tensor([0.5, 1.5, 1.0, 0.7, 1.3], dtype=torch.float64)[rows]
    b = len(c)
    guidance = GuidanceResult(
        grad=torch.stack([norm, torch.zeros(b, dtype=torch.float64)], 1),
        logits=torch.stack([c.log(), (1 - c).log()], 1),
        labels=torch.zeros(b, dtype=torch.int64),
        weights=w,
    )
    x = torch.zeros(b, 2, dtype=torch.float64)
    return fguide.StepRecord(0, 1, torch.full((b,), 10), x, x, guidance)


@pytest.mark.parametrize("split", [None, 3])
def test_recorder_numbers_on_a_crafted_batch_by_hand(split: int | None) -> None:
    """confidence top-25% = mean of the ⌈5/4⌉ = 2 largest softmax(f)_y (⌊5/4⌋ = 1 and the
    lowest two differ); vanished = fraction with ‖∇S‖ < threshold; also after a merge of a
    3-sample and a 2-sample recorder (top-25% over the merged 5)."""
    if split is None:
        rec = fguide.TrajectoryRecorder(vanish_threshold=1e-3)
        rec(_crafted_record(slice(None)))
    else:
        rec, other = (fguide.TrajectoryRecorder(vanish_threshold=1e-3) for _ in range(2))
        rec(_crafted_record(slice(0, split)))
        other(_crafted_record(slice(split, None)))
        rec.merge(other)
    c = rec.curves()
    assert c["step"] == [0] and c["t"] == [10.0]
    # confidences from log c and log(1 − c) through a softmax, then means of 5 (values ≤ 1);
    # the gradient norm in float32
    depth = 5 + 4
    assert_close(c["confidence_mean"], [(0.93 + 0.18 + 0.64 + 0.77 + 0.42) / 5], F64, depth)
    assert_close(c["confidence_top25"], [(0.93 + 0.77) / 2], F64, depth)  # not 0.93, not 0.30
    norm = (3e-4 + 5e-3 + 2.0 + 1.5e-3) / 5
    assert_close(c["grad_norm"], [norm], torch.float32, depth=5)
    assert c["vanished_fraction"] == [2 / 5]  # norms 0 and 3e-4: counts
    assert_close(c["max_tilt_weight"], [1.5], torch.float32, depth=1)
    # top-1 confidences 0.93, 0.82, 0.64, 0.77, 0.58 (one per bin), correct for c > 1/2
    assert c["accuracy"] == [3 / 5]
    ece = (0.07 + 0.82 + 0.36 + 0.23 + 0.58) / 5
    assert_close(c["ece"], [ece], F64, depth, scale=1.0)
    s = rec.summary()
    assert s["vanished_mean"] == 2 / 5
    assert_close(s["max_tilt_weight"], 1.5, torch.float32, depth=1)
