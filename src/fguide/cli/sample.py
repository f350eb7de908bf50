"""``fguide sample``: guided ImageNet sampling into ADM-format shards, resumable and distributed.

    fguide sample --config js-r101-128 --model 128x128_diffusion.pt \\
        --classifier-weights resnet101-cd907fc2.pth --out runs/js --num-samples 50000
    torchrun --nproc_per_node 8 -m fguide.cli.main sample ...   # same files, 8 GPUs

Rerunning the same command continues an interrupted run; see :mod:`fguide.sampling`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fguide.objectives import METHODS
from fguide.paper_configs import PAPER_CONFIGS, apply_paper_config
from fguide.samplers import NonFiniteGuidanceError
from fguide.sampling import (
    DEFAULT_SHARD_SIZE,
    DEFAULT_TILT_GROUP,
    PRECISIONS,
    SAMPLERS,
    DistributedRunError,
    SampleConfig,
    run_sampling,
)

HELP = "Draw guided samples into resumable ADM-format shards (torchrun for several GPUs)."

# Flags whose value is None unless given: a --config supplies them, explicit flags override.
_OVERRIDABLE = (
    "model_preset",
    "model_flags",
    "classifier",
    "classifier_weights",
    "classifier_flags",
    "classifier_input_mode",
    "classifier_resize",
    "softplus_beta",
    "method",
    "tau1",
    "tau2",
    "alpha",
    "eps",
    "lam_max",
    "lam_min",
    "lam_schedule",
    "entropy",
    "t_tilt",
    "tilt_group",
    "scale",
    "sine_factor",
    "variance_tracking",
    "guidance_input",
    "sampler",
    "steps",
    "eta",
    "clip_denoised",
    "num_samples",
    "batch_size",
    "seed",
    "labels",
    "precision",
    "device",
    "shard_size",
    "image_size",
    "grid",
    "max_shards",
)


def _softplus(text: str) -> float:
    return 0.0 if text.lower() in ("relu", "none", "0") else float(text)


def configure(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("run")
    io.add_argument(
        "--out", type=Path, metavar="DIR", help="output folder (rerun into it to resume)"
    )
    io.add_argument(
        "--config",
        choices=list(PAPER_CONFIGS),
        metavar="NAME",
        help="a named paper configuration (METHODS.md §7); explicit flags override it: "
        + ", ".join(PAPER_CONFIGS),
    )
    io.add_argument("--list-configs", action="store_true", help="print the configurations")
    io.add_argument(
        "--num-samples", type=int, metavar="N", help="number of samples (default 50000)"
    )
    io.add_argument(
        "--batch-size", type=int, metavar="B", help="samples per forward pass (default 64)"
    )
    io.add_argument(
        "--seed", type=int, metavar="S", help="run seed; sample i depends on (seed, i) (default 0)"
    )
    io.add_argument(
        "--labels",
        metavar="MODE",
        help="'uniform' (default), 'balanced' (seeded class permutations) or one class id",
    )
    io.add_argument("--precision", choices=list(PRECISIONS), help="UNet precision (default fp32)")
    io.add_argument("--device", metavar="DEV", help="'auto' (default), 'cpu', 'cuda', 'cuda:1'")
    io.add_argument(
        "--shard-size",
        type=int,
        metavar="N",
        help=f"samples per shard file (default {DEFAULT_SHARD_SIZE}); fixed for a run",
    )
    io.add_argument(
        "--grid", type=int, metavar="N", help="samples in grid.png (default 64; 0: none)"
    )
    io.add_argument(
        "--max-shards",
        type=int,
        metavar="K",
        help="stop after this many shards per process (then rerun)",
    )
    io.add_argument("--no-progress", action="store_true", help="no progress bar")

    m = p.add_argument_group("diffusion model")
    m.add_argument(
        "--model", type=Path, metavar="FILE", help="diffusion checkpoint (plain state dict)"
    )
    m.add_argument(
        "--model-preset",
        metavar="NAME",
        help="ADM preset, e.g. 128x128_diffusion (default: from the file)",
    )
    m.add_argument(
        "--model-flags",
        metavar="FLAGS",
        help="create_model/diffusion flags over the preset's: 'image_size=16 num_channels=32'",
    )
    m.add_argument("--image-size", type=int, metavar="N", help="expected image size (checked)")
    m.add_argument("--sampler", choices=SAMPLERS, help="default ddpm")
    m.add_argument(
        "--steps",
        metavar="STEPS",
        help="DDPM/DDIM respacing ('250', '10,10,5', 'ddim25'); Heun: steps (default 250)",
    )
    m.add_argument("--eta", type=float, metavar="X", help="DDIM η (default 0)")
    m.add_argument(
        "--no-clip-denoised",
        dest="clip_denoised",
        action="store_const",
        const=False,
        help="do not clip x̂0 to [-1, 1]",
    )

    c = p.add_argument_group("classifier")
    c.add_argument(
        "--classifier",
        metavar="SPEC",
        help="resnet18..resnet152, an ADM classifier preset (128x128_classifier), 'adm' "
        "(with --classifier-flags), or an import spec module:function returning an nn.Module "
        "that takes x̂0 in [-1, 1]",
    )
    c.add_argument("--classifier-weights", type=Path, metavar="FILE", help="classifier weight file")
    c.add_argument(
        "--classifier-flags", metavar="FLAGS", help="create_classifier flags (ADM classifiers)"
    )
    c.add_argument(
        "--classifier-input-mode",
        choices=["elucd", "imagenet"],
        help="ResNet input: x̂0 as is (elucd, default) or ImageNet-normalised",
    )
    c.add_argument("--classifier-resize", type=int, metavar="N", help="resize ResNet inputs to N×N")
    c.add_argument(
        "--softplus-beta",
        type=_softplus,
        metavar="BETA",
        help="ResNet ReLU → Softplus(β) (default 3; Heun 5; 'relu' keeps ReLU)",
    )

    g = p.add_argument_group("guidance (defaults: METHODS.md)")
    g.add_argument(
        "--method",
        choices=["none", *(x for x in METHODS if x != "f")],
        help="guidance method (default base; none: unguided)",
    )
    g.add_argument("--scale", type=float, metavar="X", help="classifier scale γ (Heun: EluCD's G)")
    g.add_argument("--tau1", type=float, metavar="X", help="joint temperature τ1 (default 1)")
    g.add_argument(
        "--tau2", type=float, metavar="X", help="marginal temperature τ2 (default 0.5 τ1)"
    )
    g.add_argument(
        "--alpha", type=float, metavar="X", help="divergence weight α (rkl 0.1, others 0.09)"
    )
    g.add_argument("--eps", type=float, metavar="X", help="target smoothing ε (default 0.1)")
    g.add_argument("--entropy", action="store_const", const=True, help="add the entropy term")
    g.add_argument("--lam-max", type=float, metavar="X", help="entropy λ at the first step (0.2)")
    g.add_argument("--lam-min", type=float, metavar="X", help="entropy λ at the last step (0.05)")
    g.add_argument("--lam-schedule", choices=["linear", "cosine", "constant"])
    g.add_argument("--t-tilt", type=float, metavar="X", help="tilt temperature (tilted: −0.2)")
    g.add_argument(
        "--tilt-group",
        type=int,
        metavar="G",
        help=f"tilt group size G: index blocks [jG, (j+1)G) (default {DEFAULT_TILT_GROUP})",
    )
    g.add_argument(
        "--sine-factor", type=float, metavar="X", help="γ_sine (default 0.3; ADM classifier 0)"
    )
    g.add_argument(
        "--variance-tracking",
        choices=["per_sample", "first_sample"],
        help="DDPM σ²_max per sample (default) or EluCD's first-sample (batch-coupled)",
    )
    g.add_argument("--guidance-input", choices=["x", "denoised"], help="Heun guidance input")


def _print_configs() -> None:
    for cfg in PAPER_CONFIGS.values():
        settings = " ".join(f"{k}={v}" for k, v in cfg.settings.items())
        print(f"{cfg.name}\n  {cfg.description}\n  reproduces: {cfg.reference}")
        print(f"  classifier weights: {cfg.weights}\n  {settings}")


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    """The :class:`SampleConfig` of a command line (``--config`` first, then explicit flags)."""
    if args.out is None:
        raise ValueError("--out is required (the output folder)")
    if args.model is None:
        raise ValueError("--model is required (the diffusion checkpoint)")
    given: dict[str, Any] = {
        k: getattr(args, k) for k in _OVERRIDABLE if getattr(args, k, None) is not None
    }
    settings = apply_paper_config(args.config, given) if args.config else given
    return SampleConfig(out=args.out, model=args.model, progress=not args.no_progress, **settings)


def run(args: argparse.Namespace) -> int:
    if args.list_configs:
        _print_configs()
        return 0
    cfg = config_from_args(args)
    try:
        result = run_sampling(cfg)
    except (NonFiniteGuidanceError, DistributedRunError) as err:
        print(f"fguide sample: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "fguide sample: interrupted; complete shards are kept, rerun the same command "
            "to continue",
            file=sys.stderr,
        )
        return 130
    if result.complete:
        print(f"{result.num_samples} samples in {result.samples}; manifest {result.manifest}")
    else:
        done = len(result.shards) - len(_missing(result.manifest))
        print(
            f"stopped with {done} of {len(result.shards)} shards written in {result.out}; "
            "rerun the same command to continue"
        )
    return 0


def _missing(manifest: Path) -> list[Any]:
    import json

    return list(json.loads(manifest.read_text()).get("missing_shards", []))
