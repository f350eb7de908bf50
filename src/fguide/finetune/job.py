"""Smooth-ECE calibration fine-tuning of a guidance classifier (METHODS.md section 4): the job.

The loss is the paper's: for a batch of n samples with logits f_i and labels y_i,

    L = CE + λ · L_sECE,   CE = (1/n) Σ_i −log softmax(f_i)_{y_i},
    L_sECE = (1/n) Σ_i sqrt((p̂_i − a_i)² + β),   p̂_i = max_k softmax(f_i)_k,
    a_i = 1[argmax f_i = y_i] (no gradient),   λ = 1, β = 1e−4 by default,

minimised with AdamW (``calibration_loss="soft_binned_ece"`` swaps L_sECE for the soft-binned
ECE). Batch-norm layers are frozen by default (running statistics in eval mode, affine
parameters trained), which keeps micro-batching exact for ResNets too.

What the classifier sees (``input``):

- ``"noisy"`` (ADM's noise-aware classifier, its default): x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε
  with t uniform over the T = 1000 training steps and ε ~ N(0, I), called as ``f(x_t, t)``;
  ᾱ from the classifier's diffusion flags (linear betas for the 128 and 256 classifiers,
  cosine for 64, as the matching diffusion models);
- ``"clean"`` (ResNets and other modules, their default): the augmented image x0 itself;
- ``"denoised"``: x̂0 = clip(x̂0(x_t, t), −1, 1), a diffusion model's estimate at a uniform t,
  detached: exactly the input guidance feeds an off-the-shelf classifier (METHODS.md 2).
  It needs a diffusion model (``denoiser``), one extra forward pass per sample.

What the term does: per sample, sqrt((p̂ − a)² + β) ≈ |p̂ − a| is an L1 loss on correctness,
minimised at the median of a rather than its mean. Where the accuracy at a given confidence is
below 1/2 it lowers p̂ (the overconfident, low-accuracy inputs of early guidance steps: the
paper's target); where it is above 1/2 it raises p̂. It is not a proper scoring rule: CE keeps
the classifier honest, and report.json measures the outcome on held-out data.

Reproducibility: every random draw of step k (data order, crops, flips, t, ε, dropout) is a
function of (seed, k) alone (:mod:`fguide.rng` streams), so a run resumed from a checkpoint at
step k repeats the uninterrupted run exactly; the checkpoint holds the model, optimizer,
grad-scaler and step. The run's identity covers the settings, the classifier's initial weights
(SHA-256 of its state dict) and the data's content (:meth:`ImageSource.fingerprint`).

Layout: :mod:`fguide.finetune.config` (settings), :mod:`fguide.finetune.data` (split,
augmentation, batches), :mod:`fguide.finetune.steps` (loss, gradient accumulation, held-out
evaluation), :mod:`fguide.finetune.loop` (the training loop), :mod:`fguide.finetune.classifier`
(the classifier wrapper), this module (the job: checkpoints, resume, the report).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from fguide.finetune.classifier import Classifier, adm_x0_estimator, as_classifier, wrap_module
from fguide.finetune.config import (
    FREE_KEYS,
    ClassifierInput,
    FinetuneConfig,
    Precision,
    config_dict,
)
from fguide.finetune.data import (
    TrainLoader,
    check_labels,
    default_image_size,
    labels_of,
    split_holdout,
)
from fguide.finetune.loop import Interrupt, Trainer, rng_fork, train_loop, trim_log
from fguide.finetune.steps import (
    X0Estimator,
    accumulate_gradients,
    calibration_loss,
    classifier_inputs,
    evaluate_held_out,
    training_loss,
)
from fguide.guides import (
    LoadedClassifier,
    probe_num_classes,
    state_dict_sha256,
)
from fguide.io.files import atomic_write, atomic_write_json, provenance, sha256_file
from fguide.io.folders import check_folder, claim_folder
from fguide.io.images import ImageSource, from_arrays, open_images, random_crop_arr
from fguide.plots import plot_reliability_dict
from fguide.runtime import resolve_device
from fguide.schedules import Process, make_process

__all__ = [
    "ArraySource",
    "Classifier",
    "ClassifierInput",
    "FinetuneConfig",
    "FinetuneResult",
    "ImageSource",
    "Precision",
    "X0Estimator",
    "accumulate_gradients",
    "adm_x0_estimator",
    "as_classifier",
    "calibration_loss",
    "finetune",
    "open_data",
    "random_crop_arr",
    "split_holdout",
    "training_loss",
    "wrap_module",
]

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOG = "log.jsonl"
REPORT = "report.json"
BEFORE = "eval_before.json"
KIND = "finetune"  # the job kind of its output folder (fguide.io.folders)
FILES = (CHECKPOINT, MODEL, LOG, REPORT, BEFORE, "reliability_before.png", "reliability_after.png")
_FORMAT = "fguide-finetune-checkpoint/1"


def open_data(path: str | os.PathLike[str]) -> ImageSource:
    """Training data: a class-subfolder tree or an ``.npz`` (``arr_0`` uint8 NHWC, ``arr_1``
    integer labels), opened for random access (image sizes are not checked: every image is
    cropped to the training size)."""
    src = open_images(path, require_labels=True, check_sizes=False)
    if src.count == 0:
        raise ValueError(f"data: {path} holds no images")
    return src


def ArraySource(  # the former class's name, kept for its callers
    images: NDArray[np.uint8], labels: Any, description: str = "arrays"
) -> ImageSource:
    """In-memory uint8 NHWC images with integer labels (:func:`fguide.io.images.from_arrays`)."""
    if labels is None:
        raise ValueError("labels are required for fine-tuning")
    return from_arrays(images, labels, description)


def _labels_sha(labels: NDArray[np.int64]) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


# -- the training loop -------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune`: ``status`` is ``"completed"``, ``"interrupted"`` (a
    checkpoint was saved at ``step``; rerun to resume) or ``"already_complete"``."""

    status: Literal["completed", "interrupted", "already_complete"]
    step: int
    out_dir: Path
    report: dict[str, Any] | None = None

    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL


def _resolve(
    config: FinetuneConfig, classifier: Classifier, source: ImageSource
) -> tuple[ClassifierInput, str, int]:
    kind: ClassifierInput = config.input or classifier.default_input
    schedule = config.noise_schedule or classifier.noise_schedule or "linear"
    size = config.image_size or classifier.image_size or default_image_size(source)
    return kind, schedule, size


def _probe(module: nn.Module, spec: str, kind: ClassifierInput, size: int, dev: Any) -> int:
    """N from one forward pass on a blank image (the loader's probe, with the flags to fix)."""
    try:
        return probe_num_classes(module, spec, size, kind == "noisy", dev)
    except ValueError as err:
        raise ValueError(
            f"{err}; check the image size ({size}x{size}, --image-size) and the input "
            f"({kind}, --input)"
        ) from None


def _write_state(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def finetune(
    classifier: Classifier | LoadedClassifier | nn.Module,
    data: ImageSource | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: FinetuneConfig | None = None,
    *,
    denoiser: X0Estimator | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``classifier`` with CE + λ·Smooth ECE on ``data``; resume from ``out_dir``.

    ``classifier``: a :class:`Classifier`, what :func:`fguide.guides.load_classifier`
    returns, or a plain ``nn.Module`` (clean input unless ``config.input`` says otherwise).
    ``data``: an :class:`~fguide.io.images.ImageSource` with labels, or its path
    (:func:`open_data`).

    Writes into ``out_dir`` (claimed first, :func:`fguide.io.folders.claim_folder`: a folder
    holding files this job did not write is refused, naming them): ``checkpoint.pt`` (every
    ``checkpoint_every`` steps, on SIGINT/SIGTERM and at the end; loadable with
    ``weights_only=True``), ``log.jsonl`` (CE, Smooth ECE, ECE and accuracy of the training
    batches, every ``log_every`` steps), ``eval_before.json``, and at the end ``model.pt`` (a
    plain state dict), ``report.json`` (held-out ECE and accuracy before and after,
    configuration, checksums, provenance) and ``reliability_before.png`` /
    ``reliability_after.png``. Every file is written atomically.

    Calling again with the same arguments resumes from ``checkpoint.pt`` (a larger
    ``iterations`` continues a finished run); different trajectory settings are refused.
    ``on_step(step, metrics)`` is called after every optimizer step (``step`` counts done
    steps).
    """
    config = config or FinetuneConfig()
    config.validate()
    classifier = as_classifier(classifier)
    data = data if isinstance(data, ImageSource) else open_data(data)
    labels = labels_of(data)
    out = Path(out_dir)
    check_folder(out, KIND, FILES, adopt=_adopt)  # before any long work; claimed below
    dev = resolve_device(device)
    kind, schedule, size = _resolve(config, classifier, data)
    if kind == "denoised" and denoiser is None:
        raise ValueError("input 'denoised' needs a diffusion model (denoiser) for x̂0")
    if len(data) < 2:
        raise ValueError(f"data: {data.description} has {len(data)} image(s); need at least 2")
    module = classifier.module.to(dev)
    num_classes = _probe(module, classifier.spec, kind, size, dev)
    check_labels(data, num_classes, classifier.spec)
    train_idx, held_idx = split_holdout(labels, config.holdout, config.seed)
    process = (
        None
        if kind == "clean"
        else make_process(schedule, config.diffusion_steps, "", "fixed_small")
    )

    # The initial weights actually in use (whatever their source) and the data's content.
    weights_sha = state_dict_sha256(module)
    resolved = {"input": kind, "noise_schedule": schedule, "image_size": size}
    identity = _run_identity(config, classifier.spec, weights_sha, data, resolved)
    if classifier.source_sha256 is not None:  # an import spec's code, beside its weights
        identity["classifier"]["source_sha256"] = classifier.source_sha256

    trainer = _trainer(module, config, kind, process, denoiser, dev)

    # One process per run folder (two would both train and overwrite each other's files); a
    # folder holding files this job did not write is refused (fguide.io.folders).
    with claim_folder(out, KIND, FILES, adopt=_adopt):
        before, finished = _resume(out, trainer, identity, config)
        if finished is not None:
            return finished

        loader = TrainLoader(
            data, train_idx, size, config.seed, config.augment, config.batch_size, config.workers
        )

        held_out_eval = functools.partial(
            evaluate_held_out,
            module,
            loader,
            held_idx,
            kind=kind,
            process=process,
            denoiser=denoiser,
            device=dev,
            **_eval_settings(config),
        )

        start_step = trainer.step
        try:
            outcome = _train(
                trainer, loader, held_out_eval, before, out, identity, progress, on_step
            )
            if outcome is None:
                return FinetuneResult("interrupted", trainer.step, out)
            before, train_seconds = outcome
            _write_state(out / MODEL, classifier.state_dict_to_save())
            after = held_out_eval()
        finally:
            loader.close()

        report = _write_report(
            out,
            before,
            after,
            {
                "steps": trainer.step,
                "steps_this_call": trainer.step - start_step,
                "seconds_this_call": train_seconds,
                "samples_seen": trainer.step * config.batch_size,
            },
            config,
            identity["resolved"] | {"num_classes": num_classes, "device": str(dev)},
            classifier,
            weights_sha,
            data,
            (train_idx, held_idx),
        )
        return FinetuneResult("completed", trainer.step, out, report)


def _trainer(
    module: nn.Module,
    config: FinetuneConfig,
    kind: ClassifierInput,
    process: Process | None,
    denoiser: X0Estimator | None,
    dev: torch.device,
) -> Trainer:
    """The training state: AdamW, the fp16 grad scaler, and how a step makes its inputs."""
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=config.precision == "fp16")

    def make_inputs(x0: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        return classifier_inputs(x0, y, kind, process, gen, denoiser)

    return Trainer(module, optimizer, scaler, config, make_inputs, dev)


def _eval_settings(config: FinetuneConfig) -> dict[str, Any]:
    """The held-out evaluation's settings (:func:`evaluate_held_out`) of a configuration."""
    return {
        "precision": config.precision,
        "batch_size": config.eval_batch_size or config.microbatch or config.batch_size,
        "seed": config.seed,
        "n_bins": config.n_bins,
        "beta": config.beta,
        "calibration_loss": config.calibration_loss,
    }


def _train(
    trainer: Trainer,
    loader: TrainLoader,
    held_out_eval: Callable[[], dict[str, Any]],
    before: dict[str, Any] | None,
    out: Path,
    identity: dict[str, Any],
    progress: bool,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> tuple[dict[str, Any], float] | None:
    """The held-out evaluation before training (unless resumed with one), then the steps up to
    ``iterations`` with checkpoints; (before, seconds of training), or None when interrupted."""
    if before is None:
        before = held_out_eval()
        atomic_write_json(out / BEFORE, before)
    t_start = time.perf_counter()
    extra = {"format": _FORMAT, "identity": identity, "before": json.dumps(before)}

    def save() -> None:
        _write_state(out / CHECKPOINT, {**extra, **trainer.state()})

    status: Literal["completed", "interrupted"] = "completed"
    if trainer.step < trainer.config.iterations:
        with Interrupt() as interrupt, rng_fork(trainer.device):
            status = train_loop(trainer, loader, save, interrupt, out / LOG, progress, on_step)
    if status == "interrupted":
        return None
    return before, time.perf_counter() - t_start


def _run_identity(
    config: FinetuneConfig,
    spec: str,
    weights_sha: str,
    data: ImageSource,
    resolved: dict[str, Any],
) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: the settings that shape the
    trajectory, the classifier's initial weights, the data's content, the resolved input."""
    identity = {
        "config": {k: v for k, v in config_dict(config).items() if k not in FREE_KEYS},
        "classifier": {"spec": spec, "weights_sha256": weights_sha},
        "data": data.fingerprint(),
        "resolved": resolved,
    }
    if config.anneal_lr:  # the learning rate then depends on the total step count
        identity["config"]["iterations"] = config.iterations
    return identity


def _resume(
    out: Path, trainer: Trainer, identity: dict[str, Any], config: FinetuneConfig
) -> tuple[dict[str, Any] | None, FinetuneResult | None]:
    """Load ``out``'s checkpoint into ``trainer`` (its identity checked): the held-out
    evaluation before training (None for a new run), and the result when the run is already
    complete. A log without its checkpoint belongs to no run that can resume: removed."""
    ckpt_path, log_path = out / CHECKPOINT, out / LOG
    if not ckpt_path.exists():
        if log_path.exists():
            log_path.unlink()
        return None, None
    state = _read_checkpoint(ckpt_path)
    _check_identity(state["identity"], identity, ckpt_path)
    if int(state["step"]) > config.iterations:
        raise ValueError(
            f"iterations: {ckpt_path} is already at step {state['step']} > iterations "
            f"{config.iterations}; raise iterations or use a new output folder"
        )
    trainer.load_state(state)
    before = json.loads(state["before"])
    report_path = out / REPORT
    done = report_path.exists() and (out / MODEL).exists()
    if trainer.step == config.iterations and done:
        report = json.loads(report_path.read_text())
        if report.get("training", {}).get("steps") == trainer.step:
            return before, FinetuneResult("already_complete", trainer.step, out, report)
    trim_log(log_path, trainer.step)
    return before, None


def _write_report(
    out: Path,
    before: dict[str, Any],
    after: dict[str, Any],
    training: dict[str, Any],
    config: FinetuneConfig,
    resolved: dict[str, Any],
    classifier: Classifier,
    weights_sha: str,
    data: ImageSource,
    split: tuple[NDArray[np.int64], NDArray[np.int64]],
) -> dict[str, Any]:
    """The reliability diagrams before and after, then ``report.json`` (held-out numbers,
    training, settings, classifier, data, the final file's checksum, provenance)."""
    for name, res in (("before", before), ("after", after)):
        title = f"{name}: ECE {res['ece']:.4f}"
        plot_reliability_dict(res["reliability"], out / f"reliability_{name}.png", title=title)
    train_idx, held_idx = split
    report = {
        "before": before,
        "after": after,
        "delta": {k: after[k] - before[k] for k in ("ece", "accuracy", "nll", "smooth_ece")},
        "training": training,
        "config": config_dict(config),
        "resolved": resolved,
        "classifier": {
            "spec": classifier.spec,
            "kind": classifier.kind,
            "weights": classifier.weights,
            "weights_sha256": sha256_file(classifier.weights) if classifier.weights else None,
            "state_dict_sha256": weights_sha,
        },
        "data": {
            "source": data.description,
            **data.fingerprint(),
            "n_train": len(train_idx),
            "n_holdout": len(held_idx),
            "holdout_sha256": _labels_sha(held_idx),
        },
        "files": {"model": MODEL, "model_sha256": sha256_file(out / MODEL)},
        "provenance": provenance(),
    }
    atomic_write_json(out / REPORT, report)
    return report


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's state; a damaged, truncated or foreign file is a ValueError naming it
    (the load is ``weights_only``: a pickle that would run code is refused, never run)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises EOFError, RuntimeError, UnpicklingError, ...
        raise ValueError(
            f"{path} cannot be read as a fguide finetune checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'empty'}); move it away to start over"
        ) from None
    keys = ("identity", "step", "before", "model", "optimizer", "scaler", "window")
    if (
        not isinstance(state, dict)
        or state.get("format") != _FORMAT
        or any(k not in state for k in keys)
    ):
        raise ValueError(f"{path} is not a fguide finetune checkpoint; move it away to start over")
    return state


def _adopt(out: Path) -> bool:
    """Whether ``out``, a folder without an ownership record, is a fine-tuning run of an
    earlier fguide: its checkpoint says so (a damaged or foreign one is an error naming it)."""
    path = out / CHECKPOINT
    return path.is_file() and bool(_read_checkpoint(path))


def _check_identity(saved: Mapping[str, Any], now: Mapping[str, Any], path: Path) -> None:
    diffs = []
    for group in ("config", "classifier", "data", "resolved"):
        a, b = dict(saved.get(group, {})), dict(now[group])
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{group}.{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}")
    if diffs:
        raise ValueError(
            f"{path} belongs to a different run ({'; '.join(diffs[:6])}). Rerun with the "
            "checkpoint's settings to resume, or use a new output folder."
        )
