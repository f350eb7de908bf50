"""Deprecated (removed in the next release): ``fguide.finetune_loop`` moved to
:mod:`fguide.finetune.loop`; this module re-exports its names."""

import warnings

from fguide.finetune.loop import (
    Interrupt,
    Trainer,
    rng_fork,
    set_train_mode,
    train_loop,
    trim_log,
)

__all__ = [
    "Interrupt",
    "Trainer",
    "rng_fork",
    "set_train_mode",
    "train_loop",
    "trim_log",
]

warnings.warn(
    "fguide.finetune_loop is deprecated; import from fguide.finetune.loop",
    DeprecationWarning,
    stacklevel=2,
)
