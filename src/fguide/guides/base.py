"""THE loader of every guide: one function builds any classifier fguide can guide with.

``load_classifier(spec, weights, ...)`` understands

- a ResNet name (``resnet18`` … ``resnet152``): torchvision-format weights, every ReLU made
  Softplus(β) (β from :mod:`fguide.defaults`: 3 for DDPM/DDIM, 5 for Heun; 0 keeps ReLU),
  wrapped so that it takes x̂0 ∈ [−1, 1] (``input_mode`` ``elucd`` or ``imagenet``);
- an ADM classifier preset (``128x128_classifier`` …) or ``adm`` with ``flags``: ADM's
  noise-aware classifier, called as ``f(x_t, t)``;
- ``module:function`` or ``file.py:function`` returning an ``nn.Module`` (``time_aware`` when
  the module says so with a ``time_aware`` attribute or the caller asks);
- ``clip:FOLDER``: a transformers CLIP model folder as a zero-shot head over ``prompts`` (or a
  ``prompt_file``; neither: the 1000 ImageNet classes), logits = s · cos(image, prompt_k)
  (:mod:`fguide.models.clip`).

Every command (``sample``, ``calibration``, ``finetune``) goes through it, so a new kind of
guide is added here once. The result carries what callers need: the kind, whether the
classifier takes the timestep, the number of classes (from one probe), and a description with
the SHA-256 of the weights actually loaded (and, for an import spec, of its module's source
file), which is part of a sampling run's identity.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from fguide import defaults
from fguide.io.files import sha256_file
from fguide.models.loading import load_model
from fguide.models.presets import PRESETS, classifier_defaults, create_classifier
from fguide.models.resnet import ARCHS, INPUT_MODES, ImageClassifier, InputMode, load_resnet, resnet
from fguide.runtime import import_module_spec, import_spec_source

__all__ = [
    "ClassifierKind",
    "LoadedClassifier",
    "classifier_presets",
    "is_adm_classifier",
    "load_classifier",
    "state_dict_sha256",
]

ClassifierKind = Literal["resnet", "adm", "import", "clip"]
CLIP_PREFIX = "clip:"


def classifier_presets() -> list[str]:
    """Names of ADM's noise-aware classifier presets."""
    return [n for n, p in PRESETS.items() if p.kind == "classifier"]


def is_adm_classifier(spec: str | None) -> bool:
    """Whether ``spec`` names ADM's noise-aware classifier (a preset or ``adm``)."""
    return spec == "adm" or (spec in PRESETS and PRESETS[spec].kind == "classifier")


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
    kind: ClassifierKind
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


def _kinds_message(spec: str) -> str:
    return (
        f"classifier: {spec!r} is none of {', '.join(ARCHS)}, an ADM classifier preset "
        f"({', '.join(classifier_presets())}), 'adm', 'clip:FOLDER' or a 'module:function' "
        "import spec"
    )


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


def load_classifier(
    spec: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = None,
    device: torch.device | str = "cpu",
    softplus_beta: float | None = None,
    sampler: str = "ddpm",
    input_mode: str = "elucd",
    resize: int | None = None,
    flags: Mapping[str, Any] | None = None,
    time_aware: bool | None = None,
    num_classes: int | None = None,
    require_weights: bool = True,
    dtype: torch.dtype | None = torch.float32,
    prompts: Sequence[str] | None = None,
    prompt_file: str | os.PathLike[str] | None = None,
) -> LoadedClassifier:
    """Build the classifier named by ``spec``, load ``weights`` (``weights_only``), probe it.

    ``softplus_beta``: None takes :func:`fguide.defaults.softplus_beta` of ``sampler``; 0 keeps
    ReLU (ResNets only). ``image_size``: the images the classifier will see (required for the
    probe unless an ADM preset fixes it). ``flags``: ADM ``create_classifier`` flags (``adm``
    or overriding a preset's). ``require_weights=False`` allows a randomly initialised preset or
    ResNet (benchmarks, fine-tuning from scratch). ``num_classes``: a ResNet head without
    weights. ``dtype=None`` keeps an imported module's own precision (float32 by default).
    ``prompts`` / ``prompt_file``: the classes of a ``clip:`` head.
    """
    if (prompts or prompt_file is not None) and not spec.startswith(CLIP_PREFIX):
        raise ValueError(f"prompts apply to CLIP guides (clip:FOLDER), not {spec!r}")
    path = None if weights is None else Path(weights)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"classifier_weights: file not found: {path}")
    flags = dict(flags or {})
    desc: dict[str, Any] = {"spec": spec}
    export: Callable[[], Mapping[str, Tensor]] | None = None
    size_required: int | None = None
    if spec in ARCHS:
        if path is None and require_weights:
            raise ValueError(f"classifier {spec} needs --classifier-weights (its weight file)")
        if input_mode not in INPUT_MODES:
            raise ValueError(
                f"input_mode must be one of {', '.join(INPUT_MODES)}; got {input_mode!r}"
            )
        beta = defaults.softplus_beta(sampler) if softplus_beta is None else softplus_beta
        beta = defaults.parse_softplus_beta(beta)
        act = None if beta == defaults.RELU else beta
        mode = cast(InputMode, input_mode)
        if path is not None:
            wrapped = load_resnet(spec, path, act, mode, resize, num_classes=num_classes)
        else:
            wrapped = ImageClassifier(resnet(spec, num_classes or 1000, act), mode, resize)
        net: nn.Module = wrapped
        export = wrapped.net.state_dict
        kind: ClassifierKind = "resnet"
        aware = False
        desc.update(softplus_beta=beta if beta else "relu", input_mode=input_mode, resize=resize)
    elif is_adm_classifier(spec):
        if path is None and require_weights:
            raise ValueError(f"classifier {spec} needs --classifier-weights (its checkpoint)")
        if spec == "adm":
            base = {**classifier_defaults(), "image_size": image_size or 64}
        else:
            base = dict(PRESETS[spec].flags)
        full = {**base, **flags}
        size_required = int(full["image_size"])
        if image_size is not None and size_required != image_size:
            raise ValueError(
                f"image size: classifier {spec!r} takes {size_required}x{size_required} images "
                f"but the images are {image_size}x{image_size}"
            )
        if spec != "adm" and not flags:
            net = load_model(spec, path) if path is not None else PRESETS[spec].build()
        else:
            built = create_classifier(**full)
            net = load_model(built, path) if path is not None else built
        kind, aware = "adm", True
        desc["flags"] = full
    elif spec.startswith(CLIP_PREFIX):
        from fguide.models.clip import load_clip_head

        if path is not None:
            raise ValueError("classifier_weights: a CLIP guide reads its weights from its folder")
        head = load_clip_head(
            spec[len(CLIP_PREFIX) :],
            list(prompts) if prompts else None,
            prompt_file=prompt_file,
            imagenet=not prompts and prompt_file is None,
        )
        net, kind, aware = head, "clip", False
        desc.update(head.describe())
    elif ":" in spec:
        obj = import_module_spec(spec)
        if not isinstance(obj, nn.Module):
            raise ValueError(f"classifier: {spec!r} must be or return a torch.nn.Module")
        net = load_model(obj, path) if path is not None else obj
        kind = "import"
        # Code can change what a module computes without changing its weights (a constant
        # read in forward): the spec's own file is part of what identifies the guide.
        source = import_spec_source(spec)
        desc["source_sha256"] = None if source is None else sha256_file(source)
        aware = bool(time_aware or getattr(net, "time_aware", False))
    elif spec in PRESETS:
        raise ValueError(
            f"classifier: {spec!r} is a diffusion model preset; classifier presets: "
            + ", ".join(classifier_presets())
        )
    else:
        raise ValueError(_kinds_message(spec))
    if flags and kind != "adm":
        raise ValueError("classifier_flags apply to ADM classifiers only")
    if kind != "resnet" and (softplus_beta not in (None, 0) or input_mode != "elucd" or resize):
        raise ValueError(
            "softplus_beta, input_mode and resize apply to ResNet classifiers only "
            f"(classifier {spec!r} is of kind {kind!r})"
        )
    if time_aware is not None and kind == "adm" and not time_aware:
        raise ValueError(f"classifier {spec!r}: ADM's classifier always takes the timestep")
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    size = size_required or image_size
    if size is None:
        raise ValueError(f"classifier {spec!r}: image_size is needed to check the classifier")
    n = probe_num_classes(net, spec, size, aware, device)
    desc.update(
        kind=kind,
        time_aware=aware,
        num_classes=n,
        weights=None if path is None else str(path),
        state_dict_sha256=state_dict_sha256(net),
    )
    return LoadedClassifier(net, spec, kind, aware, n, size_required, desc, export)
