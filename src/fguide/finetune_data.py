"""Deprecated (removed in the next release): ``fguide.finetune_data`` moved to
:mod:`fguide.finetune.data`; this module re-exports its names."""

import warnings

from fguide.finetune.data import (
    DEFAULT_IMAGE_SIZE,
    TrainLoader,
    check_labels,
    default_image_size,
    labels_of,
    load_one,
    split_holdout,
)

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "TrainLoader",
    "check_labels",
    "default_image_size",
    "labels_of",
    "load_one",
    "split_holdout",
]

warnings.warn(
    "fguide.finetune_data is deprecated; import from fguide.finetune.data",
    DeprecationWarning,
    stacklevel=2,
)
