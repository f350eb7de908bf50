"""Smooth-ECE calibration fine-tuning of a guidance classifier (METHODS.md section 4).

The loss is the paper's: for a batch of n samples with logits f_i and labels y_i,

    L = CE + λ · L_sECE,   CE = (1/n) Σ_i −log softmax(f_i)_{y_i},
    L_sECE = (1/n) Σ_i sqrt((p̂_i − a_i)² + β),   p̂_i = max_k softmax(f_i)_k,
    a_i = 1[argmax f_i = y_i] (no gradient),   λ = 1, β = 1e−4 by default,

minimised with AdamW. Both terms are means of per-sample terms, so a batch split into
micro-batches of sizes n_j accumulates Σ_j (n_j/n) L(micro-batch j): exactly the full batch's
gradient (up to float summation order), as ADM's ``classifier_train.py`` weights its
micro-batches. Batch-norm layers are frozen by default (running statistics in eval mode,
affine parameters trained), which keeps that identity true for ResNets too.

What the classifier sees (``input``):

- ``"noisy"`` (ADM's noise-aware classifier, its default): x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε
  with t uniform over the T = 1000 training steps and ε ~ N(0, I), called as ``f(x_t, t)``;
  ᾱ from the classifier's diffusion flags (linear betas for the 128 and 256 classifiers,
  cosine for 64, as the matching diffusion models);
- ``"clean"`` (ResNets and other modules, their default): the augmented image x0 itself;
- ``"denoised"``: x̂0 = clip(x̂0(x_t, t), −1, 1), a diffusion model's estimate at a uniform t,
  detached: exactly the input guidance feeds an off-the-shelf classifier (METHODS.md 2).
  It needs a diffusion model (``denoiser``), one extra forward pass per sample.

Images are ADM's: the training images get ADM's classifier augmentation (``random_crop_arr``:
the short side resized to a uniform integer in [s, ⌈s/0.8⌉] by BOX halvings and one BICUBIC
resize, a uniform s × s crop, then a horizontal flip with probability 1/2); held-out images
get ADM's centre crop. Pixels map to [−1, 1] as x/127.5 − 1.

What the term does: per sample, sqrt((p̂ − a)² + β) ≈ |p̂ − a| is an L1 loss on correctness,
minimised at the median of a rather than its mean. Where the accuracy at a given confidence is
below 1/2 it lowers p̂ (the overconfident, low-accuracy inputs of early guidance steps: the
paper's target); where it is above 1/2 it raises p̂. It is not a proper scoring rule: CE keeps
the classifier honest, and report.json measures the outcome on held-out data.

Reproducibility: every random draw of step k (data order, crops, flips, t, ε, dropout) is a
function of (seed, k) alone, so a run resumed from a checkpoint at step k repeats the
uninterrupted run exactly; the checkpoint holds the model, optimizer, grad-scaler and step.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from fguide.io.files import atomic_write, atomic_write_json, provenance, sha256_file
from fguide.io.images import ImageFolder, center_crop_arr, load_npz_images, resize_short_side
from fguide.metrics.calibration import plot_reliability, reliability_diagram, smooth_ece_loss
from fguide.runtime import import_module_spec, resolve_device
from fguide.schedules import Process, make_process

__all__ = [
    "Classifier",
    "ClassifierInput",
    "FinetuneConfig",
    "FinetuneResult",
    "ImageSource",
    "ArraySource",
    "FolderSource",
    "Precision",
    "X0Estimator",
    "accumulate_gradients",
    "adm_x0_estimator",
    "calibration_loss",
    "config_from_dict",
    "finetune",
    "load_classifier",
    "open_data",
    "random_crop_arr",
    "split_holdout",
    "wrap_module",
]

ClassifierInput = Literal["noisy", "clean", "denoised"]
Precision = Literal["fp32", "fp16", "bf16"]
X0Estimator = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(x_t, t, y) -> x̂0: a diffusion model's clean-image estimate (``"denoised"`` input)."""

INPUTS: tuple[str, ...] = ("noisy", "clean", "denoised")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOG = "log.jsonl"
REPORT = "report.json"
BEFORE = "eval_before.json"
_FORMAT = "fguide-finetune-checkpoint/1"

# Stream tags for derived seeds: each kind of randomness has its own independent stream.
_ORDER, _AUGMENT, _NOISE, _STEP, _EVAL = 1, 2, 3, 4, 5


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one fine-tuning run (the defaults are the paper's where it gives them).

    ``holdout``: a fraction in (0, 1) or a count ≥ 1 of the data kept out of training for the
    before/after evaluation (stratified by class, seeded). ``microbatch``: the largest
    forward/backward chunk (``None``: the whole batch); the update is the full batch's.
    ``input``/``noise_schedule``/``image_size`` ``None`` take the classifier's defaults.
    ``bn``: ``"frozen"`` keeps batch-norm running statistics fixed (eval mode) while training
    the affine parameters; ``"train"`` updates them per micro-batch (then micro-batching no
    longer equals the full batch). The paper gives 12k iterations at batch 256 on ADM's 128
    classifier; lr 1e-5 (constant, ``anneal_lr`` for ADM's linear decay) and weight decay 0.05
    (ADM's classifier training) are fguide's choices.
    """

    iterations: int = 12000
    batch_size: int = 256
    microbatch: int | None = None
    lr: float = 1e-5
    weight_decay: float = 0.05
    anneal_lr: bool = False
    ece_weight: float = 1.0
    beta: float = 1e-4
    precision: Precision = "fp32"
    augment: bool = True
    input: ClassifierInput | None = None
    noise_schedule: str | None = None
    diffusion_steps: int = 1000
    image_size: int | None = None
    holdout: float | int = 0.1
    seed: int = 0
    bn: Literal["frozen", "train"] = "frozen"
    n_bins: int = 10
    checkpoint_every: int = 500
    log_every: int = 10
    eval_batch_size: int | None = None
    workers: int = 4

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad parameter."""

        def positive_int(name: str, v: object) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        positive_int("iterations", self.iterations)
        positive_int("batch_size", self.batch_size)
        if self.microbatch is not None:
            positive_int("microbatch", self.microbatch)
        if self.eval_batch_size is not None:
            positive_int("eval_batch_size", self.eval_batch_size)
        positive_int("checkpoint_every", self.checkpoint_every)
        positive_int("log_every", self.log_every)
        positive_int("n_bins", self.n_bins)
        positive_int("diffusion_steps", self.diffusion_steps)
        if self.image_size is not None:
            positive_int("image_size", self.image_size)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (math.isfinite(self.ece_weight) and self.ece_weight >= 0):
            raise ValueError(f"ece_weight (lambda) must be >= 0, got {self.ece_weight!r}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.input is not None and self.input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS}, got {self.input!r}")
        if self.noise_schedule not in (None, "linear", "cosine"):
            raise ValueError(
                f"noise_schedule must be linear or cosine, got {self.noise_schedule!r}"
            )
        if self.bn not in ("frozen", "train"):
            raise ValueError(f"bn must be 'frozen' or 'train', got {self.bn!r}")
        h = self.holdout
        if isinstance(h, bool) or not (
            (isinstance(h, int) and h >= 1) or (isinstance(h, float) and 0 < h < 1)
        ):
            raise ValueError(f"holdout must be a fraction in (0, 1) or a count >= 1, got {h!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {self.workers!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


# Settings that do not change the trained weights: a resumed run may change them.
# ``microbatch`` only changes float rounding (with frozen batch norm), and a resumed run may
# need a smaller one on a smaller device.
_FREE_KEYS = frozenset(
    {"iterations", "microbatch", "checkpoint_every", "log_every", "eval_batch_size", "workers"}
)


# -- classifiers -------------------------------------------------------------------------------


@dataclass
class Classifier:
    """A trainable classifier and how to call, size, noise and save it.

    ``module`` is what is trained and called: ``module(x_t, t)`` for ``"noisy"`` input,
    ``module(x)`` otherwise. ``export()`` returns the plain state dict written as the final
    file (for a ResNet the bare network's, which :func:`fguide.models.resnet.load_resnet`
    reads; for an ADM preset the ``EncoderUNetModel``'s, which ``load_model(preset, path)``
    reads).
    """

    module: nn.Module
    spec: str
    kind: Literal["adm", "resnet", "module"]
    default_input: ClassifierInput
    image_size: int | None = None
    noise_schedule: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    export: Callable[[], Mapping[str, Tensor]] | None = None

    def state_dict_to_save(self) -> dict[str, Tensor]:
        sd = self.export() if self.export is not None else self.module.state_dict()
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def wrap_module(
    module: nn.Module, default_input: ClassifierInput = "clean", spec: str = "<module>"
) -> Classifier:
    """A :class:`Classifier` for any ``nn.Module`` (``module(x)`` or, noisy, ``module(x, t)``)."""
    if default_input not in INPUTS:
        raise ValueError(f"input must be one of {INPUTS}, got {default_input!r}")
    return Classifier(module, spec, "module", default_input)


def _adm_noise_schedule(image_size: int) -> str:
    """The schedule of the diffusion model of the same size (ADM trained them together)."""
    from fguide.models.presets import PRESETS

    diffusion = PRESETS.get(f"{image_size}x{image_size}_diffusion")
    if diffusion is not None and diffusion.diffusion_flags is not None:
        return str(diffusion.diffusion_flags["noise_schedule"])
    return "linear"


def load_classifier(
    spec: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    softplus_beta: float | None = None,
    input_mode: Literal["elucd", "imagenet"] = "elucd",
    resize: int | None = None,
    num_classes: int | None = None,
) -> Classifier:
    """Build the classifier named by ``spec`` and load ``weights`` (strictly, weights_only).

    ``spec``: an ADM classifier preset (``128x128_classifier``: noisy input, the preset's
    size and schedule), a ResNet (``resnet18`` … ``resnet152``: clean input, wrapped in
    :class:`~fguide.models.resnet.ImageClassifier` with ``input_mode``/``resize``/
    ``softplus_beta``), or ``module:function`` / ``file.py:function`` returning an
    ``nn.Module`` (clean input unless told). Without ``weights`` a preset or ResNet is
    randomly initialised (benchmarks); ``num_classes`` then sets a ResNet's head (1000).
    """
    from fguide.models.loading import load_model
    from fguide.models.presets import PRESETS
    from fguide.models.resnet import ARCHS, ImageClassifier, load_resnet, resnet

    path = None if weights is None else os.fspath(weights)
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"weights: file not found: {path}")
    sha = None if path is None else sha256_file(path)
    if spec in PRESETS:
        preset = PRESETS[spec]
        if preset.kind != "classifier":
            raise ValueError(
                f"classifier: {spec!r} is a diffusion model; classifier presets: "
                + ", ".join(n for n, p in PRESETS.items() if p.kind == "classifier")
            )
        model = load_model(spec, path) if path is not None else preset.build()
        size = int(preset.flags["image_size"])
        return Classifier(model, spec, "adm", "noisy", size, _adm_noise_schedule(size), path, sha)
    if spec in ARCHS:
        if path is not None:
            wrapped = load_resnet(
                spec, path, softplus_beta, input_mode, resize, num_classes=num_classes
            )
        else:
            net = resnet(spec, num_classes or 1000, softplus_beta)
            wrapped = ImageClassifier(net, input_mode, resize)
        inner = wrapped.net
        return Classifier(
            wrapped, spec, "resnet", "clean", None, None, path, sha, export=inner.state_dict
        )
    if ":" not in spec:
        raise ValueError(
            f"classifier: unknown {spec!r}; give an ADM classifier preset ("
            + ", ".join(n for n, p in PRESETS.items() if p.kind == "classifier")
            + f"), a ResNet ({', '.join(ARCHS)}) or 'module:function'"
        )
    built = import_module_spec(spec)
    if not isinstance(built, nn.Module):
        raise ValueError(f"classifier: {spec!r} returned a {type(built).__name__}, not nn.Module")
    if path is not None:
        built = load_model(built, path).train()
    return Classifier(built, spec, "module", "clean", None, None, path, sha)


def adm_x0_estimator(unet: nn.Module, process: Process, class_cond: bool) -> X0Estimator:
    """x̂0 = clip(sqrt(1/ᾱ_t) x_t − sqrt(1/ᾱ_t − 1) ε_θ(x_t, t, y), −1, 1) from an ADM UNet.

    ``process`` must be unrespaced (t are training steps). Variance channels, when the model
    learns Σ, are ignored: x̂0 only needs ε.
    """

    def estimate(x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        out = unet(x_t, t, y) if class_cond else unet(x_t, t)
        eps = out[:, : x_t.shape[1]].to(x_t.dtype)
        return process.x0_from_eps(x_t, t, eps).clamp(-1, 1)

    return estimate


# -- data ----------------------------------------------------------------------------------------


class ImageSource(Protocol):
    """Images with integer labels; ``raw(i)`` is uint8 [H, W, 3] or a PIL image."""

    labels: NDArray[np.int64]
    classes: list[str] | None
    description: str

    def __len__(self) -> int: ...

    def raw(self, index: int) -> NDArray[np.uint8] | Image.Image: ...

    def name(self, index: int) -> str: ...

    def fingerprint(self) -> dict[str, Any]: ...


def _labels_sha(labels: NDArray[np.int64]) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


@dataclass
class FolderSource:
    """An ImageNet-style folder ``root/<class>/<image>``: label = index of the sorted name."""

    folder: ImageFolder
    labels: NDArray[np.int64] = field(init=False)
    classes: list[str] | None = field(init=False)
    description: str = field(init=False)

    def __post_init__(self) -> None:
        self.labels = np.array([k for _, k in self.folder.samples], dtype=np.int64)
        self.classes = list(self.folder.classes)
        self.description = f"image folder {self.folder.root}"

    def __len__(self) -> int:
        return len(self.folder.samples)

    def raw(self, index: int) -> Image.Image:
        path = self.folder.samples[index][0]
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None

    def name(self, index: int) -> str:
        return str(self.folder.samples[index][0])

    def fingerprint(self) -> dict[str, Any]:
        root = self.folder.root
        names = "\n".join(f"{p.relative_to(root)}\t{k}" for p, k in self.folder.samples)
        return {
            "kind": "folder",
            "n": len(self),
            "classes": len(self.folder.classes),
            "files_sha256": hashlib.sha256(names.encode()).hexdigest(),
        }


@dataclass
class ArraySource:
    """In-memory uint8 NHWC images with labels (an ADM ``.npz``: ``arr_0``, ``arr_1``)."""

    images: NDArray[np.uint8]
    labels: NDArray[np.int64]
    description: str = "arrays"
    classes: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 [N, H, W, 3], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, index: int) -> NDArray[np.uint8]:
        return self.images[index]

    def name(self, index: int) -> str:
        return f"{self.description}[{index}]"

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "arrays",
            "n": len(self),
            "shape": list(self.images.shape),
            "labels_sha256": _labels_sha(self.labels),
        }


def open_data(path: str | os.PathLike[str]) -> FolderSource | ArraySource:
    """A class-subfolder tree or an ``.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels)."""
    p = Path(path)
    if p.is_dir():
        return FolderSource(ImageFolder.scan(p))
    if not p.exists():
        raise FileNotFoundError(f"data: not found: {p}")
    if p.suffix.lower() != ".npz":
        raise ValueError(f"data: {p} is neither a folder of class subfolders nor an .npz file")
    images, labels = load_npz_images(p, require_labels=True)
    assert labels is not None
    if len(images) == 0:
        raise ValueError(f"data: {p} holds no images")
    return ArraySource(images, labels, description=str(p))


def random_crop_arr(
    image: Image.Image, size: int, rng: np.random.Generator, min_frac: float = 0.8
) -> NDArray[np.uint8]:
    """ADM's ``random_crop_arr``: short side -> uniform integer in [⌈s/1⌉, ⌈s/0.8⌉] (BOX
    halvings, then BICUBIC), then a uniform ``size`` × ``size`` crop."""
    lo, hi = math.ceil(size / 1.0), math.ceil(size / min_frac)
    short = int(rng.integers(lo, hi + 1))
    arr = resize_short_side(image, short)
    top = int(rng.integers(0, arr.shape[0] - size + 1))
    left = int(rng.integers(0, arr.shape[1] - size + 1))
    return arr[top : top + size, left : left + size]


def _as_pil(raw: NDArray[np.uint8] | Image.Image) -> Image.Image:
    return raw if isinstance(raw, Image.Image) else Image.fromarray(raw)


def _load_one(
    source: ImageSource, index: int, size: int, rng: np.random.Generator | None
) -> NDArray[np.uint8]:
    """Image ``index`` as uint8 [size, size, 3]: ADM's augmentation with ``rng``, else its
    centre crop."""
    raw = source.raw(index)
    if rng is None:
        if isinstance(raw, np.ndarray) and raw.shape[:2] == (size, size):
            return raw  # centre crop of an image already at size: the identity
        return center_crop_arr(_as_pil(raw), size)
    arr = random_crop_arr(_as_pil(raw), size, rng)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr


def _seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (independent streams per tag and index)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def split_holdout(
    labels: NDArray[np.int64], holdout: float | int, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(train indices, held-out indices), stratified by class, seeded, both sorted.

    ``holdout`` is a fraction in (0, 1) (h = round(fraction · n), at least 1) or a count. The h
    held-out places are shared among classes in proportion to their sizes (largest
    remainder, ties to the lower class index), each class's picks drawn at random.
    """
    n = len(labels)
    if isinstance(holdout, float):
        h = max(1, round(holdout * n))
    else:
        h = int(holdout)
    if not 1 <= h < n:
        raise ValueError(
            f"holdout: {holdout!r} keeps {h} of {n} samples; need at least 1 held-out and 1 "
            "training sample"
        )
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * h / n
    take = np.floor(quota).astype(np.int64)
    rest = h - int(take.sum())
    order = np.lexsort((classes, -(quota - take)))  # largest remainder, then lower class
    take[order[:rest]] += 1
    rng = np.random.default_rng([seed, 0x401D])
    held: list[NDArray[np.int64]] = []
    for c, k in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == c)
        held.append(rng.permutation(members)[:k])
    held_idx = np.sort(np.concatenate(held)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask).astype(np.int64), held_idx


class _Loader:
    """Batches of the training stream and the held-out set, loaded by a thread pool.

    The training stream concatenates seeded per-epoch permutations of the training indices;
    step k takes positions kB … kB + B − 1, so the data order is a function of (seed, k).
    """

    def __init__(
        self,
        source: ImageSource,
        train_idx: NDArray[np.int64],
        size: int,
        seed: int,
        augment: bool,
        batch_size: int,
        workers: int,
    ) -> None:
        self.source, self.train_idx, self.size, self.seed = source, train_idx, size, seed
        self.augment, self.batch_size = augment, batch_size
        self.pool = cf.ThreadPoolExecutor(workers) if workers > 0 else None
        self.prefetch = cf.ThreadPoolExecutor(1) if workers > 0 else None
        self._perms: dict[int, NDArray[np.int64]] = {}
        self._pending: tuple[int, cf.Future[tuple[Tensor, Tensor]]] | None = None

    def close(self) -> None:
        for ex in (self.prefetch, self.pool):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)

    def _perm(self, epoch: int) -> NDArray[np.int64]:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, _ORDER, epoch])
            self._perms[epoch] = self.train_idx[rng.permutation(len(self.train_idx))]
        return self._perms[epoch]

    def step_indices(self, step: int) -> NDArray[np.int64]:
        n = len(self.train_idx)
        pos = step * self.batch_size + np.arange(self.batch_size)
        return np.array([self._perm(int(p // n))[p % n] for p in pos], dtype=np.int64)

    def _map(self, fn: Callable[[int], NDArray[np.uint8]], n: int) -> list[NDArray[np.uint8]]:
        if self.pool is None:
            return [fn(j) for j in range(n)]
        return list(self.pool.map(fn, range(n)))

    def load(
        self, indices: Sequence[int], rngs: Sequence[np.random.Generator | None]
    ) -> tuple[Tensor, Tensor]:
        imgs = self._map(
            lambda j: _load_one(self.source, int(indices[j]), self.size, rngs[j]), len(indices)
        )
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = torch.from_numpy(self.source.labels[np.asarray(indices, dtype=np.int64)])
        return x.contiguous(), y

    def _train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        idx = self.step_indices(step)
        rngs = [
            np.random.default_rng([self.seed, _AUGMENT, step, j]) if self.augment else None
            for j in range(len(idx))
        ]
        return self.load(idx.tolist(), rngs)

    def train_batch(self, step: int, prefetch_next: bool = True) -> tuple[Tensor, Tensor]:
        """Step ``step``'s batch (x0 in [−1, 1] NCHW, labels); loads step + 1 meanwhile."""
        if self._pending is not None and self._pending[0] == step:
            batch = self._pending[1].result()
        else:
            batch = self._train_batch(step)
        self._pending = None
        if self.prefetch is not None and prefetch_next:
            self._pending = (step + 1, self.prefetch.submit(self._train_batch, step + 1))
        return batch


# -- loss, inputs, gradient accumulation -------------------------------------------------------


def calibration_loss(
    logits: Tensor, labels: Tensor, ece_weight: float, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(L, CE, L_sECE) with L = CE + λ L_sECE, all batch means, computed in float32 or wider.

    With λ = 0, L_sECE is computed outside the graph (it is still logged): the backward pass
    is then exactly plain cross-entropy training's.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    ce = F.cross_entropy(logits, labels)
    if ece_weight == 0:
        with torch.no_grad():
            return ce, ce, smooth_ece_loss(logits, labels, beta)
    sece = smooth_ece_loss(logits, labels, beta)
    return ce + ece_weight * sece, ce, sece


def _call(module: nn.Module, x: Tensor, t: Tensor | None) -> Tensor:
    out = module(x) if t is None else module(x, t)
    if not isinstance(out, Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"classifier output must be logits [B, N], got {shape}")
    return out


def _classifier_inputs(
    x0: Tensor,
    labels: Tensor,
    kind: ClassifierInput,
    process: Process | None,
    generator: torch.Generator | None,
    denoiser: X0Estimator | None,
) -> tuple[Tensor, Tensor | None]:
    """(input, timesteps or None): x_t and t for "noisy", detached x̂0 for "denoised"."""
    if kind == "clean":
        return x0, None
    assert process is not None
    t = torch.randint(0, process.num_steps, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = process.q_sample(x0, t, noise)
    if kind == "noisy":
        return x_t, process.model_timesteps(t)
    assert denoiser is not None
    with torch.no_grad():
        return denoiser(x_t, process.model_timesteps(t), labels).detach().to(x0.dtype), None


@dataclass
class BatchStats:
    """Batch means of one training step (weighted over its micro-batches) and its logits."""

    loss: float
    ce: float
    smooth_ece: float
    logits: Tensor  # detached, float32, CPU
    labels: Tensor


def _autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def accumulate_gradients(
    module: nn.Module,
    x: Tensor,
    t: Tensor | None,
    labels: Tensor,
    *,
    ece_weight: float = 1.0,
    beta: float = 1e-4,
    microbatch: int | None = None,
    precision: Precision = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> BatchStats:
    """Add ∇L of the batch to the parameters' ``.grad``, micro-batch by micro-batch.

    Micro-batch j of n_j samples back-propagates (n_j/n) L_j, so the accumulated gradient is
    the full batch's ∇L (both terms of L are per-sample means). With ``scaler`` the weighted
    loss is scaled first (fp16).
    """
    n = x.shape[0]
    step = n if microbatch is None else min(microbatch, n)
    parts, all_logits = [], []
    for i in range(0, n, step):
        sl = slice(i, min(i + step, n))
        w = (sl.stop - sl.start) / n
        with _autocast(x.device, precision):
            logits = _call(module, x[sl], None if t is None else t[sl])
        loss, ce, sece = calibration_loss(logits, labels[sl], ece_weight, beta)
        weighted = loss * w
        (scaler.scale(weighted) if scaler is not None else weighted).backward()
        parts.append(w * torch.stack([loss, ce, sece]).detach().double())
        all_logits.append(logits.detach().float())
    # One device sync per step, not one per micro-batch.
    loss_sum, ce_sum, sece_sum = torch.stack(parts).sum(0).tolist()
    logits_cpu = torch.cat(all_logits).cpu()
    return BatchStats(loss_sum, ce_sum, sece_sum, logits_cpu, labels.detach().cpu())


# -- evaluation --------------------------------------------------------------------------------

_T_BUCKETS = 4


def _evaluate(
    module: nn.Module,
    loader: _Loader,
    indices: NDArray[np.int64],
    *,
    kind: ClassifierInput,
    process: Process | None,
    denoiser: X0Estimator | None,
    device: torch.device,
    precision: Precision,
    batch_size: int,
    seed: int,
    n_bins: int,
    beta: float,
) -> tuple[dict[str, Any], Tensor, Tensor]:
    """ECE, accuracy, NLL, Smooth ECE and the reliability diagram on ``indices``.

    Noisy inputs use per-sample (t, ε) seeded by (seed, sample index), so the before and
    after evaluations see the same x_t whatever the batch size; for them the result also has
    ECE and accuracy per quarter of the t range.
    """
    was_training = module.training
    module.eval()
    logits_all, labels_all, t_all = [], [], []
    try:
        with torch.no_grad():
            for start in range(0, len(indices), batch_size):
                idx = indices[start : start + batch_size]
                x0, y = loader.load(idx.tolist(), [None] * len(idx))
                x0, y = x0.to(device), y.to(device)
                t_in: Tensor | None = None
                if kind == "clean":
                    x_in = x0
                else:
                    assert process is not None
                    ts, noises = [], []
                    for i in idx:
                        g = torch.Generator().manual_seed(_seed(seed, _EVAL, int(i)))
                        ts.append(torch.randint(0, process.num_steps, (1,), generator=g))
                        noises.append(torch.randn(x0.shape[1:], generator=g))
                    t = torch.cat(ts).to(device)
                    x_t = process.q_sample(x0, t, torch.stack(noises).to(device, x0.dtype))
                    t_all.append(t.cpu())
                    if kind == "noisy":
                        x_in, t_in = x_t, process.model_timesteps(t)
                    else:
                        assert denoiser is not None
                        x_in = denoiser(x_t, process.model_timesteps(t), y).to(x0.dtype)
                with _autocast(device, precision):
                    logits = _call(module, x_in, t_in)
                logits_all.append(logits.float().cpu())
                labels_all.append(y.cpu())
    finally:
        module.train(was_training)
    logits, labels = torch.cat(logits_all), torch.cat(labels_all)
    stats = reliability_diagram(logits, labels, n_bins, kind="logits")
    result: dict[str, Any] = {
        "n": len(labels),
        "ece": stats.ece,
        "accuracy": float((logits.argmax(1) == labels).double().mean()),
        "mean_confidence": float(torch.softmax(logits.double(), 1).max(1).values.mean()),
        "nll": float(F.cross_entropy(logits.double(), labels)),
        "smooth_ece": float(smooth_ece_loss(logits.double(), labels, beta)),
        "reliability": stats.to_dict(),
    }
    if t_all and process is not None:
        t_cat = torch.cat(t_all)
        edges = np.linspace(0, process.num_steps, _T_BUCKETS + 1).round().astype(int)
        buckets = []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            m = (t_cat >= int(lo)) & (t_cat < int(hi))
            if m.any():
                s = reliability_diagram(logits[m], labels[m], n_bins, kind="logits")
                acc = float((logits[m].argmax(1) == labels[m]).double().mean())
                buckets.append(
                    {
                        "t_range": [int(lo), int(hi) - 1],
                        "n": int(m.sum()),
                        "ece": s.ece,
                        "accuracy": acc,
                    }
                )
        result["by_t"] = buckets
    return result, logits, labels


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


class _Interrupt:
    """SIGINT/SIGTERM set a flag that the loop reads after each step (a second one raises)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():  # signal() needs it
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _resolve(
    config: FinetuneConfig, classifier: Classifier, source: ImageSource
) -> tuple[ClassifierInput, str, int]:
    kind: ClassifierInput = config.input or classifier.default_input
    schedule = config.noise_schedule or classifier.noise_schedule or "linear"
    size = config.image_size or classifier.image_size
    if size is None:
        if isinstance(source, ArraySource) and source.images.shape[1] == source.images.shape[2]:
            size = int(source.images.shape[1])
        else:
            size = 128  # the paper's and EluCD's resolution
    return kind, schedule, size


def _check_labels(source: ImageSource, num_classes: int, spec: str) -> None:
    if source.classes is not None and len(source.classes) != num_classes:
        raise ValueError(
            f"data: {source.description} has {len(source.classes)} class folders but the "
            f"classifier {spec!r} outputs {num_classes} classes (labels are the sorted folder "
            "names' indices, so the folder must hold every class)"
        )
    bad = (source.labels < 0) | (source.labels >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"data: {source.description}: label {int(source.labels[i])} of sample {i} is outside "
            f"[0, {num_classes}) for the classifier {spec!r} ({int(bad.sum())} such labels)"
        )


def _probe_classes(
    module: nn.Module, kind: ClassifierInput, size: int, device: torch.device
) -> int:
    """N from one forward pass on a blank image (checks the input size fits, too)."""
    was = module.training
    module.eval()
    x = torch.zeros(1, 3, size, size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device) if kind == "noisy" else None
    try:
        with torch.no_grad():
            out = _call(module, x, t)
    except (RuntimeError, AssertionError, TypeError) as err:
        call = "f(x_t, t)" if t is not None else "f(x)"
        raise ValueError(
            f"classifier: a forward pass {call} on a {size}x{size} image failed ({err}); "
            "check image_size (--image-size) and input (--input)"
        ) from None
    finally:
        module.train(was)
    return int(out.shape[1])


def _set_train_mode(module: nn.Module, bn: str) -> None:
    module.train()
    if bn == "frozen":
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _write_state(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _plot(stats: Mapping[str, Any], path: Path, title: str) -> None:
    from fguide.metrics.calibration import ReliabilityStats

    rs = ReliabilityStats(
        edges=np.asarray(stats["edges"], dtype=np.float64),
        count=np.asarray(stats["count"], dtype=np.int64),
        mean_confidence=np.asarray(
            [np.nan if v is None else v for v in stats["mean_confidence"]], dtype=np.float64
        ),
        accuracy=np.asarray([np.nan if v is None else v for v in stats["accuracy"]], np.float64),
        ece=float(stats["ece"]),
    )
    tmp = path.with_name(f".{path.stem}.tmp.png")
    plot_reliability(rs, tmp, title=title)
    os.replace(tmp, path)


def _config_dict(config: FinetuneConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def _trim_log(path: Path, step: int) -> None:
    """Keep the log lines of steps ≤ ``step`` (those after the checkpoint are redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
    atomic_write(path, lambda f: f.write("".join(s + "\n" for s in kept).encode()))


def finetune(
    classifier: Classifier,
    data: ImageSource,
    out_dir: str | os.PathLike[str],
    config: FinetuneConfig | None = None,
    *,
    denoiser: X0Estimator | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``classifier`` with CE + λ·Smooth ECE on ``data``; resume from ``out_dir``.

    Writes into ``out_dir``: ``checkpoint.pt`` (every ``checkpoint_every`` steps, on
    SIGINT/SIGTERM and at the end; loadable with ``weights_only=True``), ``log.jsonl`` (CE,
    Smooth ECE, ECE and accuracy of the training batches, every ``log_every`` steps),
    ``eval_before.json``, and at the end ``model.pt`` (a plain state dict), ``report.json``
    (held-out ECE and accuracy before and after, configuration, checksums, provenance) and
    ``reliability_before.png`` / ``reliability_after.png``. Every file is written atomically.

    Calling again with the same arguments resumes from ``checkpoint.pt`` (a larger
    ``iterations`` continues a finished run); different trajectory settings are refused.
    ``on_step(step, metrics)`` is called after every optimizer step (``step`` counts done
    steps).
    """
    config = config or FinetuneConfig()
    config.validate()
    out = Path(out_dir)
    dev = resolve_device(device)
    kind, schedule, size = _resolve(config, classifier, data)
    if kind == "denoised" and denoiser is None:
        raise ValueError("input 'denoised' needs a diffusion model (denoiser) for x̂0")
    if len(data) < 2:
        raise ValueError(f"data: {data.description} has {len(data)} image(s); need at least 2")
    module = classifier.module.to(dev)
    num_classes = _probe_classes(module, kind, size, dev)
    _check_labels(data, num_classes, classifier.spec)
    train_idx, held_idx = split_holdout(data.labels, config.holdout, config.seed)
    process = (
        None
        if kind == "clean"
        else make_process(schedule, config.diffusion_steps, "", "fixed_small")
    )
    eval_bs = config.eval_batch_size or config.microbatch or config.batch_size

    identity = {
        "config": {k: v for k, v in _config_dict(config).items() if k not in _FREE_KEYS},
        "classifier": {"spec": classifier.spec, "weights_sha256": classifier.weights_sha256},
        "data": data.fingerprint(),
        "resolved": {"input": kind, "noise_schedule": schedule, "image_size": size},
    }
    if config.anneal_lr:  # the learning rate then depends on the total step count
        identity["config"]["iterations"] = config.iterations

    optimizer = torch.optim.AdamW(
        module.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=config.precision == "fp16")

    def make_inputs(x0: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        return _classifier_inputs(x0, y, kind, process, gen, denoiser)

    trainer = _Trainer(module, optimizer, scaler, config, make_inputs, dev)

    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / CHECKPOINT, out / LOG
    before: dict[str, Any] | None = None
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{ckpt_path} is not a fguide finetune checkpoint")
        _check_identity(state["identity"], identity, ckpt_path)
        if int(state["step"]) > config.iterations:
            raise ValueError(
                f"iterations: {ckpt_path} is already at step {state['step']} > iterations "
                f"{config.iterations}; raise iterations or use a new output folder"
            )
        trainer.load_state(state)
        before = json.loads(state["before"])
        report_path = out / REPORT
        if trainer.step == config.iterations and report_path.exists() and (out / MODEL).exists():
            report = json.loads(report_path.read_text())
            if report.get("training", {}).get("steps") == trainer.step:
                return FinetuneResult("already_complete", trainer.step, out, report)
        _trim_log(log_path, trainer.step)
    elif log_path.exists():
        log_path.unlink()  # a log without its checkpoint belongs to no run we can resume

    loader = _Loader(
        data, train_idx, size, config.seed, config.augment, config.batch_size, config.workers
    )

    def held_out_eval() -> dict[str, Any]:
        result, _, _ = _evaluate(
            module,
            loader,
            held_idx,
            kind=kind,
            process=process,
            denoiser=denoiser,
            device=dev,
            precision=config.precision,
            batch_size=eval_bs,
            seed=config.seed,
            n_bins=config.n_bins,
            beta=config.beta,
        )
        return result

    status: Literal["completed", "interrupted"] = "completed"
    start_step = trainer.step
    try:
        if before is None:
            before = held_out_eval()
            atomic_write_json(out / BEFORE, before)
        t_start = time.perf_counter()
        extra = {"format": _FORMAT, "identity": identity, "before": json.dumps(before)}

        def save() -> None:
            _write_state(ckpt_path, {**extra, **trainer.state()})

        if trainer.step < config.iterations:
            with _Interrupt() as interrupt, _rng_fork(dev):
                status = _train_loop(trainer, loader, save, interrupt, log_path, progress, on_step)
        if status == "interrupted":
            return FinetuneResult("interrupted", trainer.step, out)
        train_seconds = time.perf_counter() - t_start
        _write_state(out / MODEL, classifier.state_dict_to_save())
        after = held_out_eval()
    finally:
        loader.close()

    _plot(before["reliability"], out / "reliability_before.png", f"before: ECE {before['ece']:.4f}")
    _plot(after["reliability"], out / "reliability_after.png", f"after: ECE {after['ece']:.4f}")
    report = {
        "before": before,
        "after": after,
        "delta": {k: after[k] - before[k] for k in ("ece", "accuracy", "nll", "smooth_ece")},
        "training": {
            "steps": trainer.step,
            "steps_this_call": trainer.step - start_step,
            "seconds_this_call": train_seconds,
            "samples_seen": trainer.step * config.batch_size,
        },
        "config": _config_dict(config),
        "resolved": identity["resolved"] | {"num_classes": num_classes, "device": str(dev)},
        "classifier": {
            "spec": classifier.spec,
            "kind": classifier.kind,
            "weights": classifier.weights,
            "weights_sha256": classifier.weights_sha256,
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
    return FinetuneResult("completed", trainer.step, out, report)


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


@contextlib.contextmanager
def _rng_fork(device: torch.device) -> Iterator[None]:
    """Leave the caller's global torch RNG as it was (the loop reseeds it every step)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@dataclass
class _Trainer:
    """The mutable training state (what a checkpoint holds) and one optimizer step."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: FinetuneConfig
    make_inputs: Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor | None]]
    device: torch.device
    step: int = 0
    # Batches since the last log line: kept in checkpoints so that a resumed run logs the
    # same windows as an uninterrupted one.
    window: list[BatchStats] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "window": [
                {
                    "loss": s.loss,
                    "ce": s.ce,
                    "smooth_ece": s.smooth_ece,
                    "logits": s.logits,
                    "labels": s.labels,
                }
                for s in self.window
            ],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.window = [
            BatchStats(w["loss"], w["ce"], w["smooth_ece"], w["logits"], w["labels"])
            for w in state["window"]
        ]

    def lr(self) -> float:
        c = self.config
        return c.lr * (1 - self.step / c.iterations) if c.anneal_lr else c.lr

    def train_step(self, x0: Tensor, y: Tensor, gen: torch.Generator) -> BatchStats:
        """One AdamW step on CE + λ·sECE of the batch (x0, y); every draw from (seed, step)."""
        c, lr = self.config, self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        gen.manual_seed(_seed(c.seed, _NOISE, self.step))  # t and ε
        torch.manual_seed(_seed(c.seed, _STEP, self.step))  # dropout and the like
        x_in, t = self.make_inputs(x0, y, gen)
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler if self.scaler.is_enabled() else None
        stats = accumulate_gradients(
            self.module,
            x_in,
            t,
            y,
            ece_weight=c.ece_weight,
            beta=c.beta,
            microbatch=c.microbatch,
            precision=c.precision,
            scaler=scaler,
        )
        if not math.isfinite(stats.loss):
            raise FloatingPointError(
                f"non-finite loss at step {self.step} ({stats.loss}); lower lr or use fp32"
            )
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self.window.append(stats)
        return stats

    def flush_window(self, lr: float) -> dict[str, float]:
        """Log line of the batches since the last one: mean CE / sECE, pooled ECE and accuracy."""
        w, self.window = self.window, []
        logits, labels = torch.cat([s.logits for s in w]), torch.cat([s.labels for s in w])
        return {
            "step": self.step,
            "lr": lr,
            "loss": float(np.mean([s.loss for s in w])),
            "ce": float(np.mean([s.ce for s in w])),
            "smooth_ece": float(np.mean([s.smooth_ece for s in w])),
            "ece": reliability_diagram(logits, labels, self.config.n_bins, kind="logits").ece,
            "accuracy": float((logits.argmax(1) == labels).double().mean()),
        }


def _train_loop(
    trainer: _Trainer,
    loader: _Loader,
    save: Callable[[], None],
    interrupt: _Interrupt,
    log_path: Path,
    progress: bool,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> Literal["completed", "interrupted"]:
    from tqdm.auto import tqdm

    c = trainer.config
    _set_train_mode(trainer.module, c.bn)
    gen = torch.Generator(device=trainer.device)
    t_window, n_window = time.perf_counter(), 0
    bar = tqdm(
        total=c.iterations,
        initial=trainer.step,
        disable=not progress,
        unit="step",
        desc="finetune",
        dynamic_ncols=True,
    )
    with bar, open(log_path, "a", encoding="utf-8") as log:
        while trainer.step < c.iterations:
            lr = trainer.lr()
            x0, y = loader.train_batch(trainer.step, prefetch_next=trainer.step + 1 < c.iterations)
            stats = trainer.train_step(x0.to(trainer.device), y.to(trainer.device), gen)
            n_window += 1
            step = trainer.step
            metrics = {"loss": stats.loss, "ce": stats.ce, "smooth_ece": stats.smooth_ece}
            if step % c.log_every == 0 or step == c.iterations:
                elapsed = time.perf_counter() - t_window
                metrics = trainer.flush_window(lr)
                metrics["steps_per_s"] = n_window / elapsed if elapsed > 0 else float("nan")
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                bar.set_postfix(
                    ce=f"{metrics['ce']:.3f}",
                    sece=f"{metrics['smooth_ece']:.3f}",
                    ece=f"{metrics['ece']:.3f}",
                    acc=f"{metrics['accuracy']:.3f}",
                    refresh=False,
                )
                t_window, n_window = time.perf_counter(), 0
            bar.update(1)
            if on_step is not None:
                on_step(step, metrics)
            if interrupt.signum is not None:
                save()
                return "interrupted"
            if step % c.checkpoint_every == 0 or step == c.iterations:
                save()
    return "completed"


def config_from_dict(d: Mapping[str, Any]) -> FinetuneConfig:
    """A :class:`FinetuneConfig` from a mapping (unknown keys are an error)."""
    names = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown finetune setting(s) {unknown}; valid: {sorted(names)}")
    return FinetuneConfig(**dict(d))
