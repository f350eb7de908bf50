"""The model-family registry: the networks of a sampling run, built from its configuration."""

from fguide.families.base import Components, build_components, model_family

__all__ = ["Components", "build_components", "model_family"]
