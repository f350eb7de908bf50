"""A batch of a sampling run: its labels, its samples, and a shard's batches with their
per-step statistics.

Sample i's noise comes from a generator seeded by (seed, i) (:class:`fguide.SampleNoise`), its
label from one seeded by (seed, i, label stream) (:func:`sample_labels`), so a sample does not
depend on the batch it is drawn in. Nothing here names a model family or a guide kind: the
built :class:`~fguide.families.Components` say how to sample, and the guide kind which extra
statistics to record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from fguide import rng
from fguide.config import SampleConfig
from fguide.diagnostics import StepStatistic, TrajectoryRecorder
from fguide.families import Components
from fguide.guidance import GuidanceResult
from fguide.io.images import to_uint8_nhwc
from fguide.io.runs import TrajState, merge_states, recorder_state
from fguide.rng import SampleNoise
from fguide.samplers import (
    NonFiniteGuidanceError,
    NonFiniteModelOutputError,
    NonFiniteUpdateError,
    StepRecord,
    ddim,
    ddpm,
    heun,
)

__all__ = ["NonFiniteSamplesError", "generate_shard", "sample_batch", "sample_labels"]


class NonFiniteSamplesError(NonFiniteGuidanceError):
    """A non-finite model output or guidance gradient, naming the step, the global indices of
    the samples and the culprit."""

    def __init__(
        self, err: NonFiniteGuidanceError, samples: list[int], shard: tuple[int, int]
    ) -> None:
        super().__init__(err.step, err.t, samples, err.what)
        shown = f"{samples[:16]}{' …' if len(samples) > 16 else ''}"
        where = (
            f"at sampling step {err.step} (t = {err.t:g}) for sample indices {shown} "
            f"(shard [{shard[0]}, {shard[1]}))"
        )
        if isinstance(err, NonFiniteModelOutputError):
            advice = (
                "check the diffusion model (--model); with guidance on, a --scale too large "
                "for the classifier can also push the state there"
            )
        elif isinstance(err, NonFiniteUpdateError):
            advice = "lower --scale"
        else:
            advice = "lower --scale, check the classifier, or use a smoother one (--softplus-beta)"
        self.args = (f"non-finite {err.what} {where}; {advice}",)


# -- samples ------------------------------------------------------------------------------------


def sample_labels(
    mode: str, seed: int, indices: Sequence[int], num_classes: int | None
) -> NDArray[np.int64] | None:
    """Labels of samples ``indices``: each a function of (mode, seed, index) alone.

    ``uniform``: i.i.d. uniform, from a generator seeded by (seed, i, label stream);
    ``balanced``: block b = i // N of N consecutive indices holds a seeded permutation of the
    N classes (class counts differ by at most one for any prefix of whole blocks);
    ``cyclic``: i mod N (a text-to-image run's prompt index, when its prompts are the classes);
    a class id: every sample. ``None`` when there are no classes (unconditional, unguided).
    """
    if num_classes is None:
        return None
    if mode == "cyclic":
        return np.asarray([i % num_classes for i in indices], dtype=np.int64).reshape(-1)
    if mode == "uniform":
        out = [rng.numpy_rng(seed, i, rng.LABELS).integers(num_classes) for i in indices]
        return np.asarray(out, dtype=np.int64).reshape(-1)
    if mode == "balanced":
        perms: dict[int, NDArray[np.int64]] = {}
        out = []
        for i in indices:
            b = i // num_classes
            if b not in perms:
                perms[b] = rng.numpy_rng(seed, b, rng.LABELS, 1).permutation(num_classes)
            out.append(perms[b][i % num_classes])
        return np.asarray(out, dtype=np.int64).reshape(-1)
    return np.full(len(indices), int(mode), dtype=np.int64)


def sample_batch(
    comp: Components,
    config: SampleConfig,
    indices: Sequence[int],
    labels: NDArray[np.int64] | Tensor | None,
    callback: Callable[[StepRecord], None] | None = None,
) -> Tensor:
    """Draw samples ``indices`` (x_0 in about [−1, 1], NCHW float32 on the run's device).

    Sample i's noise comes from :class:`~fguide.samplers.SampleNoise` seeded by (seed, i).
    """
    noise = SampleNoise(config.seed, indices)
    shape = comp.state_shape or (3, comp.image_size, comp.image_size)
    z = noise.initial(shape, device=comp.device)
    if comp.sample_state is not None:  # the family's own call (per-sample conditioning)
        y = None if labels is None else torch.as_tensor(labels, device=comp.device)
        with torch.no_grad():  # guidance enables grad for its own classifier pass
            x = comp.sample_state(z, list(indices), noise, y, callback)
    else:
        x = _sample_state(comp, config, z, noise, labels, callback)
    if comp.to_image is None:
        return x
    with torch.no_grad():
        return comp.to_image(x)


def _sample_state(
    comp: Components,
    config: SampleConfig,
    z: Tensor,
    noise: SampleNoise,
    labels: NDArray[np.int64] | Tensor | None,
    callback: Callable[[StepRecord], None] | None,
) -> Tensor:
    """The sampler's final state (pixels, or latents for a latent model)."""
    clip_denoised = config.clip_denoised if comp.clip_denoised is None else comp.clip_denoised
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long, device=comp.device)
    with torch.no_grad():  # guidance enables grad for its own classifier pass
        if config.sampler == "ddpm":
            assert comp.model is not None and comp.process is not None
            return ddpm(
                comp.model,
                z,
                comp.process,
                labels=y,
                guide=comp.guide,
                noise=noise,
                callback=callback,
                clip_denoised=clip_denoised,
                sine_factor=config.sine_factor or 0.0,
                variance_tracking=config.variance_tracking or "per_sample",  # type: ignore[arg-type]
            )
        if config.sampler == "ddim":
            assert comp.model is not None and comp.process is not None
            return ddim(
                comp.model,
                z,
                comp.process,
                labels=y,
                guide=comp.guide,
                noise=noise,
                callback=callback,
                clip_denoised=clip_denoised,
                eta=config.eta or 0.0,
            )
        assert comp.denoiser is not None and comp.sigmas is not None
        return heun(
            comp.denoiser,
            z,
            comp.sigmas,
            labels=y,
            guide=comp.guide,
            callback=callback,
            sine_factor=config.sine_factor or 0.0,
            guidance_input=config.guidance_input or "x",  # type: ignore[arg-type]
            noise=noise,
            s_churn=config.s_churn or 0.0,
            s_tmin=config.s_tmin or 0.0,
            s_tmax=float("inf") if config.s_tmax is None else config.s_tmax,
            s_noise=1.0 if config.s_noise is None else config.s_noise,
        )


def generate_shard(
    comp: Components, config: SampleConfig, i0: int, i1: int, on_batch: Callable[[int], None]
) -> tuple[NDArray[np.uint8], NDArray[np.int64] | None, TrajState]:
    """Samples [i0, i1) batch by batch: uint8 NHWC images, their labels, and the merged
    per-step statistics (the trajectory recorder's and the guide kind's)."""
    group = config.tilt_group if config.t_tilt is not None else None
    end = i1 if group is None else -(-i1 // group) * group  # complete the last tilt group
    size = config.batch_size or 64  # resolved by the run (None only for direct callers)
    batch = size if group is None else max(1, size // group) * group
    labels = sample_labels(comp.label_mode, config.seed, range(i0, end), comp.num_classes)
    images, states = [], []
    for b0 in range(i0, end, batch):
        idx = list(range(b0, min(b0 + batch, end)))
        keep = min(len(idx), i1 - b0)
        lab = None if labels is None else labels[b0 - i0 : b0 - i0 + len(idx)]
        rec, extras = _recorders(comp, lab, keep)
        callback: Callable[[StepRecord], None] | None = None
        if rec is not None:
            both = _each([rec, *extras])
            callback = both if keep == len(idx) else _Kept(both, keep)
        try:
            x = sample_batch(comp, config, idx, lab, callback)
        except NonFiniteGuidanceError as err:
            raise NonFiniteSamplesError(err, [idx[p] for p in err.samples], (i0, i1)) from None
        except ValueError as err:  # e.g. non-finite logits: name the samples globally
            raise ValueError(
                f"{err} (in the batch of sample indices {idx[0]}..{idx[-1]}: batch position "
                f"p is sample {idx[0]} + p)"
            ) from None
        images.append(to_uint8_nhwc(x[:keep]))
        state = recorder_state(rec)
        for extra in extras:
            state = {**state, **extra.state()}
        states.append(state)
        on_batch(keep)
    return (
        np.concatenate(images),
        None if labels is None else labels[: i1 - i0],
        merge_states(states),
    )


def _recorders(
    comp: Components, labels: NDArray[np.int64] | None, keep: int
) -> tuple[TrajectoryRecorder | None, list[StepStatistic]]:
    """A batch's recorders: the trajectory recorder and the guide kind's statistics; none
    without labels or without a guide or a classifier that sees x̂0 (unguided runs record the
    classifier's calibration too, when it sees x̂0)."""
    record = comp.guide is not None or (
        comp.classifier is not None and not comp.classifier.time_aware
    )
    if not record or labels is None:
        return None, []
    y_keep = torch.as_tensor(labels[:keep], device=comp.device)
    view = comp.x0_image
    if comp.guide is not None:
        rec = TrajectoryRecorder()
    else:
        assert comp.classifier is not None
        clf = comp.classifier.module
        seen = clf if view is None else (lambda x0: clf(view(x0)))
        rec = TrajectoryRecorder(labels=y_keep, classifier=seen)
    extras = []
    if comp.guide_kind is not None and comp.classifier is not None:
        extras = comp.guide_kind.recorders(
            comp.classifier, y_keep, guided=comp.guide is not None, view=view
        )
    return rec, extras


def _each(callbacks: list[Callable[[StepRecord], None]]) -> Callable[[StepRecord], None]:
    if len(callbacks) == 1:
        return callbacks[0]

    def call_all(rec: StepRecord) -> None:
        for cb in callbacks:
            cb(rec)

    return call_all


class _Kept:
    """Callback filter: passes the first ``keep`` samples of each record (drops tilt padding)."""

    def __init__(self, inner: Callable[[StepRecord], None], keep: int):
        self.inner, self.keep = inner, keep

    def __call__(self, rec: StepRecord) -> None:
        k = self.keep
        res = rec.guidance
        if res is not None:
            res = GuidanceResult(
                res.grad[:k],
                res.logits[:k],
                res.labels[:k],
                None if res.weights is None else res.weights[:k],
            )
        self.inner(dataclasses.replace(rec, t=rec.t[:k], x=rec.x[:k], x0=rec.x0[:k], guidance=res))
