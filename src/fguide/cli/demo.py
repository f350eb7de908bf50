"""``fguide demo``: every guidance method in the exact Gaussian-mixture world, in seconds."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from fguide.worlds.demo import METHOD_NAMES, DemoConfig, run_demo, table, write_demo

HELP = "Run every guidance method in the exact Gaussian-mixture world and report what it measures."


def configure(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--out", type=Path, default=Path("fguide-demo"), help="output folder")
    p.add_argument(
        "--seed", type=int, default=d.seed, help="sampling seed (validation seed = seed+1)"
    )
    p.add_argument("--dims", type=int, nargs="+", default=list(d.dims), help="world dimensions")
    p.add_argument(
        "--sharpness", type=float, default=d.sharpness, help="classifier overconfidence κ"
    )
    p.add_argument("--steps", type=int, default=d.steps, help="DDPM steps (respaced from 1000)")
    p.add_argument("--per-class", type=int, default=d.samples_per_class, help="samples per class")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHOD_NAMES),
        choices=METHOD_NAMES,
        metavar="M",
        help=f"methods to run (default all: {' '.join(METHOD_NAMES)})",
    )
    p.add_argument("--quick", action="store_true", help="small, fast run (tests, smoke checks)")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        config = DemoConfig.quick(
            seed=args.seed, sharpness=args.sharpness, methods=tuple(args.methods)
        )
    else:
        config = DemoConfig(
            dims=tuple(args.dims),
            seed=args.seed,
            validation_seed=args.seed + 1,
            sharpness=args.sharpness,
            steps=args.steps,
            samples_per_class=args.per_class,
            methods=tuple(args.methods),
        )
    total = len(config.dims) * len(config.methods)
    with tqdm(total=total, desc="demo", unit="method") as bar:
        result = run_demo(config, progress=bar.set_postfix_str, on_method=lambda: bar.update(1))
    for w in result.worlds:
        print(f"\nd = {w['dim']}, guidance scale γ = {w['guidance_scale']:g}")
        print(table(w))
    written = write_demo(result, args.out)
    print(
        f"\nwrote {', '.join(str(p) for p in written[:2])} and {len(written) - 2} plots "
        f"in {result.seconds:.1f} s"
    )
    return 0
