"""ADM's noise-aware classifier as a guide: a classifier preset (``128x128_classifier`` …) or
``adm`` with ``create_classifier`` flags, called as ``f(x_t, t)`` (ADM's ``cond_fn``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fguide.config import SampleConfig
from fguide.guides.base import GuideKind, LoadedClassifier, LoadOptions, finish_loading
from fguide.models.loading import load_model
from fguide.models.presets import PRESETS, classifier_defaults, create_classifier
from fguide.params import OwnedFields, ParamError

__all__ = ["ADMKind", "classifier_presets", "is_adm_classifier"]


def classifier_presets() -> list[str]:
    """Names of ADM's noise-aware classifier presets."""
    return [n for n, p in PRESETS.items() if p.kind == "classifier"]


def is_adm_classifier(spec: str | None) -> bool:
    """Whether ``spec`` names ADM's noise-aware classifier (a preset or ``adm``)."""
    return spec == "adm" or (spec in PRESETS and PRESETS[spec].kind == "classifier")


class ADMKind(GuideKind):
    """ADM's noise-aware EncoderUNet classifier, guiding DDPM/DDIM on x_t (condition_mean)."""

    name = "adm"
    form = f"an ADM classifier preset ({', '.join(classifier_presets())}), 'adm'"
    fields = OwnedFields(("classifier_flags",), "ADM classifiers ('adm' or a classifier preset)")
    fixes_image_size = True

    def claims(self, spec: str) -> bool:
        return is_adm_classifier(spec)

    def misnamed(self, spec: str) -> str | None:
        if spec in PRESETS:
            return f"{spec!r} is a diffusion model preset; classifier presets: " + ", ".join(
                classifier_presets()
            )
        return None

    def refuse_options(self, spec: str, kind: str, options: LoadOptions) -> None:
        if options.flags:
            raise ValueError("classifier_flags apply to ADM classifiers only")

    def resolve(self, config: SampleConfig) -> None:
        if config.sampler == "heun":
            raise ParamError(
                "{0}: ADM's noise-aware classifier guides DDPM or DDIM on x_t; Heun guidance "
                "needs an x̂0 classifier (a ResNet or an import spec)",
                "classifier",
            )

    def guidance_defaults(self, config: SampleConfig) -> dict[str, float]:
        """γ: ADM's README scale for the diffusion model the classifier belongs to; γ_sine 0
        (ADM's ``condition_mean`` has no sine boost)."""
        name = config.model_preset or str(config.classifier).replace("_classifier", "_diffusion")
        preset = PRESETS.get(name)
        return {
            "scale": (preset.readme_classifier_scale if preset else None) or 1.0,
            "sine_factor": 0.0,
        }

    def load(self, spec: str, path: Path | None, options: LoadOptions) -> LoadedClassifier:
        if path is None and options.require_weights:
            raise ValueError(f"classifier {spec} needs --classifier-weights (its checkpoint)")
        flags = dict(options.flags)
        image_size = options.image_size
        if spec == "adm":
            base: dict[str, Any] = {**classifier_defaults(), "image_size": image_size or 64}
        else:
            base = dict(PRESETS[spec].flags)
        full = {**base, **flags}
        size_required = int(full["image_size"])
        if image_size is not None and size_required != image_size:
            raise ValueError(
                f"image size: classifier {spec!r} takes {size_required}x{size_required} images "
                f"but the images are {image_size}x{image_size}"
            )
        net: nn.Module
        if spec != "adm" and not flags:
            net = load_model(spec, path) if path is not None else PRESETS[spec].build()
        else:
            built = create_classifier(**full)
            net = load_model(built, path) if path is not None else built
        if options.time_aware is not None and not options.time_aware:
            raise ValueError(f"classifier {spec!r}: ADM's classifier always takes the timestep")
        desc = {"spec": spec, "flags": full}
        return finish_loading(net, spec, self.name, True, path, options, desc, size_required)
