"""``fguide demo``: every guidance method in an embedded world.

``--world gmm`` (default): the exact Gaussian-mixture world, in seconds. ``--world digits``:
small learned models on scikit-learn's handwritten digits (trained once and cached), every
method through ``fguide sample``'s run code, Smooth-ECE and soft-binned-ECE fine-tuning.

A flag that does not apply to the chosen world is refused (one line naming it); a flag that
applies wins over ``--quick`` and ``--full``. Flags default to None so that "given" can be
told from "default"; the defaults are those of :class:`~fguide.worlds.demo.DemoConfig` and
:class:`~fguide.worlds.digits.DigitsConfig`, stated in the help.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fguide.cli import NONNEGATIVE_INT, POSITIVE_INT
from fguide.io.folders import DEMO_FILES, check_folder
from fguide.params import Range
from fguide.worlds.demo import METHOD_NAMES, DemoConfig, run_demo
from fguide.worlds.demo_report import table, write_demo
from fguide.worlds.digits import FAMILY_METHODS, DigitsConfig
from fguide.worlds.digits import METHODS as DIGITS_METHODS
from fguide.worlds.digits import NUM_CLASSES as DIGITS_CLASSES
from fguide.worlds.workers import MAX_DEFAULT_WORKERS, default_workers

HELP = "Run every guidance method in an embedded world (exact Gaussian mixture, or digits)."

# Flags of one world only, by dest (the other world refuses them).
_GMM_ONLY = {"dims": "--dims", "sharpness": "--sharpness"}
_DIGITS_ONLY = {"cache_dir": "--cache-dir", "full": "--full", "family": "--family"}


def configure(p: argparse.ArgumentParser) -> None:
    g, gq = DemoConfig(), DemoConfig.quick()
    d, dq, df = DigitsConfig(), DigitsConfig.quick_config(), DigitsConfig.full_config()
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
        metavar="DIR",
        help="output folder (default fguide-demo, or fguide-demo-digits)",
    )
    p.add_argument(
        "--seed",
        type=NONNEGATIVE_INT,
        default=None,
        metavar="N",
        help=f"gmm: sampling seed, validation seed N+1; digits: training seed, sampling seeds "
        f"N, N+1, ... ({len(d.seeds)}; --full {len(df.seeds)}, --quick {len(dq.seeds)}) "
        f"(default {g.seed})",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"methods to run (default: gmm all, digits all but the training-free family, "
        f"which --family adds; gmm: {' '.join(METHOD_NAMES)}; digits: "
        f"{' '.join(DIGITS_METHODS)})",
    )
    p.add_argument(
        "--steps",
        type=Range(int, 1, 1000),
        default=None,
        metavar="STEPS",
        help=f"DDPM steps, respaced from 1000 (default gmm {g.steps}, --quick {gq.steps}; "
        f"digits {d.sample_steps}, --quick {dq.sample_steps}, --full {df.sample_steps})",
    )
    p.add_argument(
        "--per-class",
        type=Range(int, 2),
        default=None,
        metavar="N",
        help=f"samples per class (digits: per class and seed) (default gmm "
        f"{g.samples_per_class}, --quick {gq.samples_per_class}; digits "
        f"{d.num_samples // DIGITS_CLASSES}, --quick {dq.num_samples // DIGITS_CLASSES}, "
        f"--full {df.num_samples // DIGITS_CLASSES})",
    )
    p.add_argument(
        "--workers",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="processes for the independent jobs (gmm: one world each; digits: training, "
        "runs, fits), one torch thread each; the results do not depend on it (default "
        f"{default_workers()}: the usable CPU cores, at most {MAX_DEFAULT_WORKERS}; --quick 1)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of seconds: gmm d = 2 only, fewer samples and steps; digits a tiny "
        "training budget (cached separately) whose numbers mean nothing",
    )
    w = p.add_argument_group("gmm world only")
    w.add_argument(
        "--dims",
        type=Range(int, 2),
        nargs="+",
        default=None,
        metavar="D",
        help=f"world dimensions, each >= 2 (default {' '.join(map(str, g.dims))}; --quick "
        f"{' '.join(map(str, gq.dims))})",
    )
    w.add_argument(
        "--sharpness",
        type=Range(float, 1),
        default=None,
        metavar="K",
        help=f"classifier overconfidence κ >= 1 (default {g.sharpness:g})",
    )
    dg = p.add_argument_group("digits world only")
    dg.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the trained networks' cache (default $FGUIDE_CACHE_DIR/digits, else "
        "~/.cache/fguide/digits)",
    )
    dg.add_argument(
        "--family",
        action="store_true",
        help=f"add the training-free family's rows ({' '.join(FAMILY_METHODS)}: each with its "
        "own strength sweep; about 1.5 more minutes on 2 cores) to the default rows or to "
        "--methods (the gmm world runs them by default)",
    )
    dg.add_argument(
        "--full",
        action="store_true",
        help="the larger configuration the default run was cut down from (longer training, "
        "more samples per seed; tens of minutes on 2 cores)",
    )


def _given(args: argparse.Namespace, dests: dict[str, str]) -> list[str]:
    return [flag for dest, flag in dests.items() if getattr(args, dest) not in (None, False)]


def _refuse_foreign_flags(args: argparse.Namespace) -> None:
    """One error naming every flag that does not apply to ``--world``."""
    foreign = _given(args, _DIGITS_ONLY if args.world == "gmm" else _GMM_ONLY)
    if foreign:
        raise ValueError(
            f"{', '.join(foreign)}: not used by --world {args.world} "
            f"({'digits' if args.world == 'gmm' else 'gmm'} world only)"
        )
    if args.quick and args.full:
        raise ValueError("--quick and --full exclude each other")


def _check_values(args: argparse.Namespace, valid_methods: tuple[str, ...]) -> None:
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1; got {args.workers}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0; got {args.seed}")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps must be in 1..1000 (respaced from 1000); got {args.steps}")
    if args.per_class is not None and args.per_class < 2:
        # a Fréchet distance needs a covariance: at least two samples of every class
        raise ValueError(f"--per-class must be >= 2; got {args.per_class}")
    if args.dims is not None and min(args.dims) < 2:
        raise ValueError(f"--dims: every dimension must be >= 2; got {args.dims}")
    if args.methods is not None:
        bad = [m for m in args.methods if m not in valid_methods]
        if bad:
            raise ValueError(
                f"--methods: unknown for --world {args.world}: {' '.join(bad)} "
                f"(choose from {' '.join(valid_methods)})"
            )


def _check_out(out: Path) -> None:
    """Make ``out`` and prove it writable before any computing (a temporary file, as every
    result is written), so that a wrong ``--out`` costs seconds, not the run."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fguide-write-check.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write there ({err.strerror or err})") from None


def _gmm_config(args: argparse.Namespace) -> DemoConfig:
    given: dict[str, Any] = {}
    if args.seed is not None:
        given.update(seed=args.seed, validation_seed=args.seed + 1)
    for dest, field in (("sharpness", "sharpness"), ("steps", "steps")):
        if getattr(args, dest) is not None:
            given[field] = getattr(args, dest)
    if args.per_class is not None:
        given["samples_per_class"] = args.per_class
    if args.dims is not None:
        given["dims"] = tuple(args.dims)
    if args.methods is not None:
        given["methods"] = tuple(args.methods)
    return DemoConfig.quick(**given) if args.quick else DemoConfig(**given)


def _digits_config(args: argparse.Namespace) -> DigitsConfig:
    if args.quick:
        config = DigitsConfig.quick_config()
    elif args.full:
        config = DigitsConfig.full_config()
    else:
        config = DigitsConfig()
    seed = config.seed if args.seed is None else args.seed
    given: dict[str, Any] = {"seed": seed, "seeds": tuple(seed + s for s in config.seeds)}
    if args.steps is not None:
        given["sample_steps"] = args.steps
    if args.per_class is not None:
        given["num_samples"] = args.per_class * DIGITS_CLASSES
    if args.methods is not None:
        given["methods"] = tuple(args.methods)
    if args.family:
        rows = given.get("methods", config.methods)
        given["methods"] = (*rows, *(m for m in FAMILY_METHODS if m not in rows))
    return config.with_(**given)


def _run_digits(args: argparse.Namespace) -> int:
    from fguide.worlds.digits_run import run_digits_world

    config = _digits_config(args)
    out = args.out or Path("fguide-demo-digits")
    _check_out(out)
    # --quick's jobs are smaller than a worker process's start-up (~3 s of imports)
    default = 1 if args.quick else default_workers()
    workers = default if args.workers is None else args.workers
    result = run_digits_world(out, config, cache_root=args.cache_dir, workers=workers)
    print(f"wrote {out / 'report.md'} ({result['timing_seconds']['total']:.0f} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    _refuse_foreign_flags(args)
    _check_values(args, METHOD_NAMES if args.world == "gmm" else DIGITS_METHODS)
    if args.world == "digits":
        return _run_digits(args)
    config = _gmm_config(args)
    if not 1 <= config.sharpness < math.inf:
        raise ValueError(
            f"--sharpness must be finite and >= 1 (κ = 1 is calibrated); got {config.sharpness}"
        )
    out = args.out or Path("fguide-demo")
    check_folder(out, "demo", DEMO_FILES["demo"])  # before the run; claimed when written
    _check_out(out)
    total = len(config.dims) * len(config.methods)
    # --quick's jobs are smaller than a worker process's start-up (~3 s of imports)
    default = 1 if args.quick else default_workers()
    workers = default if args.workers is None else args.workers
    with tqdm(total=total, desc="demo", unit="method") as bar:
        result = run_demo(
            config,
            progress=bar.set_postfix_str,
            on_method=lambda: bar.update(1),
            workers=workers,
        )
    for w in result.worlds:
        print(f"\nd = {w['dim']}, guidance scale γ = {w['guidance_scale']:g}")
        print(table(w))
    written = write_demo(result, out)
    print(
        f"\nwrote {', '.join(str(p) for p in written[:2])} and {len(written) - 2} plots "
        f"in {result.seconds:.1f} s"
    )
    return 0
