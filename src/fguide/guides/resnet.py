"""ResNet guides: ``resnet18`` … ``resnet152`` with a torchvision-format weight file.

Every ReLU is made Softplus(β) (β from :mod:`fguide.defaults`: 3 for DDPM/DDIM, 5 for Heun;
0 keeps ReLU), and the network is wrapped so that it takes x̂0 ∈ [−1, 1] (``input_mode``
``elucd`` or ``imagenet``, optionally resized).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

from torch import Tensor

from fguide import defaults
from fguide.config import SampleConfig
from fguide.guides.base import GuideKind, LoadedClassifier, LoadOptions, finish_loading
from fguide.models.resnet import ARCHS, INPUT_MODES, ImageClassifier, InputMode, load_resnet, resnet
from fguide.params import OwnedFields

__all__ = ["ResNetKind"]


class ResNetKind(GuideKind):
    """A torchvision ResNet on x̂0, its ReLUs made Softplus(β)."""

    name = "resnet"
    form = ", ".join(ARCHS)
    fields = OwnedFields(
        ("classifier_input_mode", "classifier_resize"),
        "ResNet classifiers only",
        name_all=True,
        neutral={"classifier_input_mode": "elucd"},
    )
    dropped = ("softplus_beta",)

    def claims(self, spec: str) -> bool:
        return spec in ARCHS

    def misnamed(self, spec: str) -> str | None:
        if spec.startswith("resnet") and ":" not in spec:
            return f"{spec!r} is none of {', '.join(ARCHS)}"
        return None

    def refuse_options(self, spec: str, kind: str, options: LoadOptions) -> None:
        if (
            options.softplus_beta not in (None, 0)
            or options.input_mode != "elucd"
            or options.resize
        ):
            raise ValueError(
                "softplus_beta, input_mode and resize apply to ResNet classifiers only "
                f"(classifier {spec!r} is of kind {kind!r})"
            )

    def resolve(self, config: SampleConfig) -> None:
        """Softplus β: the sampler's default (3; Heun 5) unless given."""
        if config.softplus_beta is None:
            config.softplus_beta = defaults.softplus_beta(config.sampler or "ddpm")
        config.softplus_beta = defaults.parse_softplus_beta(config.softplus_beta)

    def load(self, spec: str, path: Path | None, options: LoadOptions) -> LoadedClassifier:
        if path is None and options.require_weights:
            raise ValueError(f"classifier {spec} needs --classifier-weights (its weight file)")
        if options.input_mode not in INPUT_MODES:
            raise ValueError(
                f"input_mode must be one of {', '.join(INPUT_MODES)}; got {options.input_mode!r}"
            )
        beta = options.softplus_beta
        beta = defaults.softplus_beta(options.sampler) if beta is None else beta
        beta = defaults.parse_softplus_beta(beta)
        act = None if beta == defaults.RELU else beta
        mode = cast(InputMode, options.input_mode)
        resize, n = options.resize, options.num_classes
        if path is not None:
            wrapped = load_resnet(spec, path, act, mode, resize, num_classes=n)
        else:
            wrapped = ImageClassifier(resnet(spec, n or 1000, act), mode, resize)
        export: Callable[[], Mapping[str, Tensor]] = wrapped.net.state_dict
        desc = {
            "spec": spec,
            "softplus_beta": beta if beta else "relu",
            "input_mode": options.input_mode,
            "resize": resize,
        }
        return finish_loading(wrapped, spec, self.name, False, path, options, desc, None, export)
