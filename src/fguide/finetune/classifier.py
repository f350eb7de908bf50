"""The classifier a fine-tuning job trains: how it is called, sized, noised and saved
(:class:`Classifier`), and the x̂0 estimator of an ADM diffusion model for ``denoised`` input."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from fguide.finetune.config import INPUTS, ClassifierInput
from fguide.finetune.steps import X0Estimator
from fguide.guides import LoadedClassifier
from fguide.schedules import Process

__all__ = ["Classifier", "adm_x0_estimator", "as_classifier", "wrap_module"]


@dataclass
class Classifier:
    """A trainable classifier and how to call, size, noise and save it.

    ``module`` is what is trained and called: ``module(x_t, t)`` for ``"noisy"`` input,
    ``module(x)`` otherwise. ``export()`` returns the plain state dict written as the final
    file (for a ResNet the bare network's, which :func:`fguide.models.resnet.load_resnet`
    reads; for an ADM preset the ``EncoderUNetModel``'s, which ``load_model(preset, path)``
    reads). Build one with :meth:`from_loaded` (what
    :func:`fguide.guides.load_classifier` returns) or :func:`wrap_module`.
    """

    module: nn.Module
    spec: str
    kind: str
    """A guide kind's name (:data:`fguide.guides.GUIDE_KINDS`), or ``module``: an nn.Module given
    in memory."""
    default_input: ClassifierInput
    image_size: int | None = None
    noise_schedule: str | None = None
    weights: str | None = None
    export: Callable[[], Mapping[str, Tensor]] | None = None
    source_sha256: str | None = None
    """The SHA-256 of an import spec's module file (``module:function``): its code, which the
    weights' hash cannot see."""

    @classmethod
    def from_loaded(cls, loaded: LoadedClassifier) -> Classifier:
        """The loader's classifier made trainable: gradients on (the loader turns them off).

        Noise-aware classifiers (ADM's) default to ``"noisy"`` input with the schedule of the
        diffusion model of their size; the others to ``"clean"``.
        """
        module = loaded.module.requires_grad_(True)
        size = loaded.image_size
        # a classifier whose spec fixes its size and timestep (ADM's) was trained with it
        schedule = _adm_noise_schedule(size) if loaded.time_aware and size else None
        default: ClassifierInput = "noisy" if loaded.time_aware else "clean"
        weights = loaded.description.get("weights")
        return cls(
            module,
            loaded.spec,
            loaded.kind,
            default,
            size,
            schedule,
            None if weights is None else str(weights),
            loaded.export,
            loaded.description.get("source_sha256"),
        )

    def state_dict_to_save(self) -> dict[str, Tensor]:
        sd = self.export() if self.export is not None else self.module.state_dict()
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def wrap_module(
    module: nn.Module, default_input: ClassifierInput = "clean", spec: str = "<module>"
) -> Classifier:
    """A :class:`Classifier` for any ``nn.Module`` (``module(x)`` or, noisy, ``module(x, t)``)."""
    if default_input not in INPUTS:
        raise ValueError(f"input must be one of {INPUTS}, got {default_input!r}")
    return Classifier(module, spec, "module", default_input)


def as_classifier(classifier: Classifier | LoadedClassifier | nn.Module) -> Classifier:
    """A :class:`Classifier` from what :func:`finetune` accepts."""
    if isinstance(classifier, Classifier):
        return classifier
    if isinstance(classifier, nn.Module):
        return wrap_module(classifier)
    return Classifier.from_loaded(classifier)


def _adm_noise_schedule(image_size: int) -> str:
    """The schedule of the diffusion model of the same size (ADM trained them together)."""
    from fguide.models.presets import PRESETS

    diffusion = PRESETS.get(f"{image_size}x{image_size}_diffusion")
    if diffusion is not None and diffusion.diffusion_flags is not None:
        return str(diffusion.diffusion_flags["noise_schedule"])
    return "linear"


def adm_x0_estimator(unet: nn.Module, process: Process, class_cond: bool) -> X0Estimator:
    """x̂0 = clip(sqrt(1/ᾱ_t) x_t − sqrt(1/ᾱ_t − 1) ε_θ(x_t, t, y), −1, 1) from an ADM UNet.

    ``process`` must be unrespaced (t are training steps). Variance channels, when the model
    learns Σ, are ignored: x̂0 only needs ε.
    """

    def estimate(x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        out = unet(x_t, t, y) if class_cond else unet(x_t, t)
        eps = out[:, : x_t.shape[1]].to(x_t.dtype)
        return process.x0_from_eps(x_t, t, eps).clamp(-1, 1)

    return estimate
