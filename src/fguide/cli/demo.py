"""``fguide demo``: every guidance method in an embedded world.

``--world gmm`` (default): the exact Gaussian-mixture world, in seconds. ``--world digits``:
small learned models on scikit-learn's handwritten digits (trained once and cached), every
method through ``fguide sample``'s run code, Smooth-ECE and soft-binned-ECE fine-tuning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from fguide.io.folders import DEMO_FILES, check_folder
from fguide.worlds.demo import METHOD_NAMES, DemoConfig, run_demo, table, write_demo

HELP = "Run every guidance method in an embedded world (exact Gaussian mixture, or digits)."


def configure(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument(
        "--world",
        choices=("gmm", "digits"),
        default="gmm",
        help="gmm: the exact Gaussian mixture (default, seconds); digits: learned models on "
        "scikit-learn's digits (first run trains and caches them)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default fguide-demo, or fguide-demo-digits)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="digits: the trained networks' cache (default $FGUIDE_CACHE_DIR/digits, else "
        "~/.cache/fguide/digits)",
    )
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


def _run_digits(args: argparse.Namespace) -> int:
    from fguide.worlds.digits import DigitsConfig
    from fguide.worlds.digits_run import run_digits_world

    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0; got {args.seed}")
    out = args.out or Path("fguide-demo-digits")
    config = DigitsConfig.quick_config() if args.quick else DigitsConfig()
    config = config.with_(seed=args.seed, seeds=tuple(args.seed + s for s in config.seeds))
    result = run_digits_world(out, config, cache_root=args.cache_dir)
    print(f"wrote {out / 'report.md'} ({result['timing_seconds']['total']:.0f} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.world == "digits":
        return _run_digits(args)
    args.out = args.out or Path("fguide-demo")
    check_folder(args.out, "demo", DEMO_FILES["demo"])  # before the run; claimed when written
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
