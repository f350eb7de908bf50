"""The model-family registry: the networks of a sampling run, built from its configuration.

Each family is one module here, a :class:`ModelFamily`: which ``--model`` inputs it claims, its
part of the configuration, how it builds the networks and the schedule (the guide is attached
the same way for all: :func:`~fguide.families.base.attach_guide`), and how its files enter a
run's identity. :data:`FAMILIES` lists them; the first that claims a model builds it, and
nothing outside this package names a family. A new family is one module and one line here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fguide.config import SampleConfig
from fguide.families.adm import ADMFamily
from fguide.families.base import Components, ModelFamily, attach_guide
from fguide.families.nvlabs import NVlabsFamily
from fguide.families.pipelines import PipelineFamily
from fguide.families.stable_diffusion import StableDiffusionFamily

__all__ = [
    "FAMILIES",
    "Components",
    "ModelFamily",
    "attach_guide",
    "build_components",
    "find_family",
    "model_family",
]

FAMILIES: tuple[ModelFamily, ...] = (
    StableDiffusionFamily(),  # before PipelineFamily, which claims every model_index.json
    PipelineFamily(),
    NVlabsFamily(),
    ADMFamily(),
)
"""Every model family, in the order their claims are tried: the first claim wins; ADM, which
claims any model, is last."""


def find_family(model: str | Path) -> ModelFamily:
    """The family of ``--model`` ``model`` (the first in :data:`FAMILIES` to claim it)."""
    path = Path(model)
    return next(family for family in FAMILIES if family.claims(path))


def model_family(path: str | Path) -> str:
    """The name of ``path``'s family: ``stable-diffusion`` (an SD/SDXL pipeline folder),
    ``diffusers`` (another pipeline folder), ``nvlabs`` (an EDM network pickle) or ``adm``."""
    return find_family(path).name


def build_components(config: SampleConfig, device: torch.device | str = "cpu") -> Components:
    """Load and check the networks of a resolved configuration and build the schedule."""
    family = find_family(config.model)
    # Check every file before loading any: a 2 GB checkpoint takes a while to read.
    family.check_files(config)
    if config.classifier_weights is not None and not config.classifier_weights.is_file():
        raise FileNotFoundError(f"classifier_weights: file not found: {config.classifier_weights}")
    return family.build(config, torch.device(device))
