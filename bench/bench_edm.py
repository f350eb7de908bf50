"""Benchmark EluCD's guided EDM sampler: guided / unguided time ratio (EluCD reports ~+5%).

Side by side in one run: for ``--repeats`` rounds (order rotated each round), deterministic
Heun with ``--steps`` steps, unguided and guided by a Softplus(5) ResNet on x/max(1, rms x)
(EluCD Algorithm 2, τ2 = 0), on the same initial noise; the ratio is the median over rounds of
the within-round ratio. Optionally the stochastic sampler (``--churn``, EDM's ImageNet-64
settings S_churn 40, S_min 0.05, S_max 50, S_noise 1.003).

Presets (random weights; timing does not depend on them):
- ``small`` (CPU default): a DhariwalUNet of EDM's layout at 32×32 with 64 channels, 1 block
  per level, ResNet-18; batch 4.
- ``64`` (GPU default): EDM's ``edm-imagenet-64x64-cond-adm`` configuration (DhariwalUNet,
  192 channels, mult 1,2,3,4, 3 blocks, attention at 32/16/8, fp16 on CUDA) and ResNet-101
  at 64×64; batch 64 — EluCD Table 8's setting.

    python bench/bench_edm.py [--preset small|64] [--steps 18] [--batch 4] [--out r.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch

import fguide
from fguide.models.edm import EDMDenoiser, EDMPrecond
from fguide.models.resnet import ImageClassifier, resnet
from fguide.runtime import resolve_device

PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(
        res=32, channels=64, mult=(1, 2, 2), blocks=1, attn=(16,), arch="resnet18", batch=4
    ),
    "64": dict(
        res=64, channels=192, mult=(1, 2, 3, 4), blocks=3, attn=(32, 16, 8), arch="resnet101",
        batch=64,
    ),
}  # fmt: skip


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--churn", action="store_true", help="EDM's stochastic settings")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    preset = args.preset or ("64" if dev.type == "cuda" else "small")
    c = PRESETS[preset]
    batch = args.batch or c["batch"]
    torch.manual_seed(0)
    net = EDMPrecond(
        c["res"], 3, label_dim=1000, use_fp16=dev.type == "cuda", model_channels=c["channels"],
        channel_mult=c["mult"], num_blocks=c["blocks"], attn_resolutions=c["attn"], dropout=0.0,
    )  # fmt: skip
    net = net.to(dev).eval().requires_grad_(False)
    den = EDMDenoiser(net)
    clf = ImageClassifier(resnet(c["arch"], softplus_beta=5.0)).to(dev).eval().requires_grad_(False)
    guide = fguide.ClassifierGuide(clf, fguide.objective("base", sampler="heun"), scale=0.004)
    sigmas = fguide.karras_sigmas(args.steps, 0.002, 80.0)
    noise = fguide.SampleNoise(0, range(batch))
    z = noise.initial((3, c["res"], c["res"]), device=dev)
    y = torch.arange(batch, device=dev) % 1000
    churn = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003) if args.churn else {}

    def run(guided: bool) -> float:
        sampler_noise = fguide.SampleNoise(1, range(batch))
        _sync(dev)
        t0 = time.perf_counter()
        fguide.heun(
            den, z, sigmas, labels=y, guide=guide if guided else None, noise=sampler_noise, **churn
        )
        _sync(dev)
        return time.perf_counter() - t0

    run(False), run(True)  # warm-up (allocator, kernels)
    ratios: list[float] = []
    times: dict[str, list[float]] = {"unguided": [], "guided": []}
    for r in range(args.repeats):
        order = (False, True) if r % 2 == 0 else (True, False)
        got = {g: run(g) for g in order}
        times["unguided"].append(got[False])
        times["guided"].append(got[True])
        ratios.append(got[True] / got[False])
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    result = {
        "preset": preset,
        "device": device or str(dev),
        "batch": batch,
        "steps": args.steps,
        "churn": bool(args.churn),
        "seconds_unguided": statistics.median(times["unguided"]),
        "seconds_guided": statistics.median(times["guided"]),
        "ratio_guided_over_unguided": statistics.median(ratios),
        "ratios": ratios,
    }
    print(
        f"EDM Heun {args.steps} steps ({'stochastic' if args.churn else 'deterministic'}), "
        f"{preset} preset, batch {batch}, {result['device']}: unguided "
        f"{result['seconds_unguided']:.2f} s, guided {result['seconds_guided']:.2f} s, "
        f"ratio {result['ratio_guided_over_unguided']:.3f} (EluCD: ~1.05 on GPU)"
    )
    if args.out:
        from fguide.io.files import atomic_write_json, provenance

        atomic_write_json(args.out, {**result, "provenance": provenance()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
