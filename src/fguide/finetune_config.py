"""Settings of a ``fguide finetune`` run (METHODS.md section 4): one frozen dataclass.

The command line (:mod:`fguide.cli.finetune`) reads its defaults from :class:`FinetuneConfig`,
so the API and ``--help`` agree. :data:`FREE_KEYS` are the settings a resumed run may change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from fguide import accel
from fguide.metrics.calibration import CALIBRATION_LOSSES

__all__ = [
    "FREE_KEYS",
    "INPUTS",
    "PRECISIONS",
    "ClassifierInput",
    "FinetuneConfig",
    "Precision",
    "config_dict",
]

ClassifierInput = Literal["noisy", "clean", "denoised"]
Precision = Literal["fp32", "fp16", "bf16"]
INPUTS: tuple[str, ...] = ("noisy", "clean", "denoised")
PRECISIONS: tuple[str, ...] = tuple(accel.PRECISIONS)


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
    (ADM's classifier training) are fguide's choices. The loss is CE + ``ece_weight`` · the
    ``calibration_loss`` term (a name in
    :data:`fguide.metrics.calibration.CALIBRATION_LOSSES`: ``smooth_ece``, the paper's, or
    ``soft_binned_ece``) with smoothing ``beta`` (the soft-binned ECE is not a per-sample
    mean: with ``microbatch`` it is binned per chunk, not over the whole batch).
    """

    iterations: int = 12000
    batch_size: int = 256
    microbatch: int | None = None
    lr: float = 1e-5
    weight_decay: float = 0.05
    anneal_lr: bool = False
    ece_weight: float = 1.0
    beta: float = 1e-4
    calibration_loss: str = "smooth_ece"
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
        if self.calibration_loss not in CALIBRATION_LOSSES:
            raise ValueError(
                f"calibration_loss must be one of {', '.join(CALIBRATION_LOSSES)}, got "
                f"{self.calibration_loss!r}"
            )
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
FREE_KEYS = frozenset(
    {"iterations", "microbatch", "checkpoint_every", "log_every", "eval_batch_size", "workers"}
)


def config_dict(config: FinetuneConfig) -> dict[str, Any]:
    """The configuration as a JSON-able dict (field order)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}
