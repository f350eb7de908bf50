"""The jobs that measure: ``fguide evaluate`` (sample quality: FID, IS, precision/recall with
ADM's evaluator definitions, :mod:`~fguide.evaluation.quality`; the CLIP score against the
prompts, :mod:`~fguide.evaluation.clip_score`) and ``fguide calibration``
(a run's calibration along its trajectory, a classifier's on noised images,
:mod:`~fguide.evaluation.calibration`)."""

from fguide.evaluation.calibration import (
    classifier_calibration,
    load_trajectory_curves,
    trajectory_json,
)
from fguide.evaluation.quality import (
    EVALUATOR_VERSION,
    LOGITS_DIM,
    BatchFeatures,
    EvaluationResult,
    EvaluationWarning,
    ImageSource,
    cached_features,
    default_cache_dir,
    evaluate,
    extract_features,
    feature_cache_path,
    ieee_float32,
    open_images,
    read_reference_statistics,
)

__all__ = [
    "EVALUATOR_VERSION",
    "LOGITS_DIM",
    "BatchFeatures",
    "EvaluationResult",
    "EvaluationWarning",
    "ImageSource",
    "cached_features",
    "classifier_calibration",
    "default_cache_dir",
    "evaluate",
    "extract_features",
    "feature_cache_path",
    "ieee_float32",
    "load_trajectory_curves",
    "open_images",
    "read_reference_statistics",
    "trajectory_json",
]
