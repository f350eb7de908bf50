"""The digits world: learned models on real data (scikit-learn's bundled handwritten digits).

``fguide demo --world digits`` tests the paper's claims end to end on CPU with learned
networks, where the Gaussian-mixture world (:mod:`fguide.worlds.demo`) has exact ones.

Data. ``sklearn.datasets.load_digits``: 1,797 images of 8 × 8 pixels with 17 grey levels
v ∈ {0..16}, 10 classes, shipped inside scikit-learn (no download). An image is stored as
uint8 u = round(255 v / 16), replicated to 3 channels (ADM's models and fguide's pipeline are
RGB), and enters the networks as x = u / 127.5 − 1 ∈ [−1, 1] (fguide's and ADM's map), at
8 × 8: the UNet has two levels (one downsampling), so 8 is divisible by 2^(2−1); no
upsampling is needed. A seeded, stratified split keeps 20 % of every class as the held-out
set (:func:`split_digits`), used only for metrics and calibration evaluation.

Networks (trained once per configuration and cached; :mod:`fguide.worlds.digits_train`):

- the diffusion model: fguide's ADM UNet (:func:`fguide.models.presets.create_model`, 32
  channels, multipliers (1, 1) — (1, 2) in :meth:`DigitsConfig.full_config` —, one residual
  block per level, attention at 4 × 4), ε-prediction, linear betas, T = 1000, fixed variance,
  unconditional (guidance supplies the class);
- the off-the-shelf classifier :func:`clean_classifier` (a SiLU CNN) trained on clean images
  only: the EluCD setting, it sees x̂0 during guidance;
- the noise-aware classifier: ADM's EncoderUNet (:func:`~fguide.models.presets.create_classifier`)
  trained on x_t with t uniform, the timestep passed: the classic-guidance baseline;
- the feature network :func:`feature_network` (another architecture — ReLU, max-pooling, a
  64-d bottleneck — and another seed; never a guide): its features define the Fréchet
  distance and precision/recall against the held-out split, and its arg-max the independent
  accuracy of the samples.

Every method then runs through :func:`fguide.sampling.run_sampling` (``fguide sample``'s code)
with the networks as state-dict files and the classifiers as import specs
(``fguide.worlds.digits:clean_classifier``) or ``adm`` + flags; :mod:`fguide.worlds.digits_run`
orchestrates, :mod:`fguide.worlds.digits_report` writes the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from fguide import rng as streams
from fguide.io.images import from_uint8_nhwc

__all__ = [
    "CLEAN_CLASSIFIER_SPEC",
    "FEATURE_NETWORK_SPEC",
    "FAMILY_METHODS",
    "PAPER_METHODS",
    "DigitsConfig",
    "DigitsData",
    "DigitsCNN",
    "FeatureNet",
    "clean_classifier",
    "feature_network",
    "load_digits_data",
    "mean_std",
    "paired_vs",
    "split_digits",
    "to_model_input",
]

NUM_CLASSES = 10
IMAGE_SIZE = 8
CLEAN_CLASSIFIER_SPEC = "fguide.worlds.digits:clean_classifier"
FEATURE_NETWORK_SPEC = "fguide.worlds.digits:feature_network"


# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsData:
    """All 1,797 images (uint8 [n, 8, 8, 3]) and labels, with the train/held-out split."""

    images: NDArray[np.uint8]
    labels: NDArray[np.int64]
    train: NDArray[np.int64]
    held: NDArray[np.int64]

    def x(self, idx: NDArray[np.int64] | None = None) -> Tensor:
        """Images ``idx`` as float32 NCHW in [−1, 1]."""
        return to_model_input(self.images if idx is None else self.images[idx])

    def y(self, idx: NDArray[np.int64]) -> Tensor:
        return torch.from_numpy(self.labels[idx])


def to_model_input(images: NDArray[np.uint8]) -> Tensor:
    """uint8 NHWC → float32 NCHW, x = u / 127.5 − 1 (the pipeline's map, as ADM's)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [n, H, W, C], got {images.dtype} {images.shape}")
    return from_uint8_nhwc(images).contiguous()


def split_digits(
    labels: NDArray[np.int64], held_fraction: float = 0.2, seed: int = 0
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(train, held-out) indices, both sorted: round(fraction · n_c) of every class c held
    out, chosen by a permutation seeded by (seed, c); disjoint and together all indices."""
    if not 0 < held_fraction < 1:
        raise ValueError(f"held_fraction must be in (0, 1), got {held_fraction!r}")
    held: list[NDArray[np.int64]] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, round(held_fraction * len(members)))
        perm = streams.numpy_rng(seed, int(c), streams.DIGITS_SPLIT).permutation(members)
        held.append(perm[:k])
    held_idx = np.sort(np.concatenate(held)).astype(np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask).astype(np.int64), held_idx


def load_digits_data(held_fraction: float = 0.2, split_seed: int = 0) -> DigitsData:
    """scikit-learn's digits as uint8 u = round(255 v / 16) (v ∈ 0..16), 3 equal channels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # a clear message rather than a bare ImportError
        raise ImportError(
            "the digits world needs scikit-learn (pip install scikit-learn): " + str(err)
        ) from None
    bunch = load_digits()
    grey = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8], values 0..16
    u = np.rint(grey * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(u[..., None], 3, axis=-1)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train, held = split_digits(labels, held_fraction, split_seed)
    return DigitsData(np.ascontiguousarray(images), labels, train, held)


# -- networks (import-spec targets: ``fguide.worlds.digits:clean_classifier``) ---------------


class DigitsCNN(nn.Module):
    """The off-the-shelf classifier: 3 SiLU convolutions (one strided), mean pool, linear.

    SiLU rather than ReLU so its input gradient is smooth (EluCD softens its ResNets' ReLUs
    with Softplus for the same reason).
    """

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class FeatureNet(nn.Module):
    """The evaluation network (never a guide): ReLU convolutions, max-pooling, a 64-d ReLU
    bottleneck (:meth:`features`), a linear head."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def clean_classifier() -> DigitsCNN:
    """Import-spec factory of the off-the-shelf classifier (weights loaded by the caller)."""
    return DigitsCNN()


def feature_network() -> FeatureNet:
    """Import-spec factory of the evaluation network (weights loaded by the caller)."""
    return FeatureNet()


# -- configuration -----------------------------------------------------------------------------


def _unet_flags(channel_mult: str = "1,1") -> dict[str, Any]:
    """The UNet: (1, 1) by default, (1, 2) in :meth:`DigitsConfig.full_config`."""
    return {
        "image_size": IMAGE_SIZE,
        "num_channels": 32,
        "num_res_blocks": 1,
        "channel_mult": channel_mult,
        "attention_resolutions": "4",
        "num_heads": 4,
        "dropout": 0.1,
        "learn_sigma": False,
        "class_cond": False,
        "use_scale_shift_norm": True,
        "noise_schedule": "linear",
        "diffusion_steps": 1000,
    }


def _adm_classifier_flags() -> dict[str, Any]:
    return {
        "image_size": IMAGE_SIZE,
        "classifier_width": 32,
        "classifier_depth": 1,
        "classifier_attention_resolutions": "4",
        "channel_mult": "1,2",
        "num_head_channels": 32,
        "out_channels": NUM_CLASSES,
        "classifier_pool": "attention",
    }


FAMILY_METHODS = ("dps", "freedom", "mpgd", "ugd", "tfg")
"""The training-free family's rows (``--guidance-method``; issue 21)."""
METHODS = (
    "none",
    "adm_cg",
    "logsoftmax",
    "base",
    "entropy",
    "rkl",
    "fkl",
    "js",
    "hellinger",
    "tilted",
    *FAMILY_METHODS,
)
"""The methods of the table: ``adm_cg`` is ADM's classic guidance with the noise-aware
classifier on x_t (``logsoftmax`` objective, no sine boost); the objectives guide with the
off-the-shelf classifier on x̂0 with the named :func:`fguide.objective` (EluCD's mean shift);
the training-free family (:mod:`fguide.worlds.digits_family`) with ``logsoftmax`` and its own
update rule."""
PAPER_METHODS = tuple(m for m in METHODS if m not in FAMILY_METHODS)
"""The default run's rows: the family adds about 144 s of CPU on 2 cores (its sweeps and runs,
README), which would take the default run past its 5-minute (empty cache) and 2-minute (cached)
budget; ``fguide demo --world digits --family`` adds it."""


@dataclass
class DigitsConfig:
    """Settings of the digits world (every default is stated in the report).

    Training (part of the cache key): ``*_steps`` optimizer steps at ``train_batch``; the
    diffusion model keeps an EMA of its weights (``ema``). The defaults are sized for minutes
    on 2 CPU cores; :meth:`full_config` is the larger run, :meth:`quick_config` a smoke run.
    Sampling: DDPM with
    ``sample_steps`` respaced steps, ``num_samples`` per run (class-balanced targets), over
    ``seeds``; the guidance scale of the x̂0 methods is chosen by sweeping ``base`` over
    ``scale_grid`` on ``validation_seed`` (mean per-class Fréchet distance, METHODS.md §8),
    ADM's classic guidance gets its own sweep over ``adm_scale_grid`` (its scale multiplies
    another gradient), each training-free method its own over ``family_scale_grid``.
    Fine-tuning: ``finetune_iters`` steps of ``fguide.finetune`` on x̂0.
    Calibration comparison (:mod:`fguide.worlds.digits_calib`): ``calib_steps`` AdamW steps
    per loss and seed in ``calib_seeds``, at the t of ``calib_t_grid`` whose accuracy (on every
    ``calib_select_every``-th training image) is nearest each of ``calib_accuracy_targets``,
    fitted and measured on every ``calib_fit_every``-th image.
    """

    seed: int = 0
    held_fraction: float = 0.2
    unet: dict[str, Any] = field(default_factory=_unet_flags)
    adm_classifier: dict[str, Any] = field(default_factory=_adm_classifier_flags)
    train_batch: int = 128
    diffusion_steps: int = 1200
    diffusion_lr: float = 2e-3
    ema: float = 0.995
    classifier_steps: int = 500
    noisy_classifier_steps: int = 600
    feature_steps: int = 500
    classifier_lr: float = 2e-3
    # sampling
    sample_steps: int = 25
    num_samples: int = 200
    batch_size: int = 200
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    validation_seed: int = 100
    sweep_samples: int = 200
    scale_grid: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
    adm_scale_grid: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0, 64.0)
    tilt_group: int = 8
    methods: tuple[str, ...] = PAPER_METHODS
    family_scale_grid: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    """The training-free family's strength grid (one sweep per method; TFG: a gain on its
    (ρ̄, μ̄)). A pilot over 4^k, k = −6…2 (100 samples, validation seed) put every method's
    best class FD within 0.25–4, and a sweep over 0.125–4 chose within 0.25–2: the default
    sweeps that range only (the family's cost, README)."""
    # fine-tuning (Table 1) and the calibration-loss comparison
    finetune_iters: int = 150
    finetune_lr: float = 1e-4
    calib_steps: int = 150
    calib_seeds: tuple[int, ...] = (0, 1, 2)
    calib_accuracy_targets: tuple[float, float] = (0.5, 0.9)
    calib_t_grid: tuple[int, ...] = tuple(range(50, 1000, 50))
    calib_select_every: int = 3
    calib_fit_every: int = 1
    calib_lr: float = 3e-4
    quick: bool = False
    full: bool = False

    @classmethod
    def quick_config(cls, **kw: Any) -> DigitsConfig:
        """A smoke run of seconds (tests, checking an installation): networks trained a few
        dozen steps (cached apart from the default's), 40 samples of 5 DDPM steps on one
        seed. It exercises every step of the pipeline; its numbers mean nothing."""
        base: dict[str, Any] = dict(
            diffusion_steps=20,
            classifier_steps=30,
            noisy_classifier_steps=10,
            feature_steps=30,
            train_batch=64,
            sample_steps=5,
            num_samples=40,
            batch_size=40,
            seeds=(0,),
            sweep_samples=40,
            scale_grid=(1.0, 4.0),
            adm_scale_grid=(4.0,),
            family_scale_grid=(1.0,),
            finetune_iters=3,
            calib_steps=3,
            calib_seeds=(0,),
            calib_t_grid=(100, 600),
            calib_select_every=12,
            calib_fit_every=8,
            quick=True,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def full_config(cls, **kw: Any) -> DigitsConfig:
        """The larger configuration (``--full``, tens of minutes on 2 cores): the UNet with
        channel multipliers (1, 2) trained 1500 steps at 1e−3, 3 seeds × 400 samples, the
        regimes of the calibration comparison chosen on every training image."""
        base: dict[str, Any] = dict(
            unet=_unet_flags("1,2"),
            diffusion_steps=1500,
            diffusion_lr=1e-3,
            num_samples=400,
            seeds=(0, 1, 2),
            calib_select_every=1,
            full=True,
        )
        base.update(kw)
        return cls(**base)

    def training_key(self) -> dict[str, Any]:
        """The settings that determine the trained networks (the cache key's content)."""
        keys = (
            "seed",
            "held_fraction",
            "unet",
            "adm_classifier",
            "train_batch",
            "diffusion_steps",
            "diffusion_lr",
            "ema",
            "classifier_steps",
            "noisy_classifier_steps",
            "feature_steps",
            "classifier_lr",
        )
        d = asdict(self)
        return {k: d[k] for k in keys}

    def with_(self, **kw: Any) -> DigitsConfig:
        return replace(self, **kw)


def mean_std(
    per_seed: Sequence[Mapping[str, Any]], keys: Iterable[str]
) -> dict[str, dict[str, float | None]]:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) over seeds of each of
    ``keys`` (None values left out; None when there is none)."""
    mean: dict[str, float | None] = {}
    std: dict[str, float | None] = {}
    for k in keys:
        vals = [r[k] for r in per_seed if r.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
        std[k] = float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None)
    return {"mean": mean, "std": std}


PAIRED_KEYS = ("fd", "fd_class", "accuracy")


def paired_vs(
    per_seed: Sequence[Mapping[str, Any]],
    reference: Sequence[Mapping[str, Any]],
    keys: Iterable[str] = PAIRED_KEYS,
) -> dict[str, dict[str, float | None]]:
    """Per-seed differences to ``reference`` (same seeds, hence the same initial noise of every
    sample): mean, std (ddof 1) and the half-width of the 95 % confidence interval of the mean
    difference, t_{0.975, k−1} · std / √k over k seeds (None for one seed)."""
    from scipy.stats import t as student_t

    diffs = [
        {k: float(a[k]) - float(b[k]) for k in keys}
        for a, b in zip(per_seed, reference, strict=True)
    ]
    out: dict[str, dict[str, float | None]] = {**mean_std(diffs, keys), "ci95": {}}
    k = len(diffs)
    for key in keys:
        sd = out["std"][key]
        out["ci95"][key] = (
            None if k < 2 or sd is None else float(student_t.ppf(0.975, k - 1) * sd / k**0.5)
        )
    return out
