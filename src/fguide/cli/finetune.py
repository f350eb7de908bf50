"""``fguide finetune``: calibrate a guidance classifier with CE + λ·Smooth ECE (METHODS.md 4).

    fguide finetune --classifier 128x128_classifier \\
        --classifier-weights 128x128_classifier.pt \\
        --data /data/imagenet/train --out runs/calib128 --batch-size 256 --microbatch 32

``--classifier`` is an ADM classifier preset (noise-aware: trained on x_t with t uniform over
the 1000 steps), a ResNet (``resnet50`` …: trained on clean images, or on a diffusion model's
x̂0 with ``--input denoised --denoiser PRESET --denoiser-weights FILE``), or
``module:function`` / ``file.py:function`` returning an ``nn.Module``. ``--data`` is a folder
of class subfolders (labels = sorted folder names' indices) or an ``.npz`` with ``arr_0``
(uint8 NHWC) and ``arr_1`` (labels). Rerunning the same command resumes from
``OUT/checkpoint.pt``; Ctrl-C (or SIGTERM) saves a checkpoint first. The result is
``OUT/model.pt`` (a plain state dict) and ``OUT/report.json`` (held-out ECE and accuracy
before and after).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import TYPE_CHECKING

from fguide.cli import CLASSIFIER_FORMS, POSITIVE_INT, add_hidden_alias, softplus_beta_arg

if TYPE_CHECKING:
    from torch import nn

    from fguide.finetune import FinetuneConfig, X0Estimator

HELP = "fine-tune a classifier with CE + lambda * Smooth ECE for calibrated guidance"

PARAM_ALIASES = {"n_bins": "bins"}  # FinetuneConfig's name of --bins


def _holdout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1) or a count >= 1, got {text!r}"
        )
    if value >= 1:
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"a held-out count must be an integer, got {text!r}")
        return int(value)
    return value


def configure(p: argparse.ArgumentParser) -> None:
    """The flags of ``fguide finetune``: the classifier and data, the training, the run."""
    from fguide.finetune import FinetuneConfig

    d = FinetuneConfig()  # its defaults are the flags' defaults
    _data_flags(p, d)
    _training_flags(p, d)
    _run_flags(p, d)


def _data_flags(p: argparse.ArgumentParser, d: FinetuneConfig) -> None:
    """The classifier, its weights and input, the data and the diffusion model."""
    from fguide import defaults
    from fguide.finetune.config import PARAM_RANGES as R

    D = " (default: %(default)s)"
    g = p.add_argument_group("classifier and data")
    g.add_argument(
        "--classifier", required=True, metavar="SPEC", help=f"the classifier: {CLASSIFIER_FORMS}"
    )
    g.add_argument(
        "--classifier-weights",
        metavar="FILE",
        help="initial weights (plain state dict, read weights_only; default: the preset's "
        "random initialisation)",
    )
    add_hidden_alias(g, "--weights", "classifier_weights")
    g.add_argument(
        "--data", required=True, metavar="PATH", help="folder of class subfolders, or an .npz"
    )
    g.add_argument(
        "--out", required=True, metavar="DIR", help="run folder (checkpoint, log, model, report)"
    )
    g.add_argument(
        "--input",
        choices=["noisy", "clean", "denoised"],
        help="what the classifier sees: x_t and t (ADM presets' default), the clean image "
        "(ResNets' and modules' default), or a diffusion model's x0 estimate",
    )
    g.add_argument(
        "--image-size",
        type=R["image_size"],
        metavar="N",
        help="training image size (default: the preset's, the npz's, or 128)",
    )
    g.add_argument(
        "--noise-schedule",
        choices=["linear", "cosine"],
        help="the forward process of --input noisy (default: the classifier's)",
    )
    g.add_argument(
        "--softplus-beta",
        type=softplus_beta_arg,
        metavar="BETA",
        help=f"ResNets: ReLU → Softplus(β) (default {defaults.softplus_beta('ddpm'):g}, EluCD's "
        f"DDPM value; Heun {defaults.softplus_beta('heun'):g}; 'relu' keeps ReLU)",
    )
    g.add_argument(
        "--classifier-input-mode",
        choices=["elucd", "imagenet"],
        default="elucd",
        help="ResNets: x in [-1, 1] as is (EluCD), or ImageNet-normalised" + D,
    )
    g.add_argument(
        "--classifier-resize",
        type=POSITIVE_INT,
        metavar="N",
        help="ResNets: resize inputs to N×N (default: native size)",
    )
    add_hidden_alias(g, "--input-mode", "classifier_input_mode", choices=("elucd", "imagenet"))
    add_hidden_alias(g, "--resize", "classifier_resize", type=POSITIVE_INT)
    g.add_argument(
        "--denoiser", metavar="NAME", help="ADM diffusion preset giving x0 for --input denoised"
    )
    g.add_argument("--denoiser-weights", metavar="FILE", help="weights of --denoiser")


def _training_flags(p: argparse.ArgumentParser, d: FinetuneConfig) -> None:
    """The optimizer, the loss and the batches."""
    from fguide.finetune.config import PARAM_RANGES as R
    from fguide.metrics.calibration import CALIBRATION_LOSSES

    D = " (default: %(default)s)"
    t = p.add_argument_group("training")
    t.add_argument(
        "--iterations",
        type=R["iterations"],
        default=d.iterations,
        metavar="N",
        help="optimizer steps" + D,
    )
    t.add_argument(
        "--batch-size",
        type=R["batch_size"],
        default=d.batch_size,
        metavar="N",
        help="samples per step" + D,
    )
    t.add_argument(
        "--microbatch",
        type=R["microbatch"],
        metavar="N",
        help="forward/backward chunk: the same update for smooth_ece (a per-sample mean); "
        "soft_binned_ece is then binned per chunk (default: the whole batch)",
    )
    t.add_argument("--lr", type=R["lr"], default=d.lr, metavar="X", help="AdamW learning rate" + D)
    t.add_argument(
        "--weight-decay",
        type=R["weight_decay"],
        default=d.weight_decay,
        metavar="X",
        help="AdamW's weight decay" + D,
    )
    t.add_argument(
        "--anneal-lr",
        action="store_true",
        help="lr * (1 - step/iterations), ADM's (default: constant lr)",
    )
    t.add_argument(
        "--lambda",
        "--ece-weight",
        dest="ece_weight",
        type=R["ece_weight"],
        default=d.ece_weight,
        metavar="X",
        help="weight of the calibration term" + D,
    )
    t.add_argument(
        "--calibration-loss",
        choices=list(CALIBRATION_LOSSES),
        default=d.calibration_loss,
        help="the calibration term: the paper's Smooth ECE, or the soft-binned ECE" + D,
    )
    t.add_argument(
        "--beta",
        type=R["beta"],
        default=d.beta,
        metavar="X",
        help="smoothing β of the calibration term" + D,
    )
    t.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default=d.precision,
        help="autocast dtype; fp16 uses a grad scaler" + D,
    )
    t.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no random crop and flip (default: ADM's classifier augmentation)",
    )
    t.add_argument(
        "--bn",
        choices=["frozen", "train"],
        default=d.bn,
        help="batch-norm running statistics during training" + D,
    )
    t.add_argument(
        "--holdout",
        type=_holdout,
        default=d.holdout,
        metavar="X",
        help="held-out fraction (< 1) or count (>= 1), stratified by class" + D,
    )
    t.add_argument(
        "--seed",
        type=R["seed"],
        default=d.seed,
        metavar="N",
        help="seed of the data order, crops, t and noise" + D,
    )


def _run_flags(p: argparse.ArgumentParser, d: FinetuneConfig) -> None:
    """Checkpoints, logs, evaluation, threads and the device."""
    from fguide.finetune.config import PARAM_RANGES as R

    D = " (default: %(default)s)"
    r = p.add_argument_group("run")
    r.add_argument(
        "--checkpoint-every",
        type=R["checkpoint_every"],
        default=d.checkpoint_every,
        metavar="N",
        help="steps between checkpoints" + D,
    )
    r.add_argument(
        "--log-every",
        type=R["log_every"],
        default=d.log_every,
        metavar="N",
        help="steps between log lines" + D,
    )
    r.add_argument(
        "--eval-batch-size",
        type=R["eval_batch_size"],
        metavar="N",
        help="held-out evaluation batch (default: --microbatch or --batch-size)",
    )
    r.add_argument("--bins", type=R["n_bins"], default=d.n_bins, metavar="N", help="ECE bins" + D)
    add_hidden_alias(r, "--n-bins", "bins", type=R["n_bins"])
    r.add_argument(
        "--workers",
        type=R["workers"],
        default=d.workers,
        metavar="N",
        help="image loading threads; 0 reads images in the training thread, without "
        "prefetching" + D,
    )
    r.add_argument(
        "--device", default="auto", metavar="DEV", help="auto, cpu, cuda, cuda:1, ..." + D
    )
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")


def _denoiser(args: argparse.Namespace) -> tuple[nn.Module, X0Estimator, str]:
    """The diffusion model for ``--input denoised``: (UNet, x̂0 estimator, its schedule)."""
    from fguide.finetune import adm_x0_estimator
    from fguide.models.loading import load_model
    from fguide.models.presets import preset_info
    from fguide.schedules import make_process

    if args.denoiser is None or args.denoiser_weights is None:
        raise ValueError("--input denoised needs --denoiser NAME and --denoiser-weights FILE")
    info = preset_info(args.denoiser)
    if info.kind != "diffusion" or info.diffusion_flags is None:
        raise ValueError(f"--denoiser: {args.denoiser!r} is not an ADM diffusion preset")
    # x_t must come from the process the diffusion model was trained on.
    schedule = args.noise_schedule or str(info.diffusion_flags["noise_schedule"])
    unet = load_model(args.denoiser, args.denoiser_weights)
    for prm in unet.parameters():
        prm.requires_grad_(False)
    process = make_process(schedule, 1000)
    return unet, adm_x0_estimator(unet, process, bool(info.flags["class_cond"])), schedule


def run(args: argparse.Namespace) -> int:
    from fguide.finetune import Classifier, FinetuneConfig, finetune, open_data
    from fguide.finetune.data import default_image_size
    from fguide.guides import find_guide_kind, load_classifier
    from fguide.runtime import resolve_device

    # Every configuration field that has a flag (``--bins`` is ``n_bins``).
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    config = FinetuneConfig(**given, n_bins=args.bins)
    config.validate()
    device = resolve_device(args.device)
    data = open_data(args.data)
    # The loader probes the classifier on images of the training size; an ADM preset has its
    # own (the data are then cropped to it).
    size = args.image_size
    kind = find_guide_kind(args.classifier)
    if size is None and not (kind is not None and kind.fixes_image_size):
        size = default_image_size(data)
    loaded = load_classifier(
        args.classifier,
        args.classifier_weights,
        image_size=size,
        device=device,
        softplus_beta=args.softplus_beta,
        input_mode=args.classifier_input_mode,
        resize=args.classifier_resize,
        time_aware=None if args.input is None else args.input == "noisy",
        require_weights=False,
    )
    classifier = Classifier.from_loaded(loaded)
    denoiser = None
    if (args.input or classifier.default_input) == "denoised":
        unet, denoiser, schedule = _denoiser(args)
        unet.to(device)
        config = dataclasses.replace(config, noise_schedule=schedule)
    elif args.denoiser is not None:
        raise ValueError("--denoiser is only used with --input denoised")
    try:
        result = finetune(
            classifier,
            data,
            args.out,
            config,
            denoiser=denoiser,
            device=device,
            progress=args.progress,
        )
    except FloatingPointError as err:  # well-formed settings that diverge: exit 1, not 2
        fp32 = "" if args.precision == "fp32" else " or use --precision fp32"
        print(
            f"fguide finetune: error: training diverged at these settings: {err} with --lr "
            f"{args.lr:g}; lower --lr{fp32}",
            file=sys.stderr,
        )
        return 1
    if result.status == "interrupted":
        print(
            f"fguide finetune: interrupted at step {result.step}; checkpoint saved in "
            f"{result.out_dir}. Rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    assert result.report is not None
    b, a = result.report["before"], result.report["after"]
    done = "already complete" if result.status == "already_complete" else "done"
    print(
        f"fine-tuning {done}: {result.step} steps. Held-out ({b['n']} images): "
        f"ECE {b['ece']:.4f} -> {a['ece']:.4f}, accuracy {b['accuracy']:.4f} -> "
        f"{a['accuracy']:.4f}.\nmodel: {result.model_path}\nreport: "
        f"{result.out_dir / 'report.json'}"
    )
    return 0
