"""Deprecated (removed in the next release): ``fguide.finetune_config`` moved to
:mod:`fguide.finetune.config`; this module re-exports its names."""

import warnings

from fguide.finetune.config import (
    FREE_KEYS,
    INPUTS,
    PARAM_RANGES,
    PRECISIONS,
    ClassifierInput,
    FinetuneConfig,
    Precision,
    config_dict,
)

__all__ = [
    "ClassifierInput",
    "FREE_KEYS",
    "FinetuneConfig",
    "INPUTS",
    "PARAM_RANGES",
    "PRECISIONS",
    "Precision",
    "config_dict",
]

warnings.warn(
    "fguide.finetune_config is deprecated; import from fguide.finetune.config",
    DeprecationWarning,
    stacklevel=2,
)
