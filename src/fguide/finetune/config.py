"""Settings of a ``fguide finetune`` run (METHODS.md section 4): one frozen dataclass.

The command line (:mod:`fguide.cli.finetune`) reads its defaults from :class:`FinetuneConfig`,
so the API and ``--help`` agree. :data:`FREE_KEYS` are the settings a resumed run may change.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from fguide import accel
from fguide.metrics.calibration import CALIBRATION_LOSSES
from fguide.params import ParamError, Range, check_ranges

__all__ = [
    "FREE_KEYS",
    "INPUTS",
    "PARAM_RANGES",
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
        """Raise :class:`~fguide.params.ParamError` naming the first bad parameter."""
        check_ranges(self, PARAM_RANGES)
        for name, choices in (
            ("calibration_loss", tuple(CALIBRATION_LOSSES)),
            ("precision", PRECISIONS),
            ("input", (None, *INPUTS)),
            ("noise_schedule", (None, "linear", "cosine")),
            ("bn", ("frozen", "train")),
        ):
            value = getattr(self, name)
            if value not in choices:
                valid = ", ".join(str(c) for c in choices if c is not None)
                raise ParamError(
                    "{0} must be one of {valid}; got {v!r}", name, valid=valid, v=value
                )
        h = self.holdout
        if isinstance(h, bool) or not (
            (isinstance(h, int) and h >= 1) or (isinstance(h, float) and 0 < h < 1)
        ):
            raise ParamError(
                "{0} must be a fraction in (0, 1) or a count >= 1; got {v!r}", "holdout", v=h
            )


PARAM_RANGES: dict[str, Range] = {
    "iterations": Range(int, 1),
    "batch_size": Range(int, 1),
    "microbatch": Range(int, 1),
    "eval_batch_size": Range(int, 1),
    "checkpoint_every": Range(int, 1),
    "log_every": Range(int, 1),
    "n_bins": Range(int, 1),
    "diffusion_steps": Range(int, 1),
    "image_size": Range(int, 1),
    "lr": Range(float, 0, low_open=True),
    "weight_decay": Range(float, 0),
    "ece_weight": Range(float, 0),
    "beta": Range(float, 0),
    "workers": Range(int, 0),
    "seed": Range(int, 0),
}
"""The domain of every numeric setting (``workers`` 0: images are read in the training thread,
without prefetching); ``fguide finetune`` parses its flags with the same ranges."""


# Settings that do not change the trained weights: a resumed run may change them.
# ``microbatch`` only changes float rounding (with frozen batch norm), and a resumed run may
# need a smaller one on a smaller device.
FREE_KEYS = frozenset(
    {"iterations", "microbatch", "checkpoint_every", "log_every", "eval_batch_size", "workers"}
)


def config_dict(config: FinetuneConfig) -> dict[str, Any]:
    """The configuration as a JSON-able dict (field order)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}
