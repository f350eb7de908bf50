"""What every model family shares: :class:`Components`, the built parts of a run, and
:class:`ModelFamily`, the base a family fills in, with :func:`attach_guide`, the guide every
family attaches the same way.

A model family (one module in :mod:`fguide.families`, one line in its ``FAMILIES``) says which
``--model`` inputs it claims, which configuration fields it alone uses (refused for the others
in one generic message), its part of the configuration (the default sampler, checks), how it
builds the networks and the schedule, and how its files are hashed into a run's identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fguide import defaults
from fguide.accel import CompiledModel, with_precision
from fguide.config import SampleConfig, build_guidance_method, build_objective
from fguide.denoisers import Denoiser, EpsModel
from fguide.guidance import ClassifierGuide
from fguide.guides import GuideKind, LoadedClassifier, find_guide_kind, load_classifier
from fguide.io.files import sha256_file
from fguide.params import OwnedFields, ParamError
from fguide.schedules import Process, karras_sigmas
from fguide.training_free import GuidanceMethod, check_supported

__all__ = ["BatchSampler", "Components", "ModelFamily", "attach_guide", "karras_grid"]


@dataclass
class Components:
    """The built networks and schedule of a run, on one device."""

    net: nn.Module
    model: EpsModel | None
    """The ε-model DDPM/DDIM call (ADM); None for an EDM network."""
    process: Process | None
    sigmas: Tensor | None
    denoiser: Denoiser | None
    """D(x, σ) for Heun: an EDM network, or an ε-model through :class:`VPAsEDM`."""
    classifier: LoadedClassifier | None
    guide: ClassifierGuide | GuidanceMethod | None
    image_size: int
    num_classes: int | None
    device: torch.device
    info: dict[str, Any]
    """Resolved model and classifier description (part of the run's identity)."""
    label_mode: str = "uniform"
    """How labels are drawn (:func:`~fguide.sampling.sample_labels`): the configuration's, or
    the guide kind's (a CLIP target)."""
    state_shape: tuple[int, int, int] | None = None
    """(C, H, W) of the state the sampler walks; None: (3, image_size, image_size)."""
    to_image: Callable[[Tensor], Tensor] | None = None
    """The final state → the image in [−1, 1] (a latent model's VAE decoder); None: itself."""
    clip_denoised: bool | None = None
    """The model's own x̂0 clipping (diffusers pipelines); None: the configuration's."""
    compiled: CompiledModel | None = None
    """The ``torch.compile``d network (``--compile``): its ``compile_seconds`` after a call."""
    guide_kind: GuideKind | None = None
    """The kind of the guide (:mod:`fguide.guides`): the extra statistics a run records."""
    sample_state: BatchSampler | None = None
    """The family's own sampler call for one batch (a model conditioned per sample, such as a
    text-to-image pipeline's prompt i mod n); None: the configuration's sampler on
    :attr:`model` / :attr:`denoiser`."""
    x0_image: Callable[[Tensor], Tensor] | None = None
    """How a statistic's classifier sees the sampler's x̂0 (a latent model's decoder, one
    forward per step: recorded only where a classifier is asked for); None: x̂0 itself."""


BatchSampler = Callable[
    [Tensor, Sequence[int], Callable[[Tensor], Tensor], Tensor | None, Callable[..., None] | None],
    Tensor,
]
"""(initial state z, sample ids, the batch's noise, labels, step callback) → the final state."""


class ModelFamily:
    """One model family. A subclass sets the attributes and overrides the methods it needs; an
    instance of it in :data:`fguide.families.FAMILIES` makes it known to ``fguide sample``."""

    name: str = ""
    """The family's name, as the run identity's ``resolved.model.family`` records it."""
    fields: OwnedFields | None = None
    """The :class:`~fguide.config.SampleConfig` fields only this family uses."""
    default_sampler: str = "ddpm"
    """The sampler when the configuration names none."""
    samplers: tuple[str, ...] = ("ddpm", "ddim", "heun")
    """The samplers the family takes (another is refused by name)."""
    guidance_methods: tuple[str, ...] | None = None
    """The ``--guidance-method`` update rules the family's sampling hosts (another is refused
    by name); None: EluCD's and every training-free method."""
    default_steps: str = defaults.STEPS
    """The steps (respacing) when the configuration gives none."""
    reads: tuple[str, ...] = ()
    """Fields a guide kind owns that this family reads too (a text-to-image family's prompts):
    not refused when that kind is not the guide."""

    def claims(self, model: Path) -> bool:
        """Whether ``model`` (``--model``) is this family's: a cheap look at the path (a file's
        header, a folder's layout), no weights read."""
        raise NotImplementedError

    def resolve(self, config: SampleConfig) -> None:
        """Check and fill this family's part of a run's configuration, in place."""

    def check_files(self, config: SampleConfig) -> None:
        """Refuse a missing model before anything is loaded (a clear one-line error)."""

    def build(self, config: SampleConfig, device: torch.device) -> Components:
        """The networks, the schedule and the guide of a resolved configuration
        (:func:`attach_guide` loads the guide)."""
        raise NotImplementedError

    def files_sha256(self, model: Path) -> str:
        """The identity of the model's files: their contents (and, for a folder, their names)."""
        return sha256_file(model)


def attach_guide(config: SampleConfig, comp: Components, make_guide: bool = True) -> Components:
    """Load the guide's classifier into ``comp`` (when there is one), check it against the model
    and the labels, and build the guide; ``make_guide=False`` leaves the guide to the family
    (a pipeline's latent guidance)."""
    num_classes = comp.num_classes
    class_cond = num_classes is not None
    classifier = None
    kind = find_guide_kind(config.classifier)
    if config.classifier is not None:
        classifier = load_classifier(
            config.classifier,
            config.classifier_weights,
            image_size=comp.image_size,
            device=comp.device,
            softplus_beta=config.softplus_beta,
            sampler=config.sampler or "ddpm",
            input_mode=config.classifier_input_mode,
            resize=config.classifier_resize,
            flags=config.classifier_flags,
            prompts=config.prompts,
            prompt_file=config.prompt_file,
        )
        if class_cond and classifier.num_classes != num_classes:
            raise ParamError(
                "{0} {spec!r} has {n} classes but the class-conditional diffusion model has "
                "{m}: the labels must mean the same classes",
                "classifier",
                spec=config.classifier,
                n=classifier.num_classes,
                m=num_classes,
            )
        num_classes = classifier.num_classes
        comp.info["classifier"] = classifier.description
    label_mode = config.labels
    if kind is not None and classifier is not None:
        label_mode = kind.labels(config, classifier)
    _check_label(config.labels, num_classes)
    if classifier is not None and config.guidance_method != "elucd":
        # an import spec's time-awareness is known only now: refuse an x_t classifier here
        check_supported(
            config.guidance_method,
            config.sampler or "ddpm",
            "xt" if classifier.time_aware else "x0",
        )
    if config.method != "none" and make_guide and config.guidance_method != "elucd":
        assert classifier is not None
        comp.guide = _training_free_guide(config, classifier)
    elif config.method != "none" and make_guide:
        assert classifier is not None and config.scale is not None
        assert kind is not None
        comp.guide = ClassifierGuide(
            with_precision(classifier.module, config.classifier_precision),  # type: ignore[arg-type]
            kind.objective(build_objective(config)),
            config.scale,
            input="xt" if classifier.time_aware else "x0",
            time_aware=classifier.time_aware,
        )
    comp.classifier, comp.num_classes, comp.label_mode = classifier, num_classes, label_mode
    comp.guide_kind = kind
    return comp


def _training_free_guide(config: SampleConfig, classifier: LoadedClassifier) -> GuidanceMethod:
    """The configuration's training-free method on the loaded classifier."""
    module = with_precision(classifier.module, config.classifier_precision)  # type: ignore[arg-type]
    return build_guidance_method(config, module)


def _check_label(labels: str, num_classes: int | None) -> None:
    """A fixed class id must be a class of the model or the classifier."""
    if labels in ("uniform", "balanced"):
        return
    cls = int(labels)
    if num_classes is None:
        raise ParamError(
            "{0}: class {cls} given, but the model is unconditional and there is no classifier",
            "labels",
            cls=cls,
        )
    if not 0 <= cls < num_classes:
        raise ParamError(
            "{0}: class {cls} is out of range [0, {n})", "labels", cls=cls, n=num_classes
        )


def karras_grid(
    config: SampleConfig, sigma_min: float, sigma_max: float
) -> tuple[Tensor, list[float]]:
    """EDM's σ grid of ``config.steps`` steps within the network's range and EDM's [0.002, 80]."""
    lo, hi = max(0.002, sigma_min), min(80.0, sigma_max)
    return karras_sigmas(int(str(config.steps)), lo, hi), [lo, hi]
