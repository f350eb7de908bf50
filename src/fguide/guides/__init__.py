"""The guide-kind registry: one loader builds every classifier fguide can guide with."""

from fguide.guides.base import (
    CLIP_PREFIX,
    ClassifierKind,
    LoadedClassifier,
    classifier_presets,
    is_adm_classifier,
    load_classifier,
    probe_num_classes,
    state_dict_sha256,
)

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
