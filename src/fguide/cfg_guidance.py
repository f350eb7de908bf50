"""Deprecated (removed in the next release): ``fguide.cfg_guidance`` moved to :mod:`fguide.accel`,
:mod:`fguide.models.latent_guidance`; this module re-exports its names."""

import warnings

from fguide.accel import (
    param_dtype,
)
from fguide.models.latent_guidance import (
    CFGClassifierGuidance,
    MicrobatchGuide,
    evaluate_guidance_microbatched,
    guidance_weight,
)

__all__ = [
    "CFGClassifierGuidance",
    "MicrobatchGuide",
    "evaluate_guidance_microbatched",
    "guidance_weight",
    "param_dtype",
]

warnings.warn(
    "fguide.cfg_guidance is deprecated; import from fguide.accel or fguide.models.latent_guidance",
    DeprecationWarning,
    stacklevel=2,
)
