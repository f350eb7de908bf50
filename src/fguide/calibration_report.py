"""Deprecated (removed in the next release): ``fguide.calibration_report`` moved to
:mod:`fguide.evaluation.calibration`; this module re-exports its names."""

import warnings

from fguide.evaluation.calibration import (
    TRAJECTORY_FILE,
    ClassifierCalibration,
    LevelCalibration,
    TrajectoryCurves,
    classifier_calibration,
    find_trajectory,
    load_trajectory_curves,
    parse_noise_levels,
    plot_calibration_vs_noise,
    plot_trajectory_figures,
    reliability_png_name,
    trajectory_json,
    write_reliability_diagrams,
)

__all__ = [
    "ClassifierCalibration",
    "LevelCalibration",
    "TRAJECTORY_FILE",
    "TrajectoryCurves",
    "classifier_calibration",
    "find_trajectory",
    "load_trajectory_curves",
    "parse_noise_levels",
    "plot_calibration_vs_noise",
    "plot_trajectory_figures",
    "reliability_png_name",
    "trajectory_json",
    "write_reliability_diagrams",
]

warnings.warn(
    "fguide.calibration_report is deprecated; import from fguide.evaluation.calibration",
    DeprecationWarning,
    stacklevel=2,
)
