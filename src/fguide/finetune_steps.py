"""Deprecated (removed in the next release): ``fguide.finetune_steps`` moved to
:mod:`fguide.finetune.steps`; this module re-exports its names."""

import warnings

from fguide.finetune.steps import (
    BatchStats,
    X0Estimator,
    accumulate_gradients,
    call_classifier,
    classifier_inputs,
    evaluate_held_out,
    training_loss,
)

__all__ = [
    "BatchStats",
    "X0Estimator",
    "accumulate_gradients",
    "call_classifier",
    "classifier_inputs",
    "evaluate_held_out",
    "training_loss",
]

warnings.warn(
    "fguide.finetune_steps is deprecated; import from fguide.finetune.steps",
    DeprecationWarning,
    stacklevel=2,
)
