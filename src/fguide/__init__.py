"""fguide: classifier-guided diffusion sampling with calibrated and regularised guidance.

The public API a user with their own sampler needs::

    import fguide
    obj = fguide.objective("js", alpha=0.09, eps=0.1)
    g = fguide.guidance_gradient(classifier, x0, labels, obj)   # ∇_{x0} S, one backward pass

and the samplers (``fguide.ddpm``, ``fguide.ddim``, ``fguide.heun``, ``fguide.dpmpp_2m``) with
their schedules.
"""

from fguide._version import __version__
from fguide.diagnostics import TrajectoryRecorder
from fguide.guidance import ClassifierGuide, GuidanceResult, evaluate_guidance, guidance_gradient
from fguide.objectives import (
    DivergenceRegularizer,
    EntropyRegularizer,
    Objective,
    Tilt,
    objective,
)
from fguide.rng import SampleNoise
from fguide.samplers import NonFiniteGuidanceError, StepRecord, ddim, ddpm, heun
from fguide.samplers_dpm import dpmpp_2m
from fguide.schedules import Process, betas_for, karras_sigmas, make_process, space_timesteps

__all__ = [
    "ClassifierGuide",
    "DivergenceRegularizer",
    "EntropyRegularizer",
    "GuidanceResult",
    "NonFiniteGuidanceError",
    "Objective",
    "Process",
    "SampleNoise",
    "StepRecord",
    "Tilt",
    "TrajectoryRecorder",
    "__version__",
    "betas_for",
    "ddim",
    "ddpm",
    "dpmpp_2m",
    "evaluate_guidance",
    "guidance_gradient",
    "heun",
    "karras_sigmas",
    "make_process",
    "objective",
    "space_timesteps",
]
