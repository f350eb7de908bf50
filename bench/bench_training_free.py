"""Benchmark the training-free methods against EluCD: time and peak memory per step, and the
network evaluations per sample, side by side in one run.

Every method samples with :func:`fguide.ddpm` from the same model, classifier, labels and noise:
unguided, EluCD's mean shift (``elucd``, the base objective, scale 1) and DPS, FreeDoM, MPGD,
UGD and TFG at their defaults (:mod:`fguide.defaults`; the cost does not depend on the
strengths) plus UGD with m = 3 backward steps (TFG CIFAR-10 script's N_iter − 1) and
FreeDoM with two repeats. Rounds are interleaved (round-robin over the methods, rotated order,
each method twice in a row, the second timed), as in ``bench_sampling.py``, whose model and
memory helpers this reuses. A time ratio is the median over rounds of the ratio of two runs
within a round (on CPU from this thread's CPU time, which waiting for a shared core does not
inflate); the time per step is the best round's. The evaluations are counted by wrappers
around the ε-network and the classifier in a separate run: per sample and step, forward rows
and, of those, the ones whose graph was kept for a backward pass.

- CPU (default without CUDA): the tiny class-conditional UNet (16×16, 64 channels, learned Σ)
  and a ResNet-18 (Softplus 3) on x̂0, batch 8, 3 DDPM steps, one thread; peak memory is the
  CPU heap in use above its level at the start of the method's run (glibc ``mallinfo2``).
- GPU (``--preset 128``, the default with CUDA): ADM's ``128x128_diffusion`` (fp16 torso, random
  weights) and a ResNet-101, batch 16, 5 DDPM steps; ``torch.cuda.max_memory_allocated``.

    python bench/bench_training_free.py [--preset tiny|128] [--batch 8] [--steps 3] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _memory import heap_probe
from bench_sampling import _components, _PeakHeap, _sync
from torch import Tensor, nn

import fguide
from fguide import training_free as tf
from fguide.guidance import ClassifierGuide
from fguide.rng import SampleNoise
from fguide.sampling import sample_labels


def _methods(clf: Any) -> dict[str, Any]:
    obj = fguide.objective("base")
    return {
        "unguided": None,
        "elucd": ClassifierGuide(clf, obj, 1.0),
        "dps": tf.DPS(clf, obj),
        "freedom": tf.FreeDoM(clf, obj),
        "freedom_k2": tf.FreeDoM(clf, obj, recurrence=2),
        "mpgd": tf.MPGD(clf, obj),
        "ugd": tf.UGD(clf, obj),
        "ugd_m3": tf.UGD(clf, obj, backward_steps=3),
        "tfg": tf.TFG(clf, obj),
    }


class _Counted:
    """A network wrapper counting forward rows, and the rows whose graph was kept (backward)."""

    def __init__(self, net: Callable[..., Tensor]):
        self.net, self.model = net, net  # ``model``: classifier_dtype looks through it
        self.rows = self.grad_rows = 0

    def __call__(self, x: Tensor, *args: Any) -> Tensor:
        self.rows += x.shape[0]
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_rows += x.shape[0]
        return self.net(x, *args)


def _with_classifier(guide: Any, clf: Any) -> Any:
    import dataclasses

    if guide is None:
        return None
    return dataclasses.replace(guide, classifier=clf)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads)
    comp = _components(args.preset, device, args.batch, args.steps)
    assert comp.classifier is not None and comp.model is not None and comp.process is not None
    clf: nn.Module = comp.classifier.module
    methods = _methods(clf)
    names = list(methods)
    indices = list(range(args.batch))
    labels_np = sample_labels("uniform", 0, indices, 1000)
    labels = torch.as_tensor(labels_np, device=device)
    shape = (3, comp.image_size, comp.image_size)

    def sample(m: str, model: Any = None, guide: Any = None) -> None:
        noise = SampleNoise(0, indices)
        z = noise.initial(shape, device=device)
        fguide.ddpm(
            model or comp.model,
            z,
            comp.process,
            labels=labels,
            guide=methods[m] if guide is None else guide,
            noise=noise,
        )

    counts = {}
    for m in names:
        eps, cls = _Counted(comp.model), _Counted(clf)
        sample(m, eps, _with_classifier(methods[m], cls) if methods[m] is not None else None)
        per = args.batch * args.steps
        counts[m] = {
            "eps_per_sample_step": eps.rows / per,
            "eps_with_backward": eps.grad_rows / per,
            "classifier_per_sample_step": cls.rows / per,
            "classifier_with_backward": cls.grad_rows / per,
        }

    heap = None if on_gpu else heap_probe()

    def peak_memory(m: str) -> int:
        if on_gpu:
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            sample(m)
            _sync(device)
            return torch.cuda.max_memory_allocated(device) - before
        if heap is None:
            return 0
        with _PeakHeap(heap) as mem:
            sample(m)
        return mem.peak - mem.base

    def timed(m: str) -> tuple[float, float]:
        _sync(device)
        w0, c0 = time.perf_counter(), time.thread_time()
        sample(m)
        _sync(device)
        wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
        return wall, wall if on_gpu else cpu

    for m in names:  # warm-up
        timed(m)
    peaks = {m: peak_memory(m) for m in names}
    walls: dict[str, list[float]] = {m: [] for m in names}
    costs: dict[str, list[float]] = {m: [] for m in names}
    for r in range(args.repeats):
        for m in names[r % len(names) :] + names[: r % len(names)]:
            timed(m)  # untimed: whoever runs first after a switch of method pays for it
            wall, cost = timed(m)
            walls[m].append(wall)
            costs[m].append(cost)

    def paired(m: str, ref: str) -> float:
        return statistics.median(a / b for a, b in zip(costs[m], costs[ref], strict=True))

    results = {
        m: {
            "ms_per_step": 1000 * min(walls[m]) / args.steps,
            "time_vs_elucd": paired(m, "elucd"),
            "time_vs_unguided": paired(m, "unguided"),
            "peak_memory_bytes": peaks[m],
            "memory_vs_elucd": peaks[m] / peaks["elucd"] if peaks["elucd"] else None,
            **counts[m],
            "wall_times": walls[m],
            "cost_times": costs[m],
        }
        for m in names
    }
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "clock": "wall (synchronised)" if on_gpu else "thread CPU time",
        "memory": (
            "cuda max_memory_allocated above the start"
            if on_gpu
            else "peak CPU heap in use above the start (glibc mallinfo2, polled)"
        ),
        "results": results,
    }


def report(res: dict[str, Any]) -> str:
    lines = [
        f"device {res['device']} | torch {res['torch']} | threads {res['threads']} | preset "
        f"{res['preset']} | batch {res['batch']} | {res['steps']} DDPM steps | "
        f"{res['repeats']} interleaved rounds | ratios: median of in-round ratios of "
        f"{res['clock']} | memory: {res['memory']}",
        f"{'method':<11}{'ms/step':>9}{'time/elucd':>12}{'peak MiB':>10}{'mem/elucd':>11}"
        f"{'eps/step':>10}{'(+bwd)':>8}{'clf/step':>10}{'(+bwd)':>8}",
    ]
    for m, r in res["results"].items():
        mem = r["memory_vs_elucd"]
        lines.append(
            f"{m:<11}{r['ms_per_step']:>9.1f}{r['time_vs_elucd']:>12.2f}"
            f"{r['peak_memory_bytes'] / 2**20:>10.1f}{'' if mem is None else f'{mem:.2f}':>11}"
            f"{r['eps_per_sample_step']:>10.2f}{r['eps_with_backward']:>8.2f}"
            f"{r['classifier_per_sample_step']:>10.2f}{r['classifier_with_backward']:>8.2f}"
        )
    lines.append("eps/clf per step: network evaluations per sample and sampling step")
    return "\n".join(lines)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--preset", choices=["tiny", "128"], default=None, help="tiny: CPU default")
    p.add_argument("--batch", type=int, default=None, help="default 8 (tiny), 16 (128)")
    p.add_argument("--steps", type=int, default=None, help="default 3 (tiny), 5 (128)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args()
    gpu = torch.device(args.device).type == "cuda"
    args.preset = args.preset or ("128" if gpu else "tiny")
    big = args.preset == "128"
    args.batch = args.batch or (16 if big else 8)
    args.steps = args.steps or (5 if big else 3)
    res = run(args)
    print(report(res))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
