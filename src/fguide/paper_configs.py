"""Deprecated (removed in the next release): ``fguide.paper_configs`` moved to
:mod:`fguide.sampling.configs`; this module re-exports its names."""

import warnings

from fguide.sampling.configs import (
    PAPER_CONFIGS,
    PaperConfig,
    apply_paper_config,
    paper_config,
)

__all__ = [
    "PAPER_CONFIGS",
    "PaperConfig",
    "apply_paper_config",
    "paper_config",
]

warnings.warn(
    "fguide.paper_configs is deprecated; import from fguide.sampling.configs",
    DeprecationWarning,
    stacklevel=2,
)
