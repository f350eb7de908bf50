"""Deprecated (removed in the next release): ``fguide.sampling_config`` moved to
:mod:`fguide.config`, :mod:`fguide.families`, :mod:`fguide.sampling.resolve`; this module
re-exports its names."""

import warnings

from fguide.config import (
    DEFAULT_SHARD_SIZE,
    PARAM_RANGES,
    PRECISIONS,
    SampleConfig,
    build_objective,
    parse_flags,
)
from fguide.families import (
    model_family,
)
from fguide.sampling.resolve import (
    resolve_config,
)

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "PARAM_RANGES",
    "PRECISIONS",
    "SampleConfig",
    "build_objective",
    "model_family",
    "parse_flags",
    "resolve_config",
]

warnings.warn(
    "fguide.sampling_config is deprecated; "
    "import from fguide.config or fguide.families or fguide.sampling.resolve",
    DeprecationWarning,
    stacklevel=2,
)
