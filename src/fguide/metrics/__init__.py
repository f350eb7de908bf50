"""Evaluation metrics: ADM's FID / sFID, Inception Score, precision/recall; calibration."""

from fguide.metrics.calibration import (
    ReliabilityStats,
    TrajectoryCalibration,
    confidence_and_correct,
    ece,
    reliability_diagram,
    smooth_ece_loss,
)
from fguide.metrics.fid import (
    FeatureStats,
    FIDComparabilityWarning,
    frechet_distance,
    frechet_distance_from_features,
    trace_sqrt_product,
    warn_if_incomparable,
)
from fguide.metrics.inception_score import InceptionScore, inception_score, inception_score_splits
from fguide.metrics.precision_recall import (
    DistanceMode,
    PrecisionRecall,
    manifold_radii,
    precision_recall,
)

__all__ = [
    "DistanceMode",
    "FIDComparabilityWarning",
    "FeatureStats",
    "InceptionScore",
    "PrecisionRecall",
    "ReliabilityStats",
    "TrajectoryCalibration",
    "confidence_and_correct",
    "ece",
    "frechet_distance",
    "frechet_distance_from_features",
    "inception_score",
    "inception_score_splits",
    "manifold_radii",
    "precision_recall",
    "reliability_diagram",
    "smooth_ece_loss",
    "trace_sqrt_product",
    "warn_if_incomparable",
]
