"""Evaluation metrics: ADM's FID / sFID, Inception Score, precision/recall; calibration."""

import importlib
from typing import TYPE_CHECKING, Any

from fguide.metrics.calibration import (
    ReliabilityStats,
    TrajectoryCalibration,
    confidence_and_correct,
    ece,
    reliability_diagram,
    smooth_ece_loss,
)
from fguide.metrics.inception_score import InceptionScore, inception_score, inception_score_splits
from fguide.metrics.precision_recall import (
    DistanceMode,
    PrecisionRecall,
    manifold_radii,
    precision_recall,
)

if TYPE_CHECKING:
    from fguide.metrics.fid import (
        FeatureStats,
        FIDComparabilityWarning,
        frechet_distance,
        frechet_distance_from_features,
        trace_sqrt_product,
        warn_if_incomparable,
    )

# The FID's names are imported on first use: its scipy.linalg costs ~0.3-0.8 s at start-up,
# and sampling (which imports the calibration metrics) never needs it.
_FID_NAMES = (
    "FeatureStats",
    "FIDComparabilityWarning",
    "frechet_distance",
    "frechet_distance_from_features",
    "trace_sqrt_product",
    "warn_if_incomparable",
)


def __getattr__(name: str) -> Any:
    if name not in _FID_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("fguide.metrics.fid"), name)


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
