"""Deprecated (removed in the next release): ``fguide.models.classifiers`` moved to
:mod:`fguide.guides`; this module re-exports its names."""

import warnings
from typing import Literal

from fguide.guides import (
    CLIP_PREFIX,
    LoadedClassifier,
    classifier_presets,
    is_adm_classifier,
    load_classifier,
    probe_num_classes,
    state_dict_sha256,
)

ClassifierKind = Literal["resnet", "adm", "import", "clip"]

__all__ = [
    "CLIP_PREFIX",
    "ClassifierKind",
    "LoadedClassifier",
    "classifier_presets",
    "is_adm_classifier",
    "load_classifier",
    "probe_num_classes",
    "state_dict_sha256",
]

warnings.warn(
    "fguide.models.classifiers is deprecated; import from fguide.guides",
    DeprecationWarning,
    stacklevel=2,
)
