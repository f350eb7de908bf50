"""What every guide kind shares: the loaded classifier, its load options, the one probe and
the weights' hash, and :class:`GuideKind`, the base a kind of guide fills in.

A guide kind (one module in :mod:`fguide.guides`, one line in its ``GUIDE_KINDS``) says which
``--classifier`` specs it claims, which configuration fields and load options it alone uses
(refused for the others, in one generic message), its part of a sampling run's configuration
(defaults, checks), how it loads a classifier, and what extra per-step statistics a run guided
by it records (:class:`~fguide.diagnostics.StepStatistic`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fguide.config import SampleConfig
from fguide.diagnostics import StepStatistic
from fguide.objectives import Objective
from fguide.params import OwnedFields

__all__ = [
    "GuideKind",
    "LoadOptions",
    "LoadedClassifier",
    "finish_loading",
    "probe_num_classes",
    "state_dict_sha256",
]


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state dict: names, dtypes, shapes and bytes, in key order.

    This identifies the weights actually in use, whatever their source (a file, an import spec
    that builds or downloads them): two runs agree on it only if every tensor is equal.
    """
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class LoadedClassifier:
    """A classifier ready to guide or to be evaluated, with what callers need to know."""

    module: nn.Module
    """Eval mode, ``requires_grad`` off, on the requested device and dtype."""
    spec: str
    kind: str
    """The guide kind's name (:data:`fguide.guides.GUIDE_KINDS`): ``resnet``, ``adm``, ...."""
    time_aware: bool
    """Called as ``module(x_t, t)`` (ADM's noise-aware classifier) instead of ``module(x)``."""
    num_classes: int
    image_size: int | None
    """The input size the classifier requires (ADM presets), or None (any size)."""
    description: dict[str, Any] = field(default_factory=dict)
    """JSON-able: spec, kind, options, weight file and the SHA-256 of the loaded state dict."""
    export: Callable[[], Mapping[str, Tensor]] | None = None
    """The plain state dict to save after fine-tuning (a ResNet's bare network's)."""

    def __call__(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.module(x, t) if self.time_aware else self.module(x)

    def state_dict_to_save(self) -> dict[str, Tensor]:
        sd = self.export() if self.export is not None else self.module.state_dict()
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def probe_num_classes(
    module: Callable[..., Tensor], spec: str, image_size: int, time_aware: bool, device: Any
) -> int:
    """Run the classifier once on a zero image: its number of classes N, or a clear error."""
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    was = module.training if isinstance(module, nn.Module) else None
    try:
        if isinstance(module, nn.Module):
            module.eval()
        with torch.no_grad():
            out = (
                module(x, torch.zeros(1, device=device, dtype=torch.long))
                if time_aware
                else (module(x))
            )
    except Exception as err:  # any failure here means the classifier does not fit the images
        call = "f(x_t, t)" if time_aware else "f(x)"
        raise ValueError(
            f"classifier {spec!r} fails on a [1, 3, {image_size}, {image_size}] image batch "
            f"(called as {call}; check the image size): {type(err).__name__}: {err}"
        ) from None
    finally:
        if isinstance(module, nn.Module) and was is not None:
            module.train(was)
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"classifier {spec!r} must return logits [B, N]; got {shape}")
    if not torch.isfinite(out).all():
        raise ValueError(f"classifier {spec!r} gives non-finite logits on a zero image")
    return int(out.shape[1])


@dataclass(frozen=True)
class LoadOptions:
    """The options of :func:`fguide.guides.load_classifier` (see there); each kind reads its own."""

    image_size: int | None = None
    device: torch.device | str = "cpu"
    softplus_beta: float | None = None
    sampler: str = "ddpm"
    input_mode: str = "elucd"
    resize: int | None = None
    flags: Mapping[str, Any] = field(default_factory=dict)
    time_aware: bool | None = None
    num_classes: int | None = None
    require_weights: bool = True
    dtype: torch.dtype | None = torch.float32
    prompts: Sequence[str] | None = None
    prompt_file: str | os.PathLike[str] | None = None


def finish_loading(
    net: nn.Module,
    spec: str,
    kind: str,
    time_aware: bool,
    path: Path | None,
    options: LoadOptions,
    description: dict[str, Any],
    size_required: int | None = None,
    export: Callable[[], Mapping[str, Tensor]] | None = None,
) -> LoadedClassifier:
    """The common end of every kind's loading: eval mode, no gradients, the requested device and
    dtype, one probe for the number of classes, and the description with the weights' hash."""
    net = net.to(device=options.device, dtype=options.dtype).eval().requires_grad_(False)
    size = size_required or options.image_size
    if size is None:
        raise ValueError(f"classifier {spec!r}: image_size is needed to check the classifier")
    n = probe_num_classes(net, spec, size, time_aware, options.device)
    description.update(
        kind=kind,
        time_aware=time_aware,
        num_classes=n,
        weights=None if path is None else str(path),
        state_dict_sha256=state_dict_sha256(net),
    )
    return LoadedClassifier(net, spec, kind, time_aware, n, size_required, description, export)


class GuideKind:
    """One kind of guide. A subclass sets the attributes and overrides the methods it needs; an
    instance of it in :data:`fguide.guides.GUIDE_KINDS` makes it known to every command."""

    name: str = ""
    """The kind's name: :attr:`LoadedClassifier.kind` and the run identity's ``kind``."""
    form: str = ""
    """How a ``--classifier`` of this kind is written (the unknown-spec message lists them)."""
    fields: OwnedFields | None = None
    """The :class:`~fguide.config.SampleConfig` fields only this kind uses."""
    dropped: tuple[str, ...] = ()
    """Fields only this kind uses that a configuration of another kind drops (sets to None)
    instead of refusing (a named configuration's value for its own guide)."""
    fixes_image_size: bool = False
    """The spec fixes the classifier's input size (an ADM preset's flags)."""
    statistics: tuple[type[StepStatistic], ...] = ()
    """The extra per-step statistics a run guided by this kind records (:meth:`recorders`)."""
    prompt_classes: bool = False
    """Its classes are prompts (a CLIP head): a text-to-image family passes it its generation
    prompts when no guide prompts are given."""

    def claims(self, spec: str) -> bool:
        """Whether ``spec`` is a classifier of this kind."""
        raise NotImplementedError

    def misnamed(self, spec: str) -> str | None:
        """Why ``spec``, claimed by no kind, looks like this kind's and is not one (or None)."""
        return None

    def refuse_options(self, spec: str, kind: str, options: LoadOptions) -> None:
        """Raise a ``ValueError`` when ``options`` sets an option only this kind takes (``spec``
        is of another kind, ``kind``)."""

    def resolve(self, config: SampleConfig) -> None:
        """Check and fill this kind's part of a sampling run's configuration, in place."""

    def guidance_defaults(self, config: SampleConfig) -> dict[str, float]:
        """Defaults of ``scale`` and ``sine_factor`` that differ for this kind (else the
        defaults table's)."""
        return {}

    def labels(self, config: SampleConfig, loaded: LoadedClassifier) -> str:
        """How a run draws its labels: the configuration's ``labels`` unless the kind fixes them."""
        return config.labels

    def load(self, spec: str, path: Path | None, options: LoadOptions) -> LoadedClassifier:
        """The classifier ``spec`` with the weights at ``path`` (checked to exist), probed."""
        raise NotImplementedError

    def objective(self, objective: Objective) -> Objective:
        """The objective a guide of this kind runs with (a ValueError names a method that does
        not apply to it); by default ``objective`` itself."""
        return objective

    def recorders(
        self,
        loaded: LoadedClassifier,
        labels: Tensor,
        *,
        guided: bool = False,
        view: Callable[[Tensor], Tensor] | None = None,
    ) -> list[StepStatistic]:
        """Fresh recorders of :attr:`statistics` for one batch with target ``labels``;
        ``guided``: this classifier is the guide on x̂0 (its guidance logits may be read);
        ``view``: how the classifier sees x̂0 (a latent model's decoder; None: as it is)."""
        return []
