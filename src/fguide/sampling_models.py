"""Deprecated (removed in the next release): ``fguide.sampling_models`` moved to
:mod:`fguide.families`, :mod:`fguide.families.adm`; this module re-exports its names."""

import warnings

from fguide.families import (
    Components,
    build_components,
)
from fguide.families.adm import (
    MODEL_FILE,
)

__all__ = [
    "Components",
    "MODEL_FILE",
    "build_components",
]

warnings.warn(
    "fguide.sampling_models is deprecated; import from fguide.families or fguide.families.adm",
    DeprecationWarning,
    stacklevel=2,
)
