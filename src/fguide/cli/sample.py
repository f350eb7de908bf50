"""``fguide sample``: guided ImageNet sampling into ADM-format shards, resumable and distributed.

    fguide sample --config js-r101-128 --model 128x128_diffusion.pt \\
        --classifier-weights resnet101-cd907fc2.pth --out runs/js --num-samples 50000
    torchrun --nproc_per_node 8 -m fguide.cli.main sample ...   # same files, 8 GPUs

Rerunning the same command continues an interrupted run; see :mod:`fguide.sampling`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from fguide import defaults as D
from fguide.accel import PRECISIONS
from fguide.cli import CLASSIFIER_FORMS, softplus_beta_arg
from fguide.cli.sample_methods import add_guidance_method_flags
from fguide.config import DEFAULT_SHARD_SIZE, PARAM_RANGES, SampleConfig
from fguide.io import runs
from fguide.objectives import METHODS
from fguide.samplers import NonFiniteGuidanceError
from fguide.sampling import DistributedRunError, run_sampling
from fguide.sampling.configs import PAPER_CONFIGS, apply_paper_config
from fguide.weights import model_required_message, weights_dir_overrides

HELP = "Draw guided samples into resumable ADM-format shards (torchrun for several GPUs)."

# API names in errors raised below the configuration (the respacing, the objective's tilt group)
PARAM_ALIASES = {"timestep_respacing": "steps", "group_size": "tilt_group"}
R = PARAM_RANGES  # every numeric flag is parsed with its field's range

# Every SampleConfig field but these is a flag whose value stays None unless given: a --config
# supplies it, explicit flags override it.
_NOT_FLAGS = {"out", "model", "progress", "config_name"}
_OVERRIDABLE = tuple(f.name for f in dataclasses.fields(SampleConfig) if f.name not in _NOT_FLAGS)
_CONFIG_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(SampleConfig) if f.name not in _NOT_FLAGS
}


def _default(name: str) -> Any:
    return _CONFIG_DEFAULTS[name]


def configure(p: argparse.ArgumentParser) -> None:
    """The flags of ``fguide sample``, in four groups (the order ``--help`` lists them in)."""
    _run_flags(p)
    _model_flags(p)
    _classifier_flags(p)
    _guidance_flags(p)
    add_guidance_method_flags(p)  # the training-free family (issue 21)


def _run_flags(p: argparse.ArgumentParser) -> None:
    """The run: output folder, named configuration, sizes, seed, labels, precision, device."""
    io = p.add_argument_group("run")
    io.add_argument(
        "--out", type=Path, metavar="DIR", help="output folder (rerun into it to resume)"
    )
    io.add_argument(
        "--config",
        choices=list(PAPER_CONFIGS),
        metavar="NAME",
        help="a named paper configuration (--list-configs prints each with its settings and the "
        "number it reproduces); explicit flags override it: " + ", ".join(PAPER_CONFIGS),
    )
    io.add_argument(
        "--list-configs",
        action="store_true",
        help="print every named configuration: settings, weight files, what it reproduces",
    )
    io.add_argument(
        "--weights-dir",
        type=Path,
        metavar="DIR",
        help="find the --config's model, classifier and CLIP files here by name (where they "
        "come from: fguide weights list; fguide weights download CONFIG --dir DIR)",
    )
    io.add_argument(
        "--num-samples",
        type=R["num_samples"],
        metavar="N",
        help=f"number of samples (default {_default('num_samples')})",
    )
    io.add_argument(
        "--batch-size",
        type=R["batch_size"],
        metavar="N",
        help="samples per forward pass (default: from free GPU memory on CUDA, 64 on CPU)",
    )
    io.add_argument(
        "--seed",
        type=R["seed"],
        metavar="N",
        help=f"run seed; sample i depends on (seed, i) (default {_default('seed')})",
    )
    io.add_argument(
        "--labels",
        metavar="MODE",
        help="'uniform' (default), 'balanced' (seeded class permutations) or one class id",
    )
    io.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help="the diffusion network's precision: ADM's torso dtype, EDM's fp16 body, a "
        f"pipeline's network dtype (default {_default('precision')})",
    )
    io.add_argument(
        "--classifier-precision",
        choices=list(PRECISIONS),
        help="the classifier's forward/backward under autocast (with a latent pipeline's "
        "decoder) (default fp32)",
    )
    io.add_argument(
        "--compile",
        action="store_const",
        const=True,
        help="torch.compile the diffusion network (ADM UNet, EDM denoiser, pipeline network; "
        "compile time reported; pays off on long GPU runs)",
    )
    io.add_argument(
        "--channels-last",
        action="store_const",
        const=True,
        help="the diffusion network in channels_last memory format (GPUs, fp16/bf16)",
    )
    io.add_argument("--device", metavar="DEV", help="'auto' (default), 'cpu', 'cuda', 'cuda:1'")
    io.add_argument(
        "--shard-size",
        type=R["shard_size"],
        metavar="N",
        help=f"samples per shard file (default {DEFAULT_SHARD_SIZE}); fixed for a run",
    )
    io.add_argument(
        "--grid",
        type=R["grid"],
        metavar="N",
        help=f"samples in grid.png (default {_default('grid')}; 0: none)",
    )
    io.add_argument(
        "--max-shards",
        type=R["max_shards"],
        metavar="N",
        help="stop after this many shards per process, then rerun (default: no limit)",
    )
    io.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_flags(p: argparse.ArgumentParser) -> None:
    """The diffusion model, its sampler and steps, and what applies to one family only."""
    m = p.add_argument_group("diffusion model")
    m.add_argument(
        "--model",
        type=Path,
        metavar="FILE",
        help="diffusion model: an ADM checkpoint (plain state dict), an NVlabs EDM network "
        "pickle (read without running its code) or a diffusers pipeline folder (Stable "
        "Diffusion 1.x/2.x and SDXL, DiT, UNet2DModel; safetensors, offline)",
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
    m.add_argument(
        "--image-size",
        type=R["image_size"],
        metavar="N",
        help="expected image size, checked against the model (default: the model's); Stable "
        "Diffusion: the size generated (a multiple of 8; default the UNet's sample size × 8)",
    )
    m.add_argument(
        "--sampler",
        choices=D.SAMPLERS,
        help=f"default ddpm; heun for EDM networks; Stable Diffusion: ddim, ddpm or dpmpp-2m "
        f"(DPM-Solver++(2M), its default {D.SD_SAMPLER})",
    )
    m.add_argument(
        "--steps",
        metavar="STEPS",
        help=f"DDPM/DDIM respacing ('250', '10,10,5', 'ddim25'); Heun: steps (default {D.STEPS}); "
        f"Stable Diffusion: inference steps (default {D.SD_STEPS})",
    )
    m.add_argument("--eta", type=R["eta"], metavar="X", help=f"DDIM η (default {D.ETA:g})")
    m.add_argument(
        "--cfg-scale",
        type=R["cfg_scale"],
        metavar="X",
        help="classifier-free guidance scale: DiT pipelines (default 1: none), Stable Diffusion "
        f"(default {D.SD_CFG_SCALE['sd']:g}; SDXL {D.SD_CFG_SCALE['sdxl']:g})",
    )
    m.add_argument(
        "--cfg-channels",
        type=R["cfg_channels"],
        metavar="N",
        help="DiT: CFG on the first N latent channels only (DiT's own code: 3; default all)",
    )
    m.add_argument(
        "--dit-network",
        choices=["dit", "diffusers"],
        help="DiT pipelines: compute the network as DiT's own code does (dit, the default: its "
        "timestep frequencies and LayerNorm eps) or as diffusers' DiTTransformer2DModel does",
    )
    m.add_argument(
        "--guidance-form",
        choices=["algorithm3", "mean"],
        help="diffusers pipelines: EluCD's Algorithm 3 (DiT, default) or the DDPM mean shift",
    )
    m.add_argument(
        "--guidance-microbatch",
        type=R["guidance_microbatch"],
        metavar="N",
        help="DiT and Stable Diffusion pipelines: micro-batch of the guide pass through the VAE "
        "decoder "
        "(bounds its backward memory; same result; default: the whole batch)",
    )
    m.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        help="Stable Diffusion: the unconditional prompt of classifier-free guidance (default: "
        "'', or SDXL's zero embeddings when its index says force_zeros_for_empty_prompt)",
    )
    m.add_argument(
        "--s-churn",
        type=R["s_churn"],
        metavar="X",
        help="Heun: EDM's stochastic churn (default 0)",
    )
    m.add_argument(
        "--s-tmin", type=R["s_tmin"], metavar="X", help="Heun: churn from this σ (default 0)"
    )
    m.add_argument(
        "--s-tmax", type=R["s_tmax"], metavar="X", help="Heun: churn up to this σ (default inf)"
    )
    m.add_argument(
        "--s-noise", type=R["s_noise"], metavar="X", help="Heun: EDM's S_noise (default 1)"
    )
    m.add_argument(
        "--no-clip-denoised",
        dest="clip_denoised",
        action="store_const",
        const=False,
        help="do not clip x̂0 to [-1, 1] (default: clipped, as ADM)",
    )


def _classifier_flags(p: argparse.ArgumentParser) -> None:
    """The guide: its spec, weights, prompts and the settings of one kind only."""
    c = p.add_argument_group("classifier")
    c.add_argument(
        "--classifier",
        "--guide",
        dest="classifier",
        metavar="SPEC",
        help=f"the guide: {CLASSIFIER_FORMS}; also 'adm' with --classifier-flags; a CLIP head's "
        "classes: --prompt, --prompt-file, or the 1000 ImageNet classes",
    )
    c.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        metavar="TEXT",
        help="Stable Diffusion: a prompt to generate (repeat for several: sample i takes "
        "prompt i mod n; a clip: guide scores it by default). Other models: a CLIP guide's "
        "prompt (repeat for several: a zero-shot classifier over them; one: cosine guidance)",
    )
    c.add_argument(
        "--prompt-file",
        type=Path,
        metavar="FILE",
        help="--prompt's prompts from a file, one a line ('#' comments)",
    )
    c.add_argument(
        "--guide-prompt",
        dest="guide_prompts",
        action="append",
        metavar="TEXT",
        help="Stable Diffusion with a clip: guide: the guide's prompt(s), when they differ "
        "from the generated ones (default: the --prompt prompts)",
    )
    c.add_argument(
        "--guide-prompt-file",
        type=Path,
        metavar="FILE",
        help="--guide-prompt's prompts from a file, one a line",
    )
    c.add_argument(
        "--target",
        metavar="PROMPT",
        help="CLIP: the prompt (index or text) every sample is guided toward (default: "
        "labels drawn over the prompts; Stable Diffusion: sample i's prompt i mod n); "
        "Stable Diffusion with a classifier guide: its class id",
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
    c.add_argument(
        "--classifier-resize",
        type=R["classifier_resize"],
        metavar="N",
        help="resize ResNet inputs to N×N (default: native size)",
    )
    c.add_argument(
        "--softplus-beta",
        type=softplus_beta_arg,
        metavar="BETA",
        help=f"ResNet ReLU → Softplus(β) (default {D.softplus_beta('ddpm'):g}; Heun "
        f"{D.softplus_beta('heun'):g}; 'relu' keeps ReLU)",
    )


def _guidance_flags(p: argparse.ArgumentParser) -> None:
    """The objective and its parameters, the scale and the samplers' guidance options."""
    g = p.add_argument_group("guidance")
    g.add_argument(
        "--method",
        choices=["none", *(x for x in METHODS if x != "f")],
        help="guidance method (default base; none: unguided)",
    )
    g.add_argument(
        "--scale",
        type=R["scale"],
        metavar="X",
        help=f"classifier scale γ (default {D.SCALE:g}; Heun: EluCD's G); with "
        "--guidance-method, the method's strength",
    )
    g.add_argument(
        "--tau1", type=R["tau1"], metavar="X", help=f"joint temperature τ1 (default {D.TAU1:g})"
    )
    g.add_argument(
        "--tau2",
        type=R["tau2"],
        metavar="X",
        help=f"marginal temperature τ2 (default {D.TAU2_RATIO:g} τ1; logsoftmax τ1; Heun 0)",
    )
    g.add_argument(
        "--alpha",
        type=R["alpha"],
        metavar="X",
        help=f"divergence weight α (rkl {D.ALPHA['rkl']:g}, others {D.ALPHA['js']:g})",
    )
    g.add_argument(
        "--eps", type=R["eps"], metavar="X", help=f"target smoothing ε (default {D.EPS:g})"
    )
    g.add_argument(
        "--entropy",
        action="store_const",
        const=True,
        help="add the entropy term to any method (default: only method entropy has it)",
    )
    g.add_argument(
        "--lam-max",
        type=R["lam_max"],
        metavar="X",
        help=f"entropy λ at the first step (default {D.LAM_MAX:g})",
    )
    g.add_argument(
        "--lam-min",
        type=R["lam_min"],
        metavar="X",
        help=f"entropy λ at the last step (default {D.LAM_MIN:g})",
    )
    g.add_argument(
        "--lam-schedule",
        choices=["linear", "cosine", "constant"],
        help=f"entropy λ's schedule from --lam-max to --lam-min (default {D.LAM_SCHEDULE})",
    )
    g.add_argument(
        "--t-tilt",
        type=R["t_tilt"],
        metavar="X",
        help=f"tilt temperature, with any method (default {D.T_TILT:g} for method tilted)",
    )
    g.add_argument(
        "--tilt-group",
        type=R["tilt_group"],
        metavar="N",
        help=f"tilt group size G: index blocks [jG, (j+1)G) (default {D.TILT_GROUP})",
    )
    g.add_argument(
        "--sine-factor",
        type=R["sine_factor"],
        metavar="X",
        help=f"γ_sine (default {D.SINE_FACTOR:g}; ADM classifier 0)",
    )
    g.add_argument(
        "--variance-tracking",
        choices=["per_sample", "first_sample"],
        help="DDPM σ²_max per sample (default) or EluCD's first-sample (batch-coupled)",
    )
    g.add_argument(
        "--guidance-input",
        choices=["x", "denoised"],
        help="Heun: the classifier sees x_i (default x) or D(x_i, σ_i) (denoised)",
    )


def _print_configs() -> None:
    for named in PAPER_CONFIGS.values():
        settings = " ".join(f"{k}={v}" for k, v in named.settings.items())
        print(f"{named.name}\n  {named.description}\n  reproduces: {named.reference}")
        files = ", ".join(f for f in (named.model_file, named.weights) if f)
        print(f"  files (fguide weights list): {files}\n  {settings}")


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    """The :class:`SampleConfig` of a command line (``--config`` first, then explicit flags)."""
    if args.out is None:
        raise ValueError("--out is required (the output folder)")
    if args.weights_dir is not None:
        vars(args).update(weights_dir_overrides(args.config, args.weights_dir, vars(args)))
    if args.model is None:
        raise ValueError(model_required_message(args.config))
    given: dict[str, Any] = {
        k: getattr(args, k) for k in _OVERRIDABLE if getattr(args, k, None) is not None
    }
    settings = apply_paper_config(args.config, given) if args.config else given
    return SampleConfig(out=args.out, model=args.model, progress=not args.no_progress, **settings)


def run(args: argparse.Namespace) -> int:
    if args.list_configs:
        _print_configs()
        return 0
    config = config_from_args(args)
    try:
        result = run_sampling(config)
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
    return list(runs.read_run(manifest.parent).manifest.get("missing_shards", []))
