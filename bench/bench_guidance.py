"""Guidance-gradient cost per method relative to the EluCD base, and the demo's wall time.

Every method is one classifier forward and one backward (closed-form dS/df, one VJP), so the
regularisers should cost almost nothing: target ≤ 5% over the base. Methods are timed
interleaved (shuffled rounds, median of repeats) so that drift in machine load hits all alike.

    python bench/bench_guidance.py [--arch resnet50] [--size 128] [--batch 8] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fguide
from fguide.models.resnet import ImageClassifier, resnet

METHODS = {
    "base": dict(name="base"),
    "logsoftmax": dict(name="logsoftmax"),
    "entropy": dict(name="entropy"),
    "rkl": dict(name="rkl"),
    "fkl": dict(name="fkl"),
    "js": dict(name="js"),
    "hellinger": dict(name="hellinger"),
    "tilted": dict(name="tilted"),
    "js+entropy+tilt": dict(name="js", entropy=True, t_tilt=-0.2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    dev = torch.device(args.device)
    net = ImageClassifier(resnet(args.arch, softplus_beta=3.0)).to(dev).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev) * 2 - 1
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    objs = {k: fguide.objective(**v) for k, v in METHODS.items()}  # type: ignore[arg-type]

    def once(obj: fguide.Objective) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fguide.guidance_gradient(net, x, y, obj, progress=0.3)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for obj in objs.values():  # warm-up
        once(obj)
    times: dict[str, list[float]] = {k: [] for k in objs}
    order = list(objs)
    rng = random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(order)  # no method always runs first in a round
        for k in order:
            times[k].append(once(objs[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["base"]
    print(
        f"guidance gradient, {args.arch} on {args.batch}x3x{args.size}x{args.size}, "
        f"device {dev} ({torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'CPU'}, "
        f"{torch.get_num_threads()} threads), median of {args.repeats}"
    )
    print(f"{'method':<18}{'ms':>10}{'ratio to base':>16}")
    for k, v in med.items():
        print(f"{k:<18}{1000 * v:>10.1f}{v / base:>16.3f}")
    worst = max(v / base for k, v in med.items() if k != "base")
    print(f"largest ratio to base: {worst:.3f} (target <= 1.05)")

    # The load-insensitive answer: what a method adds to the base is its coefficient
    # computation c = dS/df (same forward, same single backward), timed on the logits alone.
    with torch.no_grad():
        logits = net(x)
    coeff: dict[str, float] = {}
    for k, obj in objs.items():
        reps = 200
        t0 = time.perf_counter()
        for _ in range(reps):
            obj.coefficients(logits, y, 0.3)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        coeff[k] = (time.perf_counter() - t0) / reps
    print("isolated cost of dS/df per call, as a share of one base guidance gradient:")
    print("  " + ", ".join(f"{k} {100 * v / base:.3f}%" for k, v in coeff.items()))

    result: dict = {
        "arch": args.arch,
        "size": args.size,
        "batch": args.batch,
        "device": str(dev),
        "median_seconds": med,
        "ratio_to_base": {k: v / base for k, v in med.items()},
    }
    if not args.skip_demo:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "fguide.cli.main", "demo", "--out", tmp],
                check=True,
                capture_output=True,
            )
            demo = time.perf_counter() - t0
        print(
            f"fguide demo (default settings, both worlds) wall time: {demo:.1f} s (target < 60 s)"
        )
        result["demo_wall_seconds"] = demo
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
