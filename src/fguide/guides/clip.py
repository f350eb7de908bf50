"""CLIP as a guide: ``clip:FOLDER``, a transformers CLIP model folder as a zero-shot head over
``prompts`` (or a ``prompt_file``; neither: the 1000 ImageNet classes), logits
f_k = s · cos(image, prompt_k) (:mod:`fguide.models.clip`). A run guided by it records the CLIP
score per step (:class:`~fguide.models.clip.CLIPScoreRecorder`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from fguide.config import SampleConfig
from fguide.diagnostics import StepStatistic
from fguide.guides.base import GuideKind, LoadedClassifier, LoadOptions, finish_loading
from fguide.models.clip import CLIPScoreRecorder
from fguide.params import OwnedFields, ParamError

__all__ = ["CLIP_PREFIX", "CLIPKind"]

CLIP_PREFIX = "clip:"


class CLIPKind(GuideKind):
    """A CLIP zero-shot head; its classes are prompts, a target prompt fixes every label."""

    name = "clip"
    form = "'clip:FOLDER'"
    fields = OwnedFields(
        ("prompts", "prompt_file", "target"),
        "CLIP guides ({classifier} clip:FOLDER)",
        name_all=True,
    )
    statistics = (CLIPScoreRecorder,)
    prompt_classes = True

    def claims(self, spec: str) -> bool:
        return spec.startswith(CLIP_PREFIX)

    def refuse_options(self, spec: str, kind: str, options: LoadOptions) -> None:
        if options.prompts or options.prompt_file is not None:
            raise ValueError(f"prompts apply to CLIP guides (clip:FOLDER), not {spec!r}")

    def resolve(self, config: SampleConfig) -> None:
        if config.prompts and config.prompt_file is not None:
            raise ParamError("give {0} or {1}, not both", "prompts", "prompt_file")
        if config.prompt_file is not None:
            config.prompt_file = Path(config.prompt_file)
        if config.target is not None and config.labels != "uniform":
            raise ParamError(
                "{0} fixes every sample's label: do not give {1} as well", "target", "labels"
            )

    def labels(self, config: SampleConfig, loaded: LoadedClassifier) -> str:
        """The target prompt's index as a fixed class, when there is a target."""
        if config.target is None:
            return config.labels
        return str(loaded.module.target_index(config.target))  # type: ignore[operator]

    def load(self, spec: str, path: Path | None, options: LoadOptions) -> LoadedClassifier:
        from fguide.models.clip import load_clip_head

        if path is not None:
            raise ValueError("classifier_weights: a CLIP guide reads its weights from its folder")
        prompts, prompt_file = options.prompts, options.prompt_file
        head = load_clip_head(
            spec[len(CLIP_PREFIX) :],
            list(prompts) if prompts else None,
            prompt_file=prompt_file,
            imagenet=not prompts and prompt_file is None,
        )
        desc = {"spec": spec, **head.describe()}
        return finish_loading(head, spec, self.name, False, path, options, desc)

    def recorders(
        self,
        loaded: LoadedClassifier,
        labels: Tensor,
        *,
        guided: bool = False,
        view: Callable[[Tensor], Tensor] | None = None,
    ) -> list[StepStatistic]:
        """The CLIP score per step: on a latent model (``view``), read off the guidance logits
        when this head guides (free), else on the decoded x̂0 (a decoder forward per step)."""
        head = loaded.module
        if view is not None and guided:
            return [CLIPScoreRecorder(head, labels, from_guidance=True)]  # type: ignore[arg-type]
        return [CLIPScoreRecorder(head, labels, view=view)]  # type: ignore[arg-type]
