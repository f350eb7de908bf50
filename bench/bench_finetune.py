"""Training steps/s of Smooth-ECE fine-tuning, with and without the Smooth-ECE term.

For ADM's ``128x128_classifier`` (noise-aware: x_t = q_sample(x0, t), t uniform, linear
schedule, the timestep passed) and ResNet-50 at 128×128 (clean input), random weights, one
training step = build the classifier input, forward, CE + λ·sECE, backward, AdamW step
(:func:`fguide.finetune.accumulate_gradients`, as the training loop runs it). Data loading is
not timed (synthetic batches): the figure is the model's step rate.

λ = 1 and λ = 0 steps alternate (A B B A A B …) so that machine-load drift hits both alike;
the overhead ratio is median t(λ=1) / median t(λ=0) (the ratio of the minima is reported
too). With λ = 0 the Smooth ECE is computed outside the graph (it is logged), so the λ = 0 step
is plain cross-entropy training. Because whole-step timings on a busy machine scatter by more
than the effect, the loss terms are also timed on their own (forward and backward of
CE + λ·sECE on the [B, 1000] logits, many repetitions): that extra time divided by the step
time is the overhead, measured precisely.

Defaults run in about a minute and a half on CPU (batch 2 for ADM, 4 for ResNet-50, one
thread: on a shared 2-core machine two OpenMP threads stall at barriers whenever another job
holds a core, which scattered step times from 2 s to 18 s; one thread gave ±10%). On a CUDA
device both models use batch 64 and more steps, in fp32 and fp16 autocast.

    python bench/bench_finetune.py [--steps 6] [--threads 1] [--out bench_finetune.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fguide.finetune import Precision, accumulate_gradients
from fguide.models.presets import build_preset
from fguide.models.resnet import ImageClassifier, resnet
from fguide.schedules import make_process


def _step_fn(
    model: nn.Module, noisy: bool, batch: int, device: torch.device, precision: Precision
) -> Callable[[float], None]:
    """A closure running one full training step with Smooth-ECE weight λ."""
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, 3, 128, 128, generator=gen, device=device) * 2 - 1
    y = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    process = make_process("linear", 1000, "", "fixed_small")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(lam: float) -> None:
        t: Tensor | None = None
        x = x0
        if noisy:
            t = torch.randint(0, 1000, (batch,), generator=gen, device=device)
            x = process.q_sample(x0, t, torch.randn(x0.shape, generator=gen, device=device))
        opt.zero_grad(set_to_none=True)
        accumulate_gradients(model, x, t, y, ece_weight=lam, precision=precision, scaler=scaler)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(
    name: str,
    model: nn.Module,
    noisy: bool,
    batch: int,
    device: torch.device,
    precision: Precision,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    model.to(device).train()
    step = _step_fn(model, noisy, batch, device, precision)
    for _ in range(warmup):
        step(1.0)
        step(0.0)
    times: dict[float, list[float]] = {1.0: [], 0.0: []}
    for i in range(steps):
        for lam in (1.0, 0.0) if i % 2 == 0 else (0.0, 1.0):  # A B B A: no order bias
            _sync(device)
            t0 = time.perf_counter()
            step(lam)
            _sync(device)
            times[lam].append(time.perf_counter() - t0)
    best = {lam: min(v) for lam, v in times.items()}
    med = {lam: statistics.median(v) for lam, v in times.items()}
    loss_extra = _loss_term_seconds(batch, device)
    row = {
        "model": name,
        "device": str(device),
        "precision": precision,
        "batch": batch,
        "steps_timed_each": steps,
        "steps_per_s_with_sece": 1 / med[1.0],
        "steps_per_s_ce_only": 1 / med[0.0],
        "overhead_ratio": med[1.0] / med[0.0],
        "overhead_ratio_of_minima": best[1.0] / best[0.0],
        "sece_term_seconds": loss_extra,
        "sece_term_fraction_of_step": loss_extra / med[0.0],
        "step_seconds_with_sece": times[1.0],
        "step_seconds_ce_only": times[0.0],
    }
    print(
        f"{name:>20} {str(device):>6} {precision:>4} batch {batch:>3}: "
        f"{row['steps_per_s_with_sece']:8.3f} steps/s with sECE, "
        f"{row['steps_per_s_ce_only']:8.3f} CE only; ratio {row['overhead_ratio']:.3f} "
        f"(of minima {row['overhead_ratio_of_minima']:.3f}); sECE term alone "
        f"{loss_extra * 1e6:.0f} us = {row['sece_term_fraction_of_step']:.2e} of a step",
        flush=True,
    )
    return row


def _loss_term_seconds(batch: int, device: torch.device, reps: int = 200) -> float:
    """Extra seconds per step of the sECE term: fwd + bwd of CE + sECE minus CE alone."""
    from fguide.finetune import calibration_loss

    logits = torch.randn(batch, 1000, device=device, requires_grad=True)
    y = torch.randint(0, 1000, (batch,), device=device)

    def run(lam: float) -> float:
        best = float("inf")
        for _ in range(5):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                calibration_loss(logits, y, lam, 1e-4)[0].backward()
            _sync(device)
            best = min(best, (time.perf_counter() - t0) / reps)
        return best

    run(1.0)
    return max(0.0, run(1.0) - run(0.0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=6, help="timed steps per setting (CPU)")
    p.add_argument("--gpu-steps", type=int, default=20, help="timed steps per setting (GPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--adm-batch", type=int, default=2, help="CPU batch for ADM")
    p.add_argument("--resnet-batch", type=int, default=4, help="CPU batch for ResNet-50")
    p.add_argument("--gpu-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (see above)")
    p.add_argument("--no-cpu", action="store_true")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def models() -> list[tuple[str, nn.Module, bool]]:
        torch.manual_seed(0)
        return [
            ("128x128_classifier", build_preset("128x128_classifier"), True),
            ("resnet50", ImageClassifier(resnet("resnet50")), False),
        ]

    rows = []
    if not args.no_cpu:
        cpu = torch.device("cpu")
        for (name, model, noisy), batch in zip(
            models(), (args.adm_batch, args.resnet_batch), strict=True
        ):
            rows.append(
                bench_model(name, model, noisy, batch, cpu, "fp32", args.steps, args.warmup)
            )
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        for precision in ("fp32", "fp16"):
            for name, model, noisy in models():
                rows.append(
                    bench_model(
                        name,
                        model,
                        noisy,
                        args.gpu_batch,
                        gpu,
                        precision,
                        args.gpu_steps,
                        max(args.warmup, 3),
                    )
                )
                del model
                torch.cuda.empty_cache()
    result = {
        "benchmark": "finetune training step, CE + lambda * Smooth ECE vs CE only",
        "rows": rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": sys.argv,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
