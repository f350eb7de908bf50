"""The guide-kind registry: one loader builds every classifier fguide can guide with.

``load_classifier(spec, weights, ...)`` finds the kind that claims ``spec`` in
:data:`GUIDE_KINDS` (first claim wins) and lets it load:

- :mod:`~fguide.guides.resnet`: ``resnet18`` … ``resnet152``, torchvision-format weights,
  ReLU made Softplus(β), on x̂0 ∈ [−1, 1];
- :mod:`~fguide.guides.adm`: an ADM classifier preset (``128x128_classifier`` …) or ``adm``
  with ``flags``: ADM's noise-aware classifier, called as ``f(x_t, t)``;
- :mod:`~fguide.guides.clip`: ``clip:FOLDER``, a transformers CLIP folder as a zero-shot head
  over ``prompts`` (or a ``prompt_file``; neither: the 1000 ImageNet classes);
- :mod:`~fguide.guides.reward`: ``reward:CLIP_FOLDER:HEAD_FILE``, a scalar reward head on CLIP
  image embeddings (S = r);
- :mod:`~fguide.guides.imported`: ``module:function`` or ``file.py:function`` returning an
  ``nn.Module``.

Every command (``sample``, ``calibration``, ``finetune``) goes through it. The result carries
what callers need: the kind, whether the classifier takes the timestep, the number of classes
(from one probe), and a description with the SHA-256 of the weights actually loaded (and, for an
import spec, of its module's source file), which is part of a sampling run's identity.

A new kind of guide is one module here (a :class:`GuideKind`) and one line in
:data:`GUIDE_KINDS`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fguide.guides.adm import ADMKind, classifier_presets, is_adm_classifier
from fguide.guides.base import (
    GuideKind,
    LoadedClassifier,
    LoadOptions,
    probe_num_classes,
    state_dict_sha256,
)
from fguide.guides.clip import CLIP_PREFIX, CLIPKind
from fguide.guides.imported import ImportKind
from fguide.guides.resnet import ResNetKind
from fguide.guides.reward import RewardKind

__all__ = [
    "CLIP_PREFIX",
    "GUIDE_KINDS",
    "GuideKind",
    "LoadedClassifier",
    "classifier_presets",
    "find_guide_kind",
    "guide_kind",
    "is_adm_classifier",
    "load_classifier",
    "probe_num_classes",
    "state_dict_sha256",
    "unknown_guide",
]

GUIDE_KINDS: tuple[GuideKind, ...] = (
    ResNetKind(),
    ADMKind(),
    CLIPKind(),
    RewardKind(),  # before ImportKind, which claims every spec with a colon
    ImportKind(),
)
"""Every kind of guide, in the order their claims are tried (and listed in messages)."""


def find_guide_kind(spec: str | None) -> GuideKind | None:
    """The kind that claims ``spec`` (the first in :data:`GUIDE_KINDS`), or None."""
    if spec is None:
        return None
    return next((kind for kind in GUIDE_KINDS if kind.claims(spec)), None)


def guide_kind(name: str) -> GuideKind:
    """The kind named ``name`` (a :attr:`LoadedClassifier.kind`)."""
    for kind in GUIDE_KINDS:
        if kind.name == name:
            return kind
    raise KeyError(f"no guide kind {name!r}")


def unknown_guide(spec: str) -> str:
    """Why no kind claims ``spec``: what it resembles, or every form a guide takes."""
    for kind in GUIDE_KINDS:
        why = kind.misnamed(spec)
        if why is not None:
            return why
    forms = [kind.form for kind in GUIDE_KINDS]
    return f"{spec!r} is none of {', '.join(forms[:-1])} or {forms[-1]}"


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
    options = LoadOptions(
        image_size=image_size,
        device=device,
        softplus_beta=softplus_beta,
        sampler=sampler,
        input_mode=input_mode,
        resize=resize,
        flags=dict(flags or {}),
        time_aware=time_aware,
        num_classes=num_classes,
        require_weights=require_weights,
        dtype=dtype,
        prompts=prompts,
        prompt_file=prompt_file,
    )
    kind = find_guide_kind(spec)
    if kind is not None:
        for other in GUIDE_KINDS:
            if other is not kind:
                other.refuse_options(spec, kind.name, options)
    path = None if weights is None else Path(weights)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"classifier_weights: file not found: {path}")
    if kind is None:
        raise ValueError(f"classifier: {unknown_guide(spec)}")
    return kind.load(spec, path, options)
