"""``fguide calibration``: calibration diagnostics, as PNG figures plus ``calibration.json``.

Two modes (see :mod:`fguide.evaluation.calibration` for the definitions and for what the
classifier sees at a noise level):

- ``--trajectory RUN [RUN ...]``: a sampling run's ``trajectory.json`` (or its output folder)
  → the paper's Figure 1: ECE vs step, mean and top-25% confidence vs step, guidance-gradient
  norm vs step (``ece_vs_step.png``, ``confidence_vs_step.png``, ``grad_norm_vs_step.png``,
  all three in ``figure1.png``); several runs are overlaid.
- ``--classifier SPEC IMAGES``: a classifier on labelled images (npz with ``arr_1``, or a folder
  ``root/<class>/<image>``) → ECE (10 bins), Smooth ECE, accuracy, a reliability diagram per
  noise level (``--noise-t clean,0,250,500``) and, for several levels, ``calibration_vs_t.png``.
  SPEC is any form :data:`fguide.cli.CLASSIFIER_FORMS` lists; an import spec
  ``package.module:name`` may name an ``nn.Module`` instance or a factory (a function or class,
  called without arguments) returning the classifier: images NCHW in [-1, 1] (and t with
  ``--time-aware``) → logits.

``--out`` is claimed before the output is computed (:mod:`fguide.io.folders`): a folder holding
files that fguide calibration did not write there is refused, naming them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fguide import defaults as D
from fguide.cli import (
    CLASSIFIER_FORMS,
    NONNEGATIVE_INT,
    POSITIVE_INT,
    add_hidden_alias,
    softplus_beta_arg,
)
from fguide.evaluation.calibration import (
    ClassifierCalibration,
    classifier_calibration,
    load_trajectory_curves,
    parse_noise_levels,
    plot_calibration_vs_noise,
    plot_trajectory_figures,
    trajectory_json,
    write_reliability_diagrams,
)
from fguide.guides import load_classifier
from fguide.io.files import atomic_write_json, provenance, sha256_file
from fguide.io.folders import claim_folder
from fguide.io.images import open_images
from fguide.params import ParamError
from fguide.plots import FIGURE_FILES, statistic_figure
from fguide.runtime import resolve_device
from fguide.schedules import make_process

KIND = "calibration"  # the job kind of its --out folder (fguide.io.folders)
FILES = (
    "calibration.json",
    "figure1.png",
    *FIGURE_FILES.values(),
    statistic_figure("clip_score"),
    "reliability_*.png",
    "calibration_vs_t.png",
)
HELP = "Calibration diagnostics: Figure 1 from a sampling run, or ECE of a classifier on images."


def configure(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--trajectory",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="trajectory.json of a sampling run, or the run's output folder (several overlay)",
    )
    src.add_argument("--classifier", metavar="SPEC", help=f"the classifier: {CLASSIFIER_FORMS}")
    p.add_argument(
        "images", type=Path, nargs="?", help="labelled images (npz with arr_1, or class folders)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("fguide-calibration"),
        metavar="DIR",
        help="output folder (default %(default)s)",
    )
    p.add_argument(
        "--labels",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="legend labels of the --trajectory runs (default: the run folders' names)",
    )
    g = p.add_argument_group("classifier mode")
    g.add_argument(
        "--classifier-weights",
        type=Path,
        default=None,
        metavar="FILE",
        help="classifier weight file (a state dict)",
    )
    g.add_argument(
        "--time-aware",
        action="store_true",
        help="the classifier takes (x_t, t) (automatic for ADM presets)",
    )
    g.add_argument(
        "--classifier-input-mode",
        choices=("elucd", "imagenet"),
        default="elucd",
        help="ResNet input: elucd = images in [-1, 1] as is; imagenet = normalised (default "
        "%(default)s)",
    )
    g.add_argument(
        "--softplus-beta",
        type=softplus_beta_arg,
        default=None,
        metavar="BETA",
        help=f"ResNet ReLU → Softplus(β) (default {D.softplus_beta('ddpm'):g}, EluCD's DDPM "
        "value; 'relu' keeps ReLU)",
    )
    g.add_argument(
        "--classifier-resize",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="resize ResNet inputs to N×N (default: native size)",
    )
    add_hidden_alias(g, "--input-mode", "classifier_input_mode", choices=("elucd", "imagenet"))
    add_hidden_alias(g, "--resize", "classifier_resize", type=POSITIVE_INT)
    g.add_argument(
        "--noise-t",
        default="clean",
        metavar="LEVELS",
        help="noise levels: 'clean' and/or training timesteps, e.g. clean,0,250,500 (default "
        "%(default)s)",
    )
    g.add_argument(
        "--noise-schedule",
        choices=("linear", "cosine"),
        default="linear",
        help="the forward process's betas (default %(default)s)",
    )
    g.add_argument(
        "--diffusion-steps",
        type=POSITIVE_INT,
        default=1000,
        metavar="N",
        help="training timesteps of the forward process (default %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=NONNEGATIVE_INT,
        default=0,
        metavar="N",
        help="seed of the forward noise (default %(default)s)",
    )
    g.add_argument(
        "--image-size",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="centre-crop folder images to N×N (default: as they are)",
    )
    g.add_argument(
        "--bins", type=POSITIVE_INT, default=10, metavar="N", help="ECE bins (default %(default)s)"
    )
    g.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=64,
        metavar="N",
        help="images per classifier pass (default %(default)s)",
    )
    g.add_argument(
        "--device",
        default="auto",
        metavar="DEV",
        help="auto (GPU when there is one), cpu, cuda:N (default %(default)s)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_trajectory(args: argparse.Namespace) -> int:
    if args.images is not None:
        raise ValueError("IMAGES is for --classifier mode; --trajectory reads a sampling run")
    labels = args.labels or [None] * len(args.trajectory)
    if len(labels) != len(args.trajectory):
        raise ValueError(
            f"--labels: {len(labels)} labels for {len(args.trajectory)} --trajectory runs"
        )
    runs = [load_trajectory_curves(p, lab) for p, lab in zip(args.trajectory, labels, strict=True)]
    with claim_folder(args.out, KIND, FILES):
        figures = plot_trajectory_figures(runs, args.out)
        data = trajectory_json(runs)
        data["figures"] = {k: p.name for k, p in figures.items()}
        data["provenance"] = provenance()
        path = atomic_write_json(args.out / "calibration.json", data)
    for r in data["runs"]:
        ie = r["integral_ece"]
        s = r["summary"]
        conf = s.get("final_confidence_mean")
        print(
            f"{r['label']}: {r['num_steps']} steps, integral ECE "
            f"{'—' if ie is None else f'{ie:.4f}'}, final mean confidence "
            f"{'—' if conf is None else f'{conf:.4f}'}"
        )
    print(f"wrote {path} and {', '.join(p.name for p in figures.values())}")
    return 0


def _levels_table(result: ClassifierCalibration) -> str:
    head = f"{'level':<10}{'ECE':>9}{'sECE':>9}{'acc':>9}{'conf':>9}{'n':>8}"
    lines = [head, "-" * len(head)]
    for lv in result.levels:
        lines.append(
            f"{lv.label:<10}{lv.ece:>9.4f}{lv.smooth_ece:>9.4f}{lv.accuracy:>9.4f}"
            f"{lv.mean_confidence:>9.4f}{lv.n:>8}"
        )
    return "\n".join(lines)


def _run_classifier(args: argparse.Namespace) -> int:
    if args.images is None:
        raise ValueError("--classifier needs IMAGES (an npz with arr_1, or class folders)")
    if args.labels is not None:
        raise ValueError("--labels names --trajectory runs")
    try:
        levels = parse_noise_levels(args.noise_t, args.diffusion_steps)
    except ValueError as err:
        detail = str(err).removeprefix("noise levels: ")
        raise ParamError("{0}: {detail}", "noise_t", detail=detail) from None
    source = open_images(args.images, image_size=args.image_size)
    device = resolve_device(args.device)
    loaded = load_classifier(
        args.classifier,
        args.classifier_weights,
        image_size=source.size[0],
        device=device,
        softplus_beta=args.softplus_beta,
        input_mode=args.classifier_input_mode,
        resize=args.classifier_resize,
        time_aware=args.time_aware or None,
        dtype=None,
    )
    classifier, time_aware = loaded.module, loaded.time_aware
    process = None
    if any(t is not None for t in levels):
        process = make_process(args.noise_schedule, args.diffusion_steps, "", "fixed_small")
    # Before the long pass: --out holds no one else's files and takes a file.
    with claim_folder(args.out, KIND, FILES):
        result = classifier_calibration(
            classifier,
            source,
            noise_levels=levels,
            process=process,
            time_aware=time_aware,
            batch_size=args.batch_size,
            device=device,
            seed=args.seed,
            n_bins=args.bins,
            progress=not args.no_progress,
        )
        print(_levels_table(result))  # first: the numbers survive an --out that fails now
        figures = {k: p.name for k, p in write_reliability_diagrams(result, args.out).items()}
        if len(levels) > 1:
            figures["calibration_vs_t"] = plot_calibration_vs_noise(
                result, args.out / "calibration_vs_t.png"
            ).name
        data = result.to_dict()
        data.update(
            classifier=loaded.description,
            classifier_weights_sha256=(
                sha256_file(args.classifier_weights) if args.classifier_weights else None
            ),
            images={
                "path": str(source.path),
                "kind": source.kind,
                "num_images": source.count,
                "image_size": list(source.size),
                "sha256": source.sha256 if source.kind == "npz" else None,
            },
            noise_schedule=args.noise_schedule if process is not None else None,
            diffusion_steps=args.diffusion_steps if process is not None else None,
            figures=figures,
            provenance=provenance(),
        )
        path = atomic_write_json(args.out / "calibration.json", data)
    print(f"wrote {path} and {', '.join(sorted(figures.values()))}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.trajectory is not None:
        return _run_trajectory(args)
    return _run_classifier(args)
