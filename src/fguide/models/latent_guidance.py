"""Guidance of the diffusers pipeline models: EluCD's Algorithm 3 for models with classifier-free
guidance, guidance passes split into micro-batches (bounded memory for a classifier behind a
VAE decoder), and the sampler's parts of a pipeline (:func:`build_pipeline_sampling`).

Algorithm 3 (:class:`CFGClassifierGuidance`), at loop step k of n (k = 0 the noisiest), with
d = ε_c − ε_u and ε_cfg = ε_u + s d: ẑ0 = x̂0(z_t, ε_cfg), g = ∇_{ẑ0} S(C(Dec(ẑ0)), y) for any
objective, and ε̃ = ε_u + s (d − c_k · g/rms(g) · rms(d)) with
c_k = max(G/(n+1) · (n+1−k), 1e−5) + sin(πk/n) · G · γ_sine (EluCD Algorithm 2's schedule),
rms per sample over C, H, W. This is fguide's reading of EluCD §5.3 (EluCD's DiT code is
unreleased): the reference magnitude rms(d) and the schedule c_k are fguide's choices.
The models themselves live in :mod:`fguide.models.hf_diffusers` (imported here; it imports
nothing from this module).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fguide.accel import Precision, with_precision
from fguide.guidance import (
    ClassifierFn,
    ClassifierGuide,
    GuidanceResult,
    LabelsCheck,
    coefficient_vjp,
    evaluate_guidance,
)
from fguide.models.hf_diffusers import ClipMode, DiTEps, PipelineModel
from fguide.objectives import Objective, check_labels
from fguide.samplers import _rms, elucd_heun_scale
from fguide.schedules import Process

__all__ = [
    "CFGClassifierGuidance",
    "MicrobatchGuide",
    "PipelineSampling",
    "build_pipeline_sampling",
    "evaluate_guidance_microbatched",
    "guidance_weight",
]


# -- micro-batched guidance ---------------------------------------------------------------------


def evaluate_guidance_microbatched(
    classifier: ClassifierFn,
    x: Tensor,
    labels: Tensor,
    objective: Objective,
    progress: float = 0.0,
    microbatch: int | None = None,
    *,
    check: bool | Literal["labels"] = True,
) -> GuidanceResult:
    """g = Jᵀc as :func:`~fguide.guidance.evaluate_guidance`, ``microbatch`` samples per backward.

    Per-sample objectives: one forward-with-grad and backward per micro-batch. Tilted ones: the
    weights w come from the base scores of the whole group, so the logits of the full batch are
    computed first without gradient (micro-batch by micro-batch), then c·w for the full batch,
    then per micro-batch one forward with grad and the VJP with c·w restricted to it: the
    gradient equals the full-batch one; the price is one extra forward pass. ``check`` as for
    :func:`~fguide.guidance.evaluate_guidance`.
    """
    n = len(x)
    if microbatch is None or microbatch >= n:
        return evaluate_guidance(classifier, x, labels, objective, progress, check=check)
    if microbatch < 1:
        raise ValueError(f"guidance_microbatch must be >= 1; got {microbatch}")
    spans = [(s, min(s + microbatch, n)) for s in range(0, n, microbatch)]
    if objective.tilt is None:
        parts = [
            evaluate_guidance(classifier, x[a:b], labels[a:b], objective, progress, check=check)
            for a, b in spans
        ]
        return GuidanceResult(
            grad=torch.cat([p.grad for p in parts]),
            logits=torch.cat([p.logits for p in parts]),
            labels=labels,
        )
    with torch.no_grad():
        logits = torch.cat([classifier(x[a:b].detach()) for a, b in spans])
    if check == "labels":
        check_labels(logits, labels)
    elif check:
        objective.check_inputs(logits, labels)
    coeff, weights = objective.coefficients_and_weights(logits, labels, progress)
    grads = []
    with torch.enable_grad():
        for a, b in spans:
            x_in = x[a:b].detach().requires_grad_(True)
            out = classifier(x_in)
            grads.append(coefficient_vjp(out, x_in, coeff[a:b]))
    return GuidanceResult(grad=torch.cat(grads), logits=logits, labels=labels, weights=weights)


@dataclass
class MicrobatchGuide:
    """:class:`~fguide.guidance.ClassifierGuide` (classifier on x̂0) with micro-batched backward."""

    classifier: ClassifierFn
    objective: Objective
    scale: float = 1.0
    microbatch: int | None = None
    _labels: LabelsCheck = field(default_factory=lambda: LabelsCheck(), init=False, repr=False)

    def __call__(
        self, x_t: Tensor, x0: Tensor, t: Tensor, labels: Tensor, progress: float
    ) -> GuidanceResult:
        res = evaluate_guidance_microbatched(
            self.classifier,
            x0,
            labels,
            self.objective,
            progress,
            self.microbatch,
            check=self._labels.mode(labels),
        )
        self._labels.passed(labels)
        return res


# -- EluCD Algorithm 3 --------------------------------------------------------------------------


def guidance_weight(k: int, n: int, scale: float, sine_factor: float) -> float:
    """c_k = max(G/(n+1) · (n+1−k), 1e−5) + sin(πk/n) · G · γ_sine (EluCD Algorithm 2, as
    :func:`~fguide.samplers.elucd_heun_scale`), except that G = 0 gives c_k = 0 (no guidance
    at all), not the 1e−5 floor."""
    return 0.0 if scale == 0 else elucd_heun_scale(k, n, scale, sine_factor)


class CFGClassifierGuidance:
    """EluCD Algorithm 3 as fguide reads it: the normalised classifier gradient joins the CFG
    difference before the CFG scale.

    ``self`` is the EpsModel and :attr:`guide` the Guide to pass to ``fguide.ddpm`` together.
    At respaced index i (loop step k = n−1−i, progress u = k/(n−1)):
    d = ε_c − ε_u, ε_cfg = ε_u + s d (on ``cfg_channels``), ẑ0 = x̂0(z_t, ε_cfg) (clipped only if
    ``clip_denoised``), g = ∇_{ẑ0} S(f(ẑ0), y) with f the (decoded) classifier and S the
    objective (tilt weights included), ĝ = g / rms(g), and the returned output is
    [ε_cfg − s c_k ĝ rms(d), v_c] with c_k = :func:`guidance_weight` (G = ``scale``).
    s = 1 is classifier guidance on the conditional model; G = 0 is CFG alone.

    The shift is applied to ε inside the model call, so :attr:`guide` has scale 0: it hands the
    sampler this step's :class:`~fguide.guidance.GuidanceResult` (g unnormalised, logits,
    weights) for its finiteness check and the trajectory recorder, and moves nothing.
    """

    def __init__(
        self,
        dit: DiTEps,
        process: Process,
        classifier: ClassifierFn,
        objective: Objective,
        scale: float,
        sine_factor: float = 0.3,
        clip_denoised: bool = False,
        microbatch: int | None = None,
    ):
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"scale must be finite and >= 0; got {scale}")
        self.dit, self.process = dit, process
        self.classifier, self.objective = classifier, objective
        self.scale, self.sine_factor = float(scale), float(sine_factor)
        self.clip_denoised, self.microbatch = clip_denoised, microbatch
        index = np.full(process.num_train_steps, -1, dtype=np.int64)
        index[process.timestep_map] = np.arange(process.num_steps)
        self._index = torch.from_numpy(index)
        self._index_on: dict[torch.device, Tensor] = {}  # the table per device, copied once
        self.last: GuidanceResult | None = None
        self._labels = LabelsCheck()
        self.guide = _ReplayGuide(self)

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            raise ValueError("Algorithm 3 needs class labels")
        cond, uncond = self.dit.cond_uncond(x, t, labels)
        out = self.dit.combine(cond, uncond)
        c = x.shape[1]
        eps, d = out[:, :c], cond[:, :c] - uncond[:, :c]
        table = self._index_on.get(t.device)
        if table is None:
            table = self._index_on[t.device] = self._index.to(t.device)
        i = table[t.long()]
        n = self.process.num_steps
        first = int(i[0])  # one scalar read per step: progress and c_k are per step
        if first < 0:
            raise ValueError(f"timestep {int(t[0])} is not a step of this process's respacing")
        k = n - 1 - first
        x0 = self.process.x0_from_eps(x, i, eps)
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        res = evaluate_guidance_microbatched(
            self.classifier,
            x0.detach(),
            labels,
            self.objective,
            k / max(n - 1, 1),
            self.microbatch,
            check=self._labels.mode(labels),
        )
        self._labels.passed(labels)
        self.last = res
        g = res.grad.to(x.dtype)
        g_hat = g / _rms(g).clamp_min(torch.finfo(g.dtype).tiny)
        c_k = guidance_weight(k, n, self.scale, self.sine_factor)
        eps = eps - self.dit.cfg_scale * c_k * g_hat * _rms(d)  # Algorithm 3's guidance
        return torch.cat([eps, out[:, c:]], dim=1)


@dataclass
class _ReplayGuide:
    """The Guide half of :class:`CFGClassifierGuidance`: reports, does not move (scale 0)."""

    owner: CFGClassifierGuidance
    scale: float = 0.0

    def __call__(
        self, x_t: Tensor, x0: Tensor, t: Tensor, labels: Tensor, progress: float
    ) -> GuidanceResult:
        res = self.owner.last
        if res is None or res.grad.shape != x0.shape:
            raise RuntimeError(
                "CFGClassifierGuidance.guide must be passed to the sampler together with the "
                "CFGClassifierGuidance object itself as the model, to a sampler that calls the "
                "model before the guide (ddpm, ddim)"
            )
        self.owner.last = None
        return res


# -- one call for the sampling command ----------------------------------------------------------


@dataclass
class PipelineSampling:
    """What ``fguide.ddpm`` needs for a pipeline model (see :func:`build_pipeline_sampling`)."""

    model: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    process: Process
    guide: Any
    clip_denoised: bool
    state_shape: tuple[int, int, int]
    to_image: Callable[[Tensor], Tensor]


def build_pipeline_sampling(
    pm: PipelineModel,
    *,
    respacing: str = "250",
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    classifier: ClassifierFn | None = None,
    objective: Objective | None = None,
    scale: float = 1.0,
    guidance: Literal["algorithm3", "mean"] = "algorithm3",
    sine_factor: float = 0.3,
    microbatch: int | None = None,
    clip: ClipMode = "straight_through",
    classifier_precision: Precision = "fp32",
) -> PipelineSampling:
    """Model, process and guide for ``fguide.ddpm(s.model, z, s.process, labels=y,
    guide=s.guide, noise=..., clip_denoised=s.clip_denoised, sine_factor=...)``.

    Without a classifier: CFG (DiT) or the plain UNet, no guide. With one: ``"algorithm3"``
    (DiT only) is :class:`CFGClassifierGuidance` with G = ``scale``; ``"mean"`` is EluCD's DDPM
    mean shift μ' = μ + (Σ + a_t) γ g with γ = ``scale`` and g the (decoded) classifier's
    gradient at x̂0 of the CFG output, the sampler's ``sine_factor`` giving a_t. The final state
    goes through ``s.to_image`` (the VAE decoder for latents). ``classifier_precision`` runs the
    guidance's C∘Dec (decoder and classifier) under autocast (gradients included).
    """
    proc = pm.process(respacing)
    eps = pm.eps_model(cfg_scale, cfg_channels)
    guide: Any = None
    model: Callable[[Tensor, Tensor, Tensor | None], Tensor] = eps
    if classifier is not None:
        if objective is None:
            raise ValueError("objective is required with a classifier")
        clf = with_precision(pm.guidance_classifier(classifier, clip), classifier_precision)
        if guidance == "algorithm3":
            if not isinstance(eps, DiTEps):
                raise ValueError("guidance 'algorithm3' needs a DiT pipeline (CFG); use 'mean'")
            alg = CFGClassifierGuidance(
                eps, proc, clf, objective, scale, sine_factor, pm.clip_denoised, microbatch
            )
            model, guide = alg, alg.guide
        elif guidance == "mean":
            guide = (
                ClassifierGuide(clf, objective, scale)
                if microbatch is None
                else MicrobatchGuide(clf, objective, scale, microbatch)
            )
        else:
            raise ValueError(f"guidance must be 'algorithm3' or 'mean'; got {guidance!r}")
    return PipelineSampling(
        model=model,
        process=proc,
        guide=guide,
        clip_denoised=pm.clip_denoised,
        state_shape=pm.state_shape,
        to_image=lambda x: pm.to_image(x, microbatch),
    )
