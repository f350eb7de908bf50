"""Calibration reports: the paper's Figure 1 from a sampling run, and ECE of a classifier on
real (optionally forward-noised) images. METHODS.md section 4.

Two sources, each written as PNG figures plus one ``calibration.json``:

1. **A sampling run's diagnostics** (:func:`trajectory_report`): the ``trajectory.json`` a
   :class:`~fguide.diagnostics.TrajectoryRecorder` saved. Per sampling step k (0 = noisiest):
   ECE of the guiding classifier on its guidance input against the target labels, its mean
   confidence in the target p_y and the mean over the top 25% of those, and the mean guidance
   gradient norm ‖∇S‖. Several runs overlay (e.g. EluCD's base score vs a regularised one).
2. **A classifier and labelled images** (:func:`classifier_calibration`): with p = softmax(f),
   p̂ = max_k p_k and a = 1[argmax f = y], ECE over 10 equal-width bins ((b−1)/B, b/B], the
   Smooth ECE L = (1/n) Σ_i sqrt((p̂_i − a_i)² + β) (β = 1e−4), accuracy and a reliability
   diagram, on clean images x0 and on forward-noised ones x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε
   at chosen training timesteps t (ADM's ``q_sample``; t = 0 is already the first noise level,
   σ = sqrt(1 − ᾱ_0) ≈ 0.01 for the linear schedule; "clean" means x0 itself).

What the classifier sees at a noise level t:

- a **noise-aware** (time-aware) classifier, e.g. ADM's, gets x_t and the timestep t, as in
  its training and in classic classifier guidance (for clean images it gets x0 and t = 0);
- an **x0 classifier** (EluCD's off-the-shelf ResNets) gets x_t itself. That is the input a
  naive use at x_t would give it, and it shows how confident and wrong a clean-data classifier
  becomes on noisy images. The input EluCD actually guides with, the x0 estimate of a diffusion
  model, needs that model: its calibration along the trajectory is what mode 1 reports (record
  with ``TrajectoryRecorder(labels, classifier)``, which evaluates the classifier on x̂0).

The noise ε of image i is drawn from its own generator seeded by (seed, i) and is shared by
every t: the numbers do not depend on the batch size, and the curve over t compares the same
draws at different noise levels.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor
from tqdm import tqdm

from fguide.diagnostics import TrajectoryCurves, load_trajectory
from fguide.io import runs
from fguide.io.files import sha256_file
from fguide.io.folders import folder_kind, kind_label
from fguide.io.images import ImageSource, from_uint8_nhwc
from fguide.io.runs import TRAJECTORY
from fguide.metrics.calibration import (
    ClassifierCalibration,
    LevelCalibration,
    reliability_from_confidences,
    smooth_ece_loss,
)
from fguide.plots import (
    plot_calibration_vs_noise,
    plot_trajectory_figures,
    reliability_png_name,
    write_reliability_diagrams,
)
from fguide.rng import SampleNoise
from fguide.schedules import Process

__all__ = [
    "TRAJECTORY_FILE",
    "ClassifierCalibration",
    "LevelCalibration",
    "TrajectoryCurves",
    "classifier_calibration",
    "find_trajectory",
    "load_trajectory_curves",
    "parse_noise_levels",
    "plot_calibration_vs_noise",
    "plot_trajectory_figures",
    "reliability_png_name",
    "trajectory_json",
    "write_reliability_diagrams",
]

#: The file a sampling run's diagnostics are saved to (``TrajectoryRecorder.save``).
TRAJECTORY_FILE = TRAJECTORY
#: Curves a trajectory file must have (one value per recorded step; None where undefined).
REQUIRED_CURVES = ("step", "confidence_mean", "confidence_top25", "grad_norm", "ece")
OPTIONAL_CURVES = ("t", "accuracy", "vanished_fraction", "max_tilt_weight")
#: Any other curve of ``step``'s length is a per-step statistic of the run's guide (e.g. the CLIP
#: score); it is kept, and drawn when the file defines it (``<curve>_definition``).


# -- 1. trajectories --------------------------------------------------------------------------


def find_trajectory(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a file, else ``path/trajectory.json``, else the one
    ``trajectory.json`` below ``path`` (several are ambiguous: an error lists them). A sampling
    run's ``trajectory.json`` is checked against its manifest (one copied in from another run
    is refused); the folder of another fguide job is refused, naming what it is."""
    p = Path(path)
    if p.is_file():
        if p.name == TRAJECTORY_FILE and runs.is_run_folder(p.parent):
            return _run_trajectory(p.parent)
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"trajectory diagnostics not found: {p}")
    if runs.is_run_folder(p):  # a sampling run: its own trajectory.json, and its status
        return _run_trajectory(p)
    kind = folder_kind(p)
    if kind not in (None, runs.KIND, "demo-digits"):  # the digits world holds sampling runs
        raise ValueError(f"{p} is a fguide {kind_label(kind)} folder, not a sampling run")
    if (p / TRAJECTORY_FILE).is_file():
        return p / TRAJECTORY_FILE
    found = sorted(p.rglob(TRAJECTORY_FILE))
    if len(found) == 1:
        return find_trajectory(found[0])
    if not found:
        raise FileNotFoundError(
            f"{p}: no {TRAJECTORY_FILE} in this folder (a sampling run writes it when its "
            "diagnostics are recorded with a TrajectoryRecorder)"
        )
    listed = ", ".join(str(f.relative_to(p)) for f in found[:5])
    raise ValueError(f"{p}: {len(found)} {TRAJECTORY_FILE} files ({listed}); pass one of them")


def _run_trajectory(folder: Path) -> Path:
    """The trajectory of the run in ``folder``, checked against its manifest (warned when the
    run is not complete)."""
    run = runs.read_run(folder)
    traj = runs.check_trajectory(run)
    if run.status != "complete":
        warnings.warn(
            f"{folder}: the run's manifest says {run.status!r}, not 'complete': "
            f"{TRAJECTORY_FILE} may be from an earlier, interrupted or different run",
            UserWarning,
            stacklevel=3,
        )
    return traj


def load_trajectory_curves(
    path: str | os.PathLike[str], label: str | None = None
) -> TrajectoryCurves:
    """Read and check a trajectory file (or a run folder holding one)."""
    file = find_trajectory(path)
    data = load_trajectory(file)
    curves = data["curves"]
    if not isinstance(curves, dict):
        raise ValueError(f"{file}: 'curves' must be a mapping of curve name to values")
    missing = [k for k in REQUIRED_CURVES if k not in curves]
    if missing:
        raise ValueError(f"{file}: 'curves' has no {missing} (keys: {sorted(curves)})")
    n = len(curves["step"])
    if n == 0:
        raise ValueError(f"{file}: 'curves.step' is empty (no step was recorded)")
    for k in (*REQUIRED_CURVES, *OPTIONAL_CURVES):
        if k in curves and (not isinstance(curves[k], list) or len(curves[k]) != n):
            raise ValueError(f"{file}: 'curves.{k}' must be a list of {n} values, like 'step'")
    if label is None:
        label = file.parent.name if file.name == TRAJECTORY_FILE else file.stem
    kept = {k: list(curves[k]) for k in (*REQUIRED_CURVES, *OPTIONAL_CURVES) if k in curves}
    extra = [
        k
        for k, v in curves.items()
        if k not in kept and isinstance(v, list) and len(v) == n and isinstance(k, str)
    ]
    kept.update((k, list(curves[k])) for k in extra)
    definitions = {
        k: data[f"{k}_definition"] for k in extra if isinstance(data.get(f"{k}_definition"), str)
    }
    return TrajectoryCurves(label, file, kept, dict(data.get("summary") or {}), definitions)


def trajectory_json(runs: Sequence[TrajectoryCurves]) -> dict[str, Any]:
    """The JSON part of a trajectory report: curves, summary and integral ECE per run."""
    out = []
    for r in runs:
        ece_curve = [v for v in r.curves["ece"] if v is not None]
        out.append(
            {
                "label": r.label,
                "source": str(r.source),
                "source_sha256": sha256_file(r.source),
                "num_steps": len(r.curves["step"]),
                "integral_ece": float(np.mean(ece_curve)) if ece_curve else None,
                "summary": r.summary,
                "curves": r.curves,
            }
        )
    return {"mode": "trajectory", "runs": out}


# -- 2. a classifier on (noised) labelled images ----------------------------------------------


def parse_noise_levels(text: str, num_steps: int = 1000) -> list[int | None]:
    """``"clean,0,250,500"`` → [None, 0, 250, 500] (None = clean), checked against the steps."""
    levels: list[int | None] = []
    for part in text.split(","):
        item = part.strip().lower()
        if not item:
            continue
        if item in ("clean", "none", "x0"):
            levels.append(None)
            continue
        try:
            t = int(item)
        except ValueError:
            raise ValueError(
                f"noise levels: {part.strip()!r} is not a timestep (an integer in "
                f"[0, {num_steps - 1}]) or 'clean'"
            ) from None
        if not 0 <= t < num_steps:
            raise ValueError(f"noise levels: timestep {t} is outside [0, {num_steps - 1}]")
        levels.append(t)
    if not levels:
        raise ValueError("noise levels: none given")
    if len(set(levels)) != len(levels):
        raise ValueError(f"noise levels: repeated values in {text!r}")
    return levels


@dataclass
class _LevelAccum:
    conf: list[NDArray[np.float64]] = field(default_factory=list)
    correct: list[NDArray[np.bool_]] = field(default_factory=list)
    target: list[NDArray[np.float64]] = field(default_factory=list)
    smooth_sum: float = 0.0


def _logits_of(
    classifier: Callable[..., Tensor], x: Tensor, t: Tensor, time_aware: bool, where: str
) -> Tensor:
    logits = classifier(x, t) if time_aware else classifier(x)
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the classifier must return logits [B, N] ({where}); got {shape}")
    return logits.detach().double().cpu()


@torch.no_grad()
def classifier_calibration(
    classifier: Callable[..., Tensor],
    source: ImageSource,
    *,
    noise_levels: Sequence[int | None] = (None,),
    process: Process | None = None,
    time_aware: bool = False,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    n_bins: int = 10,
    beta: float = 1e-4,
    workers: int = 4,
    progress: bool = True,
) -> ClassifierCalibration:
    """ECE, Smooth ECE, accuracy and reliability of ``classifier`` on ``source``'s labelled
    images, clean and forward-noised (see the module docstring for what the classifier sees).

    ``classifier`` maps images NCHW in [-1, 1] (and, when ``time_aware``, the training
    timesteps [B]) to logits [B, N]. ``process`` is the forward process of the noise levels
    (required when a level is not None; unrespaced: t is the training timestep).
    """
    if source.labels is None:
        raise ValueError(
            f"{source.path}: no labels (an npz needs 'arr_1'; a folder needs class subfolders "
            "root/<class>/<image>, numbered in sorted order)"
        )
    if any(t is not None for t in noise_levels) and process is None:
        raise ValueError("a forward process is needed for noise levels other than 'clean'")
    if process is not None and len(process.timestep_map) != process.num_train_steps:
        raise ValueError("the forward process must not be respaced (t is a training timestep)")
    labels_all = source.labels
    accs = [_LevelAccum() for _ in noise_levels]
    start = 0
    bar = tqdm(total=source.count, unit="img", desc="classifier", disable=not progress)
    with bar:
        for images in source.batches(batch_size, workers):
            b = images.shape[0]
            y = torch.from_numpy(labels_all[start : start + b])
            x0 = from_uint8_nhwc(images).to(device=device, dtype=dtype)
            eps = None
            if process is not None:
                eps = SampleNoise(seed, range(start, start + b))(x0)
            for level, acc in zip(noise_levels, accs, strict=True):
                t = torch.full((b,), 0 if level is None else level, dtype=torch.long, device=device)
                if level is None or eps is None or process is None:
                    x = x0
                else:
                    x = process.q_sample(x0, t, eps)
                where = f"images {start}..{start + b - 1} of {source.path}"
                logits = _logits_of(classifier, x, t, time_aware, where)
                if int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
                    raise ValueError(
                        f"{source.path}: labels up to {int(y.max())} but the classifier has "
                        f"{logits.shape[1]} classes"
                    )
                if not bool(torch.isfinite(logits).all()):
                    raise ValueError(f"the classifier returned non-finite logits ({where})")
                logp = torch.log_softmax(logits, dim=1)
                acc.conf.append(logp.max(dim=1).values.exp().numpy())
                # argmax returns the first maximum: ties go to the lowest index (METHODS.md 4)
                acc.correct.append((logits.argmax(dim=1) == y).numpy())
                acc.target.append(logp.gather(1, y[:, None]).squeeze(1).exp().numpy())
                acc.smooth_sum += float(smooth_ece_loss(logits, y, beta)) * b
            start += b
            bar.update(b)
    results = []
    for level, acc in zip(noise_levels, accs, strict=True):
        conf = np.concatenate(acc.conf)
        correct = np.concatenate(acc.correct)
        rel = reliability_from_confidences(conf, correct, n_bins)
        top = np.sort(conf)[::-1][: max(1, math.ceil(len(conf) / 4))]
        std = 0.0
        if level is not None and process is not None:
            std = float(process["sqrt_one_minus_alphas_cumprod"][level])
        results.append(
            LevelCalibration(
                t=level,
                noise_std=std,
                n=len(conf),
                ece=rel.ece,
                smooth_ece=acc.smooth_sum / len(conf),
                accuracy=float(correct.mean()),
                mean_confidence=float(conf.mean()),
                top25_confidence=float(top.mean()),
                mean_target_prob=float(np.concatenate(acc.target).mean()),
                reliability=rel,
            )
        )
    return ClassifierCalibration(results, n_bins, beta, time_aware, seed)
